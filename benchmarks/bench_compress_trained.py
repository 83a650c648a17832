"""Compressing a model that is already trained (issue 30, item 3): the GPT of
``examples/trained_gpt.py`` (trained 960 steps on the standard library, CPU configuration) at 80 /
60 / 40 / 20 % of the targeted layers' weights kept.

    python benchmarks/bench_compress_trained.py [--stage compress]      # resumes from its JSON
    python benchmarks/bench_compress_trained.py --stage recover [--fractions 0.4 0.6] [--seeds 0 1 2]
                                                [--deadline HH:MM]      # UTC: no cell started after it
    python benchmarks/bench_compress_trained.py --stage scratch [--seeds 0 1 2]
    python benchmarks/bench_compress_trained.py --stage recover --recover-steps 192 ...  # another length, own file
    python benchmarks/bench_compress_trained.py --dry-run [--out DIR]   # tiny model, every stage, ~20 s (tested)

Three stages write their own sections of one JSON (``stages.compress.<method>.<fraction>``,
``stages.recover.<method>.<fraction>.<seed>``, ``stages.scratch.<fraction>.<seed>``).

Stage ``compress``: the validation loss right after compression, no training, by

* ``svd``: truncated SVD of each weight at one uniform rank (no data);
* ``asvd``: ASVD-style (Yuan et al., 2023, written from the paper's description): the weight's
  input columns scaled by S = diag(mean |x_j|) ** 0.5 (each input channel's mean absolute
  activation on the calibration batches), SVD of W S truncated to the rank, then
  W ~ (U_r Sigma_r) (V_r^T S^-1);
* ``exact_uniform``: the package's exact data-aware one-shot, ``factorize_model(..., rank=r)`` at the
  same uniform rank (it minimizes sum ||x W^T + b - x W'^T - b'||^2 over the calibration inputs,
  SVD-LLM's objective, with the bias refitted);
* ``exact_budget_params`` / ``exact_budget_macs``: ``factorize_model`` with ``ParamBudget(f)`` /
  ``ParamBudget(f, metric="macs")`` and their defaults (per-layer ranks from the measured effect of
  each layer on the logits). For Linear layers of a sequence model a layer's multiply-adds per
  sample are its weights times the positions, the same share of the total, so the two agree up to
  the allocation's own measurements.

Targets: every block's ``attn.qkv``, ``attn.proj``, ``mlp.fc`` and ``mlp.proj`` (the tied head is
left alone). The kept fraction counts those layers' weights (biases are not changed by SVD and are
refitted by the exact solver): r (in + out) for a pair, in x out for a dense layer. The uniform
rank r is the one whose kept fraction is nearest ``f``, with the package's rule that a layer whose
pair would not save multiply-adds (r (in + out) >= in x out: ``attn.proj`` at 80 %) stays dense,
for all three uniform methods alike (so they keep the same weights). The speed guard is off: no
timing decides anything, the same structure on any machine.

Data: calibration = ``CALIBRATION_BATCHES`` batches of the training batch size drawn from the
TRAINING split (``Windows(seed=CALIBRATION_SEED)``: windows other than the training run's), the
same for every method; validation = ``VAL_WINDOWS`` evenly spaced windows of the held-out files
(batches of 64), the same for every method and the dense model. Each cell also records each
layer's output NMSE on the calibration batches, sum ||y - y'||^2 / sum ||y - mean y||^2 with y the
dense layer's output on the dense model's inputs: the exact solver's own objective, on which it
must not be above SVD's or ASVD's at the same rank.

Stage ``recover``: S = 120 optimizer steps (12.5 % of the 960 training steps) of continued
training, then the validation loss (the same validation batches). Every method trains through the
same Lightning ``Trainer`` (``RecoveryTask``: one epoch of exactly S batches, logger and checkpoints
off, no sanity or validation run) with ``GPTTask.configure_optimizers``' optimizer (AdamW, betas
(0.9, 0.95), weight decay 0.1 on the matrices, 0 on vectors) and one fixed recovery schedule
(``RecoverSetup``: linear warm-up over 10 steps to 3e-4, then a cosine to 3e-5 at the last step; the
trained run ended at 1e-4). Recovery seed s picks the training windows (``S * 16`` random windows of
the training split drawn by ``Windows(seed=100 + s)``, none of the training run's or the
calibration's), fed in the same order to every method: each cell records a hash of every training
input its ``training_step`` saw (``batches_seen``). Methods, per (fraction, seed):

* ``dense_ft``: the trained dense model fine-tuned S steps (the reference; once per seed, stored
  under fraction "1.0");
* ``svd_ft`` / ``exact_uniform_ft`` / ``exact_budget_params_ft``: stage compress's compression
  (recomputed once per fraction and shared by the seeds), then S steps of fine-tuning of the
  factorized model. ``ParamBudget``'s output probe uses 4 calibration batches
  (``sensitivity_batches=4``, against all 16 in stage compress, which spent ~225 s per cell on it);
* ``callback_progressive``: ``LowRankFactorization(progressive(ParamBudget(f), [0, 40, 80]),
  interval="step", speed_guard=False, budget_batches=4, statistics=Statistics(max_samples=None, sample_fraction=1.0))`` on
  the trained dense model over the S steps (kept 0.737 / 0.543 / 0.4 of the weights for f = 0.4;
  the re-warm is the callback's default: a quarter of the epoch, 30 steps, after the swaps at steps
  40 and 80). Its ``val_dataloader`` is the calibration batches (training split), so the statistics
  of every milestone come from a calibration pass over them (``history[i]["statistics"]``) and no
  held-out data is fitted to;
* ``callback_switch0``: the same callback with ``{0: ParamBudget(f)}`` (one-shot plus fine-tuning
  through the callback: the same solve and probe as ``exact_budget_params_ft``);
* ``callback_progressive_no_rewarm``: ``callback_progressive`` with ``rewarm_steps=0`` (a lever of
  item 4: the learning rate is not ramped again after each swap; run at 40 % kept).

Each cell records the validation loss after recovery (and before it, for the one-shot methods), the
kept fraction and ranks, the training loss per step, wall and CPU seconds, and for the callback the
history per milestone (step, policy, ranks, kept fraction). The summary holds mean / min / max over
the seeds and issue 30's recovery goals. ``compress_trained_recover.png``: validation loss after
recovery against the kept fraction, one line per method (mean, bars min to max over seeds), the
fine-tuned dense model as a dashed line with its seeds' range shaded.

Stage ``scratch``: a dense GPT whose width (a multiple of the heads) gives the parameter count
nearest the compressed model's at 40 % kept (every parameter: embeddings, norms and biases too),
trained from scratch for 960 + 120 steps with the original recipe (``examples/trained_gpt.py``, its
learning-rate schedule stretched to 1080 steps, 27 epochs of 40 steps; one run per seed of
``--seeds``, each cached like the trained model), and its validation loss.

Writes ``compress_trained.json`` after every cell (a cell already in the file is skipped: a killed
run resumes) and ``compress_trained.png`` (validation loss against the kept fraction, one line per
method); the trained model's loss curve goes to ``trained_gpt_curve.json`` / ``.png``. One torch
thread.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks._common import package_version, recovery_trainer, warmup_cosine
from benchmarks._state_rules import FreshState, PairCarry, PairCarryRewarm
from examples.gpt_task import Windows, corpus
from examples.trained_gpt import TrainedGPTConfig, dry_run_config, load_trained_gpt, mean_loss, write_curve
from factorize_plugin import (
    FactorizedLinear,
    LowRankFactorization,
    ParamBudget,
    Statistics,
    Targets,
    factorize_model,
    progressive,
)
from factorize_plugin.layers.adapters import LayerView, layer_view, weight_matrix
from factorize_plugin.surgery.ranks.candidates import admissible
from factorize_plugin.surgery.select.modules import match_names, set_submodule

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (0.8, 0.6, 0.4, 0.2)
TARGETS = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc", "blocks.*.mlp.proj")
METHODS = ("svd", "asvd", "exact_uniform", "exact_budget_params", "exact_budget_macs")
UNIFORM = ("svd", "asvd", "exact_uniform")  # one rank everywhere: the same layers kept dense, the same weights
ASVD_ALPHA = 0.5
CALIBRATION_SEED = 1  # the training run drew its windows with seed 0 (generators 0..epochs-1); this draws 7919
STAGES = ("compress", "recover", "scratch", "inference")

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs [B, T] int64, next-byte targets [B, T] int64


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a results file's cells depend on: a file written with another setup is not resumed."""

    model: TrainedGPTConfig
    calibration_batches: int = 16
    val_windows: int = 1024
    val_batch: int = 64
    fractions: tuple[float, ...] = FRACTIONS
    asvd_alpha: float = ASVD_ALPHA
    dry_run: bool = False

    def record(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_key": self.model.key(), "targets": list(TARGETS),
                "calibration_seed": CALIBRATION_SEED}  # fmt: skip


def setup_for(dry_run: bool) -> Setup:
    if dry_run:
        return Setup(dry_run_config(), calibration_batches=4, val_windows=64, val_batch=32, dry_run=True)
    return Setup(TrainedGPTConfig())


# ----------------------------------------------------------------------------------------- data


def calibration_batches(setup: Setup) -> list[Batch]:
    """``setup.calibration_batches`` training-split batches [batch_size, block] (fixed windows)."""
    cfg = setup.model
    train, _ = corpus(cfg.corpus)
    windows = Windows(train, cfg.block, setup.calibration_batches * cfg.batch_size, seed=CALIBRATION_SEED)
    return list(DataLoader(windows, batch_size=cfg.batch_size, shuffle=False))


def validation_batches(setup: Setup) -> list[Batch]:
    """``setup.val_windows`` evenly spaced windows of the validation files, [val_batch, block] each."""
    cfg = setup.model
    _, val = corpus(cfg.corpus)
    return list(DataLoader(Windows(val, cfg.block, setup.val_windows, seed=None), batch_size=setup.val_batch))


# ------------------------------------------------------------------------------- layers and ranks


def target_names(model: nn.Module) -> list[str]:
    """The qualified names of the targeted ``nn.Linear`` layers, in model order."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return match_names(linears, list(TARGETS), None)


def views(model: nn.Module, names: list[str]) -> dict[str, LayerView]:
    """The dense shapes of ``names`` (the model must still be dense there)."""
    return {n: layer_view(model.get_submodule(n)) for n in names}


def kept_weights(view: LayerView, rank: Optional[int]) -> int:
    """Weights of a dense layer of ``view``'s shape after asking for ``rank`` under the package's rule
    (``admissible``: no pair that would not save multiply-adds)."""
    return view.params(None if rank is None else admissible(view, rank))


def uniform_rank(shapes: dict[str, LayerView], fraction: float) -> int:
    """The one rank whose kept share of the layers' dense weights is nearest ``fraction``."""
    dense = sum(v.params() for v in shapes.values())
    top = max(min(v.in_dim, v.out_dim) for v in shapes.values())
    return min(range(1, top + 1), key=lambda r: abs(sum(kept_weights(v, r) for v in shapes.values()) / dense - fraction))


def current_weights(module: nn.Module) -> int:
    """Weights (no bias) of a dense Linear or a FactorizedLinear pair."""
    if isinstance(module, FactorizedLinear):
        return module.first.weight.numel() + module.second.weight.numel()
    assert isinstance(module, nn.Linear), type(module)
    return module.weight.numel()


def structure(model: nn.Module, shapes: dict[str, LayerView]) -> tuple[dict[str, Optional[int]], float]:
    """(rank per layer, None where dense; kept share of the layers' dense weights)."""
    ranks: dict[str, Optional[int]] = {}
    kept = 0
    for name in shapes:
        module = model.get_submodule(name)
        ranks[name] = module.rank if isinstance(module, FactorizedLinear) else None
        kept += current_weights(module)
    return ranks, kept / sum(v.params() for v in shapes.values())


# --------------------------------------------------------------------------- activations (hooks)


def over_layer_inputs(model: nn.Module, names: list[str], batches: Iterable[Batch],
                      visit: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:  # fmt: skip
    """Runs ``model`` (no grad, eval) over ``batches``, calling ``visit(name, x [N, D], y [N, M])``
    with each named layer's inputs and outputs flattened to rows."""
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
            visit(name, args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1]))

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def input_abs_means(model: nn.Module, names: list[str], batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Per layer, the mean absolute value of each input channel over the batches' rows: [D] float64."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def visit(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0) + x.double().abs().sum(0)
        rows[name] = rows.get(name, 0) + len(x)

    over_layer_inputs(model, names, batches, visit)
    return {n: sums[n] / rows[n] for n in names}


def layer_output_nmse(dense: nn.Module, compressed: nn.Module, names: list[str], batches: list[Batch]) -> dict[str, float]:
    """Per layer: sum ||y - y'||^2 / sum ||y - mean y||^2 over the batches' rows, where x [N, D] is
    the layer's input in the dense model, y = dense layer(x) and y' = the compressed model's layer of
    that name applied to the same x (the exact solver's objective and NMSE)."""
    err: dict[str, float] = {n: 0.0 for n in names}
    s1: dict[str, torch.Tensor] = {}
    s2: dict[str, float] = {n: 0.0 for n in names}
    count: dict[str, int] = {n: 0 for n in names}

    def visit(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        approx = compressed.get_submodule(name)(x)
        err[name] += float((y.double() - approx.double()).square().sum())
        s1[name] = s1.get(name, 0) + y.double().sum(0)
        s2[name] += float(y.double().square().sum())
        count[name] += len(y)

    was_training = compressed.training
    compressed.eval()
    over_layer_inputs(dense, names, batches, visit)
    compressed.train(was_training)
    return {n: err[n] / (s2[n] - float(s1[n].square().sum()) / count[n]) for n in names}


# ------------------------------------------------------------------------------------ the methods


def balanced(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``wa`` [D, r], ``wb`` [r, M] rescaled so that column k of ``wa`` and row k of ``wb`` have
    equal norms (the product unchanged; the exact solver's factors are split this way too)."""
    a, b = wa.norm(dim=0), wb.norm(dim=1)
    c = (b / a.clamp_min(1e-300)).sqrt()
    return wa * c, wb / c[:, None]


def svd_factors(weight: torch.Tensor, rank: int, scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``weight`` [M, D] (of ``weight @ diag(scale)`` and scaled back when ``scale``
    [D] is given: ASVD), as float64 factors ``wa`` [D, r], ``wb`` [r, M] with x @ wa @ wb ~ x @ W^T."""
    w = weight.detach().double()
    s = torch.ones(w.shape[1], dtype=torch.float64) if scale is None else scale.double()
    u, sigma, vh = torch.linalg.svd(w * s, full_matrices=False)  # W S = U diag(sigma) V^T
    wa = vh[:rank].T / s[:, None]  # S^-1 V_r                        [D, r]
    wb = sigma[:rank, None] * u[:, :rank].T  # Sigma_r U_r^T          [r, M]
    return balanced(wa, wb)


def compress_by_svd(model: nn.Module, shapes: dict[str, LayerView], rank: int,
                    scales: Optional[dict[str, torch.Tensor]] = None) -> None:  # fmt: skip
    """Replaces each layer of ``shapes`` by its (scaled) truncated SVD pair at ``rank``, in place;
    a layer whose pair would not save multiply-adds stays dense (``admissible``)."""
    for name, view in shapes.items():
        r = admissible(view, rank)
        if r is None:
            continue
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        wa, wb = svd_factors(linear.weight, r, None if scales is None else scales[name])
        set_submodule(model, name, FactorizedLinear.from_linear(linear, wa, wb, linear.bias))


def asvd_scales(abs_means: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """S = mean|x| ** alpha per input channel (a channel never active gets the smallest positive one)."""
    out = {}
    for name, m in abs_means.items():
        floor = m[m > 0].min() if bool((m > 0).any()) else torch.tensor(1.0, dtype=m.dtype)
        out[name] = m.clamp_min(floor) ** alpha
    return out


@dataclasses.dataclass
class Context:
    """What the methods read: the calibration batches, the layers' dense shapes, and (lazily) the
    calibration inputs' mean absolute values per channel."""

    trained: nn.Module
    calibration: list[Batch]
    shapes: dict[str, LayerView]
    alpha: float
    _abs_means: Optional[dict[str, torch.Tensor]] = None

    def abs_means(self) -> dict[str, torch.Tensor]:
        if self._abs_means is None:
            self._abs_means = input_abs_means(self.trained, list(self.shapes), self.calibration)
        return self._abs_means


def exact(model: nn.Module, ctx: Context, **policy: Any) -> list[Any]:
    """``factorize_model`` on the targets, every targeted layer eligible, the speed guard off."""
    return factorize_model(model, ctx.calibration, targets=Targets(list(TARGETS), min_params=0, min_features=0), speed_guard=False, **policy)  # fmt: skip


def compress(method: str, model: nn.Module, fraction: float, ctx: Context) -> dict[str, Any]:
    """Compresses ``model`` (a copy of the trained one) in place by ``method`` at ``fraction``;
    returns what the method itself reports (the uniform rank; the solver's NMSE per layer)."""
    rank = uniform_rank(ctx.shapes, fraction)
    if method == "svd":
        compress_by_svd(model, ctx.shapes, rank)
    elif method == "asvd":
        compress_by_svd(model, ctx.shapes, rank, asvd_scales(ctx.abs_means(), ctx.alpha))
    elif method == "exact_uniform":
        return solver_record(exact(model, ctx, rank=rank)) | {"uniform_rank": rank}
    elif method == "exact_budget_params":
        return solver_record(exact(model, ctx, policy=ParamBudget(fraction)))
    elif method == "exact_budget_macs":
        return solver_record(exact(model, ctx, policy=ParamBudget(fraction, metric="macs")))
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    return {"uniform_rank": rank}


def solver_record(reports: list[Any]) -> dict[str, Any]:
    """The solver's own NMSE per changed layer (on the calibration rows, and on held-out rows where
    the package measured it), and its notes."""
    changed = [r for r in reports if r.new_rank is not None]
    return {"solver_nmse": {r.name: r.nmse for r in changed},
            "solver_heldout_nmse": {r.name: r.heldout_nmse for r in changed if r.heldout_nmse is not None},
            "notes": {r.name: r.note for r in reports if r.note}}  # fmt: skip


def run_cell(method: str, fraction: float, ctx: Context, val: list[Batch]) -> dict[str, Any]:
    """One (method, fraction): compress a copy of the trained model and measure it."""
    model = copy.deepcopy(ctx.trained)
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = compress(method, model, fraction, ctx)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    ranks, kept = structure(model, ctx.shapes)
    names = list(ctx.shapes)
    return {
        "val_loss": mean_loss(model, val), "kept_fraction": kept, "target_fraction": fraction,
        "calibration_loss": mean_loss(model, ctx.calibration),
        "layer_nmse": layer_output_nmse(ctx.trained, model, names, ctx.calibration),
        "ranks": ranks, "compress_seconds": seconds, "compress_cpu_seconds": cpu_seconds, **record,
        "warnings": [str(w.message) for w in caught],
        "commit": package_version()["commit"],
    }  # fmt: skip


# --------------------------------------------------------------------------------- results file


def load_results(path: Path, setup: Setup) -> dict[str, Any]:
    """The results so far (a new skeleton when ``path`` is missing); refuses a file of another setup."""
    if path.exists():
        result = json.loads(path.read_text())
        if result["setup"] != json.loads(json.dumps(setup.record())):
            raise SystemExit(f"{path} was written with another setup: {result['setup']} (now {setup.record()}); "
                             "pass another --out or delete it")  # fmt: skip
        return result
    return {"benchmark": "compress_trained", "setup": setup.record(), "version": package_version(), "stages": {}}


def save(result: dict[str, Any], path: Path) -> None:
    """Writes ``result`` atomically, its ``version`` block refreshed."""
    result["version"] = package_version()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def summarize_compress(result: dict[str, Any]) -> dict[str, Any]:
    """Goal 1 of issue 30: right after compression, is each exact variant below SVD and ASVD at every fraction?"""
    cells = result["stages"].get("compress", {})
    dense = result["dense"]["val_loss"]
    table = {m: {f: c["val_loss"] for f, c in cells.get(m, {}).items()} for m in METHODS}
    goal: dict[str, Any] = {}
    for m in METHODS[2:]:
        wins = {f: loss < min(table["svd"].get(f, float("inf")), table["asvd"].get(f, float("inf")))
                for f, loss in table[m].items()}  # fmt: skip
        goal[m] = {"below_svd_and_asvd_at": wins, "at_every_fraction": bool(wins) and all(wins.values())}
    return {"dense_val_loss": dense, "val_loss": table,
            "val_loss_vs_dense": {m: {f: v / dense - 1 for f, v in t.items()} for m, t in table.items()},
            "goal_exact_below_svd_and_asvd": goal}  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> bool:
    """Validation loss against the kept fraction, one line per method; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["stages"].get("compress", {})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"svd": "o-", "asvd": "s-", "exact_uniform": "^-", "exact_budget_params": "D-", "exact_budget_macs": "x--"}
    losses = [result["dense"]["val_loss"]]
    for method in METHODS:
        points = sorted((c["kept_fraction"], c["val_loss"]) for c in cells.get(method, {}).values())
        if points:
            ax.plot(*zip(*points), styles[method], ms=5, label=method)
            losses += [loss for _, loss in points]
    ax.axhline(result["dense"]["val_loss"], color="k", ls="--", lw=1, label=f"dense ({result['dense']['val_loss']:.3f})")
    if max(losses) > 2 * min(losses):  # a wide range (weight SVD far off at small fractions): log scale
        ax.set_yscale("log")
    ax.set_xlabel("kept fraction of the targeted layers' weights")
    ax.set_ylabel("validation loss (nats / byte), right after compression")
    m = result["setup"]["model"]
    ax.set_title(f"trained GPT (d={m['dim']}, {m['layers']} layers, {m['steps']} steps): one-shot compression", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ stage "recover"

ONE_SHOT_FT = ("svd_ft", "exact_uniform_ft", "exact_budget_params_ft", "exact_budget_params_ft_kd",
               "exact_budget_params_ft_fade")  # fmt: skip
CALLBACKS = ("callback_progressive", "callback_progressive_carried", "callback_switch0", "callback_progressive_no_rewarm", "callback_progressive_early",
             "callback_progressive_kd", "callback_progressive_fade", "callback_progressive_dense",
             "callback_progressive_dense_kd", "callback_progressive_carry_no_rewarm", "callback_progressive_carry",
             "callback_progressive_carry_kd_no_rewarm")  # fmt: skip
RECOVER_METHODS = ("dense_ft", *ONE_SHOT_FT, *CALLBACKS)
STATE_RULES = {"callback_switch0": LowRankFactorization, "callback_progressive_carried": LowRankFactorization,
               "callback_progressive_carry": PairCarryRewarm, "callback_progressive_carry_no_rewarm": PairCarry,
               "callback_progressive_carry_kd_no_rewarm": PairCarry}  # the others: FreshState  # fmt: skip
LEVERS = ("exact_budget_params_ft_kd", "exact_budget_params_ft_fade", "callback_progressive_no_rewarm",
          "callback_progressive_early", "callback_progressive_kd", "callback_progressive_fade",
          "callback_progressive_dense", "callback_progressive_dense_kd",
          "callback_progressive_carry_no_rewarm", "callback_progressive_carry",
          "callback_progressive_carry_kd_no_rewarm")  # 40 % kept only  # fmt: skip
FADE_SHARE = 0.25  # the fading residual's length: a quarter of the recovery (30 of 120 steps), as the re-warm
KD_WEIGHT = 0.5  # distillation: loss = (1 - w) CE(labels) + w KL(teacher || student), temperature 1
RECOVER_FRACTIONS = (0.4, 0.6)  # this session's order: the most important first
RECOVER_SEEDS = (0, 1, 2)
RECOVERY_WINDOW_SEED = 100  # recovery seed s draws its windows with Windows(seed=100 + s): generator 791900 + ...
DENSE_KEY = "1.0"  # dense_ft is stored under this fraction (one per seed, shared by the fractions)


@dataclasses.dataclass(frozen=True)
class RecoverSetup:
    """The recovery protocol (stored as the JSON's ``recover_setup``; a file with another is refused).

    ``steps`` optimizer steps of AdamW (betas (0.9, 0.95), weight decay 0.1 on the matrices, 0 on
    vectors: ``GPTTask.configure_optimizers``' groups) at the training batch size; the learning rate
    rises linearly over ``warmup`` steps to ``peak_lr`` then follows a cosine to ``final_lr`` at the
    last step (the trained run ended at 1e-4, 0.1x its peak 1e-3). ``progressive_keys``: the
    callback's milestones (optimizer steps); ``sensitivity_batches``: the calibration batches on
    which a ``ParamBudget`` measures each layer's effect on the logits (stage compress used all 16)."""

    steps: int = 120
    warmup: int = 10
    peak_lr: float = 3e-4
    final_lr: float = 3e-5
    progressive_keys: tuple[int, ...] = (0, 40, 80)
    sensitivity_batches: int = 4
    window_seed: int = RECOVERY_WINDOW_SEED

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``peak_lr`` for the update after ``step`` optimizer steps (LambdaLR)."""
        return warmup_cosine(step, self.steps, self.warmup, self.final_lr / self.peak_lr)


def recover_setup_for(dry_run: bool, steps: Optional[int] = None) -> RecoverSetup:
    """The protocol of the main results (``steps=None``), or the same with a recovery of ``steps``
    steps, its three milestones at the same shares of it (0, 1/3, 2/3)."""
    rs = RecoverSetup(steps=6, warmup=2, progressive_keys=(0, 2, 4), sensitivity_batches=2) if dry_run else RecoverSetup()
    if steps is None or steps == rs.steps:
        return rs
    return dataclasses.replace(rs, steps=steps, progressive_keys=tuple(round(steps * k / 3) for k in range(3)))


def results_name(rs: RecoverSetup, dry_run: bool) -> str:
    """``compress_trained``, or ``compress_trained_<N>steps`` for another recovery length (its own
    file: a file holds one protocol)."""
    return "compress_trained" if rs == recover_setup_for(dry_run) else f"compress_trained_{rs.steps}steps"


def recovery_windows(setup: Setup, rs: RecoverSetup, seed: int) -> Windows:
    """The recovery run's training windows for ``seed``: ``steps * batch_size`` random windows of the
    training split (``Windows(seed=window_seed + seed)``, none of the training run's generators)."""
    cfg = setup.model
    train, _ = corpus(cfg.corpus)
    return Windows(train, cfg.block, rs.steps * cfg.batch_size, seed=rs.window_seed + seed)


def windows_hash(windows: Windows) -> str:
    return hashlib.sha256(windows.starts.numpy().tobytes()).hexdigest()[:16]


class RecoveryTask(pl.LightningModule):
    """The GPT (``net``) fine-tuned by a Lightning ``Trainer``: the training windows of one seed in
    order, the calibration batches as its ``val_dataloader`` (read only by the callback: training
    split, no held-out data), the optimizer of ``GPTTask`` with the recovery schedule. Records the
    training loss per step and a SHA-256 of every training input it saw (``batches_seen``)."""

    def __init__(self, net: nn.Module, train: Windows, calibration: Windows, batch_size: int, rs: RecoverSetup,
                 teacher: Optional[nn.Module] = None) -> None:  # fmt: skip
        super().__init__()
        self.net, self.rs, self.batch_size = net, rs, batch_size
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []  # not a submodule
        self._train, self._calibration = train, calibration
        self._seen = hashlib.sha256()
        self.train_losses: list[float] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def _loss(self, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self._seen.update(batch[0].numpy().tobytes())
        if self._teacher:
            x, y = batch
            logits = self(x).flatten(0, 1)
            with torch.no_grad():
                target = F.log_softmax(self._teacher[0](x).flatten(0, 1), dim=-1)
            kl = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean")
            loss = (1 - KD_WEIGHT) * F.cross_entropy(logits, y.flatten()) + KD_WEIGHT * kl
        else:
            loss = self._loss(batch)
        self.train_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:  # the callback's statistics only
        self._loss(batch)

    def configure_optimizers(self) -> dict[str, Any]:
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2]
        other = [p for n, p in self.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                lr=self.rs.peak_lr, betas=(0.9, 0.95))  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, self.rs.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=False, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._calibration, batch_size=self.batch_size, shuffle=False)

    @property
    def batches_seen(self) -> str:
        return self._seen.hexdigest()[:16]


class FadingResidual(pl.Callback):
    """Item 4's lever, after StructuredFFN's fading dense path: after a swap, each changed layer's
    output gets ``+ a(t) (x R + r)``, with ``R`` / ``r`` the weight / bias the swap dropped (the layer's
    effective map just before the swap minus the pair's after it: dense [in, out], float32) and
    ``a`` falling linearly from 1 to 0 over ``steps`` optimizer steps; then the hooks go. The dense
    cost is paid only during the fade. Placed after the ``LowRankFactorization`` callback (its swap
    at a step's first batch happens first); with ``initial`` (``{name: dense module}``), the model
    was compressed before training (one-shot) and the fade starts at step 0."""

    def __init__(self, names: list[str], keys: Iterable[int], steps: int, initial: Optional[dict] = None) -> None:
        self.names, self.keys, self.steps, self.initial = names, set(keys), steps, initial
        self.residual: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # name -> (R, r, start step)
        self.handles: list[Any] = []
        self.snapshot: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None
        self.faded_steps = 0

    def _effective(self, net: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's map as the network computes it now: its weights plus the fading residual."""
        out = {}
        for name in self.names:
            w, b = weight_matrix_of(net.get_submodule(name))
            if name in self.residual:
                rw, rb, start = self.residual[name]
                a = self._alpha(start, self._step)
                w, b = w + a * rw.double(), b + a * rb.double()
            out[name] = (w, b)
        return out

    def _alpha(self, start: int, step: int) -> float:
        return max(0.0, 1.0 - (step - start) / self.steps)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step
        if self.initial is not None:  # one-shot: the dense layers it replaced
            dense = {n: weight_matrix_of(m) for n, m in self.initial.items()}
            self._start(pl_module.net, dense, trainer.global_step)
        elif 0 in self.keys:
            self.snapshot = self._effective(pl_module.net)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._step = step = trainer.global_step
        if self.snapshot is not None and step in self.keys:  # the swap of this step just happened
            self._start(pl_module.net, self.snapshot, step)
            self.snapshot = None
        if self.handles and all(self._alpha(start, step) <= 0 for _, _, start in self.residual.values()):
            self._remove()
        self.faded_steps += bool(self.handles)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step in self.keys:  # a milestone applies before the next batch: its map before the swap
            self._step = trainer.global_step
            self.snapshot = self._effective(pl_module.net)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    def _start(self, net: nn.Module, before: dict[str, tuple[torch.Tensor, torch.Tensor]], step: int) -> None:
        self._remove()
        after = {n: weight_matrix_of(net.get_submodule(n)) for n in self.names}  # the new pairs alone
        self.residual = {}
        for name in self.names:
            rw, rb = before[name][0] - after[name][0], before[name][1] - after[name][1]
            if rw.abs().max() > 0:
                self.residual[name] = (rw.float(), rb.float(), step)
        for name, (rw, rb, start) in self.residual.items():
            def hook(module: nn.Module, args: tuple, out: torch.Tensor, rw=rw, rb=rb, start=start) -> torch.Tensor:
                return out + self._alpha(start, self._step) * (args[0] @ rw + rb)

            self.handles.append(net.get_submodule(name).register_forward_hook(hook))

    def _remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class DenseTarget(FreshState):
    """A lever of item 4, what a later milestone fits to: every milestone solves
    ``min ||X W_dense - X A B||`` with ``X`` the layer's inputs in today's network (pairs upstream)
    and ``W_dense`` the trained dense layer's map, kept from before the first swap, instead of the
    current pair's own map (whose error then compounds milestone on milestone). Measured here
    before it becomes a setting: the solver reads the map to fit through ``weight_matrix``, which
    answers with the dense map for the targeted layers while a milestone runs (input-space
    statistics: a projection by the pair's map would not fit the dense one)."""

    def __init__(self, *args: Any, dense: nn.Module, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dense = {f"net.{n}": weight_matrix(dense.get_submodule(n)) for n in target_names(dense)}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        from factorize_plugin.surgery.swap import refactorize as module

        names = {id(pl_module.get_submodule(n)): n for n in self.dense}
        read = module.weight_matrix
        module.weight_matrix = lambda m: self.dense[names[id(m)]] if id(m) in names else read(m)  # type: ignore[assignment]
        try:
            super().on_train_batch_start(trainer, pl_module, batch, idx)
        finally:
            module.weight_matrix = read


def weight_matrix_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [in, out], bias [out], zeros where the layer has none), float64."""
    w, b = weight_matrix(module)
    return w, torch.zeros(w.shape[1], dtype=w.dtype) if b is None else b


def calibration_windows(setup: Setup) -> Windows:
    """The calibration windows of ``calibration_batches`` (the same batches, as a dataset)."""
    cfg = setup.model
    train, _ = corpus(cfg.corpus)
    return Windows(train, cfg.block, setup.calibration_batches * cfg.batch_size, seed=CALIBRATION_SEED)


def fine_tune(net: nn.Module, setup: Setup, rs: RecoverSetup, seed: int, callback: Optional[LowRankFactorization] = None,
              teacher: Optional[nn.Module] = None, extra: Optional[pl.Callback] = None) -> RecoveryTask:  # fmt: skip
    """``rs.steps`` optimizer steps of ``net`` (in place) through a real ``Trainer`` (one epoch of
    exactly those batches; ``check_val_every_n_epoch=2``: no validation run in this one-epoch fit, the
    callback runs its own calibration passes over the ``val_dataloader`` at its milestones)."""
    pl.seed_everything(seed, verbose=False)
    task = RecoveryTask(net, recovery_windows(setup, rs, seed), calibration_windows(setup), setup.model.batch_size, rs,
                        teacher)  # fmt: skip
    callbacks = [c for c in (callback, extra) if c is not None]
    trainer = recovery_trainer(rs.steps, callbacks, limit_val_batches=setup.calibration_batches)
    net.train()  # no dropout or batch norm here: the same arithmetic as eval mode, without Lightning's warning
    trainer.fit(task)
    assert trainer.global_step == rs.steps, (trainer.global_step, rs.steps)
    net.eval()
    return task


def compress_for_recovery(method: str, fraction: float, ctx: Context, rs: RecoverSetup) -> dict[str, Any]:
    """The stage-compress compression behind a one-shot ``*_ft`` method (ParamBudget with a cheaper
    probe: ``sensitivity_batches``): ``{"model", "seconds", "record"}``."""
    model = copy.deepcopy(ctx.trained)
    t0 = time.perf_counter()
    if method.startswith("exact_budget_params_ft"):
        record = solver_record(exact(model, ctx, policy=ParamBudget(fraction), budget_batches=rs.sensitivity_batches))
    else:
        record = compress(method.removesuffix("_ft"), model, fraction, ctx)
    return {"model": model, "seconds": time.perf_counter() - t0, "record": record}


def kept_of_ranks(shapes: dict[str, LayerView], ranks: dict[str, Optional[int]]) -> float:
    """Kept share of the layers' dense weights for ``ranks`` (None: dense)."""
    kept = sum(v.params() if ranks.get(n) is None else ranks[n] * (v.in_dim + v.out_dim) for n, v in shapes.items())
    return kept / sum(v.params() for v in shapes.values())


def progressive_keys(method: str, rs: RecoverSetup) -> tuple[int, ...]:
    """The milestones of a progressive method: ``rs.progressive_keys``, or for ``_early`` (a lever of
    item 4: spacing) the same three milestones at 3/8 of those steps (0, 15, 30 of 120: the target
    is reached a quarter of the way in, leaving 90 steps at the final ranks)."""
    if method.endswith("_early"):
        return tuple(round(k * 3 / 8) for k in rs.progressive_keys)
    return rs.progressive_keys


def make_callback(method: str, fraction: float, rs: RecoverSetup, dense: nn.Module) -> LowRankFactorization:
    schedule = progressive(ParamBudget(fraction), list(progressive_keys(method, rs))) \
        if method.startswith("callback_progressive") else {0: ParamBudget(fraction)}  # fmt: skip
    fit_dense = "_dense" in method  # a lever of item 4: later milestones fit the trained dense map
    # the optimizer-state rule each method was measured with (benchmarks/_state_rules.py); the
    # library's own: callback_switch0 and callback_progressive_carried
    cls = DenseTarget if fit_dense else STATE_RULES.get(method, FreshState)
    extra = {"dense": dense} if fit_dense else {}
    return cls(
        schedule, interval="step", targets=Targets([f"net.{t}" for t in TARGETS], min_params=0, min_features=0),
        statistics=Statistics(max_samples=None, sample_fraction=1.0, space="input" if fit_dense else "auto"),
        speed_guard=False, budget_batches=rs.sensitivity_batches, verbose=False,
        rewarm_steps=0 if method.endswith("_no_rewarm") else "auto",  # a lever of item 4: no learning-rate re-warm
        **extra,
    )  # fmt: skip


def history_record(cb: LowRankFactorization, shapes: dict[str, LayerView]) -> list[dict[str, Any]]:
    """Per applied milestone: its step, the policy, the ranks (keyed like ``shapes``), the kept share."""
    out = []
    for h in cb.history:
        ranks = {n.removeprefix("net."): r for n, r in h["ranks"].items()}
        out.append({"milestone": h["milestone"], "global_step": h["global_step"], "value": h["value"],
                    "statistics": h["statistics"], "ranks": ranks, "kept_fraction": kept_of_ranks(shapes, ranks),
                    "output_nmse": h.get("output_nmse"), "rewarm_steps": h.get("rewarm_steps")})  # fmt: skip
    return json.loads(json.dumps(out, default=str))


def run_recover_cell(method: str, fraction: float, seed: int, ctx: Context, val: list[Batch], setup: Setup,
                     rs: RecoverSetup, compressed: dict[tuple[str, float], dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """One (method, fraction, seed): the model before, ``rs.steps`` steps of recovery, the validation loss."""
    t0, c0 = time.perf_counter(), time.process_time()
    cell: dict[str, Any] = {"target_fraction": None if method == "dense_ft" else fraction, "seed": seed}
    callback = None
    if method == "dense_ft":
        net = copy.deepcopy(ctx.trained)
        cell["val_loss_before"] = None
    elif method in ONE_SHOT_FT:
        base = method.removesuffix("_kd").removesuffix("_fade")  # levers of the recovery, not the compression
        if (base, fraction) not in compressed:  # the same compression for every seed (deterministic)
            entry = compress_for_recovery(base, fraction, ctx, rs)
            entry["val_loss_before"] = mean_loss(entry["model"], val)
            compressed[(base, fraction)] = entry
        entry = compressed[(base, fraction)]
        net = copy.deepcopy(entry["model"])
        cell.update(val_loss_before=entry["val_loss_before"], compress_seconds=entry["seconds"],
                    compress=entry["record"])  # fmt: skip
    elif method in CALLBACKS:
        net = copy.deepcopy(ctx.trained)
        callback = make_callback(method, fraction, rs, ctx.trained)
    else:
        raise ValueError(f"unknown recovery method {method!r}; one of {RECOVER_METHODS}")
    t1 = time.perf_counter()
    teacher = copy.deepcopy(ctx.trained) if "_kd" in method else None  # a lever of item 4: distillation from the dense model
    fade = None
    if method.endswith("_fade"):  # a lever of item 4: the dropped weight fades out after each swap
        names, steps = list(ctx.shapes), max(1, round(FADE_SHARE * rs.steps))
        if callback is None:
            fade = FadingResidual(names, (), steps, initial={n: ctx.trained.get_submodule(n) for n in names})
        else:
            fade = FadingResidual(names, progressive_keys(method, rs), steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = fine_tune(net, setup, rs, seed, callback, teacher, fade)
    train_seconds = time.perf_counter() - t1
    ranks, kept = structure(net, ctx.shapes)
    cell.update({
        "val_loss": mean_loss(net, val), "kept_fraction": kept, "ranks": ranks, "steps": rs.steps,
        "train_loss": [round(v, 5) for v in task.train_losses], "batches_seen": task.batches_seen,
        "windows": windows_hash(task._train), "fine_tune_seconds": train_seconds,
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
        "warnings": sorted({str(w.message)[:300] for w in caught}), "commit": package_version()["commit"],
    })  # fmt: skip
    if fade is not None:
        cell["fade_steps"] = fade.faded_steps
    if callback is not None:
        cell["history"] = history_record(callback, ctx.shapes)
        cell["milestones_applied"] = len(callback.history)
    return cell


def past(deadline: Optional[datetime.datetime]) -> bool:
    return deadline is not None and datetime.datetime.now(datetime.timezone.utc) >= deadline


def stage_recover(result: dict[str, Any], ctx: Context, val: list[Batch], setup: Setup, rs: RecoverSetup,
                  fractions: Iterable[float], seeds: Iterable[int], write: Callable[[], None],
                  deadline: Optional[datetime.datetime] = None, methods: Iterable[str] = RECOVER_METHODS) -> list[str]:  # fmt: skip
    """Runs the missing cells of stage ``recover`` in the order fraction, seed, method (dense_ft once
    per seed, under fraction "1.0"), writing after each; starts none after ``deadline``. Returns the
    cells it ran ("recover/method/fraction/seed")."""
    cells = result["stages"].setdefault("recover", {})
    compressed: dict[tuple[str, float], dict[str, Any]] = {}
    ran = []
    for fraction in fractions:
        for seed in seeds:
            for method in methods:
                if method in LEVERS and fraction != 0.4:
                    continue
                key = DENSE_KEY if method == "dense_ft" else str(fraction)
                if str(seed) in cells.get(method, {}).get(key, {}):
                    continue
                if past(deadline):
                    print(f"deadline {deadline:%H:%M} UTC passed: no new cell started", flush=True)
                    return ran
                cell = run_recover_cell(method, fraction, seed, ctx, val, setup, rs, compressed)
                cells.setdefault(method, {}).setdefault(key, {})[str(seed)] = cell
                ran.append(f"recover/{method}/{key}/{seed}")
                print(f"{method:>24} @ {key} seed {seed}: val loss {cell['val_loss']:.4f} "
                      f"(kept {cell['kept_fraction']:.3f}, {cell['seconds']:.0f} s)", flush=True)  # fmt: skip
                write()
    return ran


def spread(values: list[float]) -> dict[str, Any]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize_recover(result: dict[str, Any]) -> dict[str, Any]:
    """Mean / min / max over seeds per method and fraction, and issue 30's recovery goals on the
    seeds that every compared method has."""
    cells = result["stages"].get("recover", {})
    per_seed = {m: {f: {s: c["val_loss"] for s, c in by_seed.items()} for f, by_seed in cells.get(m, {}).items()}
                for m in RECOVER_METHODS}  # fmt: skip
    table = {m: {f: spread(list(v.values())) for f, v in t.items() if v} for m, t in per_seed.items()}
    dense = per_seed["dense_ft"].get(DENSE_KEY, {})
    goals: dict[str, Any] = {}
    for f in sorted({f for m in RECOVER_METHODS[1:] for f in per_seed[m]}):
        methods = [m for m in RECOVER_METHODS[1:] if per_seed[m].get(f)]
        seeds = sorted(set(dense).intersection(*(per_seed[m][f] for m in methods)))
        if not seeds:
            continue
        mean = {m: sum(per_seed[m][f][s] for s in seeds) / len(seeds) for m in methods}
        one_shot = [m for m in ONE_SHOT_FT if m in methods]
        callbacks = [m for m in CALLBACKS if m in methods]
        entry: dict[str, Any] = {"seeds": seeds, "mean": mean, "dense_ft_mean": sum(dense[s] for s in seeds) / len(seeds)}
        entry["vs_dense_ft"] = {m: {s: per_seed[m][f][s] / dense[s] - 1 for s in seeds} for m in methods}
        best_all = min(methods, key=mean.get)
        worst_rel = max(entry["vs_dense_ft"][best_all].values())
        entry["best"] = {"method": best_all, "worst_seed_vs_dense_ft": worst_rel}
        limit = {"0.6": 0.01, "0.4": 0.03}.get(f)
        if limit is not None:
            entry["within_of_dense_ft"] = {"limit": limit, "holds": worst_rel <= limit}
        if one_shot and callbacks:
            bo, bc = min(one_shot, key=mean.get), min(callbacks, key=mean.get)
            per = {}
            for s in seeds:
                o, c, d = per_seed[bo][f][s], per_seed[bc][f][s], dense[s]
                closed = (o - c) / (o - d) if o > d else None
                ok = c < o and (closed >= 0.3 if closed is not None else c <= o * (1 - 0.005))
                per[s] = {"one_shot": o, "callback": c, "dense_ft": d, "gap_closed": closed, "holds": ok}
            entry["callback_vs_one_shot"] = {"best_one_shot": bo, "best_callback": bc, "per_seed": per,
                                             "holds_on_every_seed": all(p["holds"] for p in per.values())}  # fmt: skip
        goals[f] = entry
    return {"val_loss": table, "per_seed": per_seed, "goals": goals}


def plot_recover(result: dict[str, Any], path: Path) -> bool:
    """Validation loss after recovery against the kept fraction, one line per method (mean over seeds,
    bars: min to max), the fine-tuned dense model as a dashed line with its seeds' range shaded, the
    trained dense model before recovery dotted (before recovery the compressed models are in
    ``compress_trained.png``). False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["stages"].get("recover", {})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"svd_ft": "o-", "exact_uniform_ft": "^-", "exact_budget_params_ft": "D-", "exact_budget_params_ft_kd": "d:",
              "callback_progressive": "*-", "callback_progressive_carried": "p-", "callback_switch0": "s--", "callback_progressive_no_rewarm": "x:",
              "callback_progressive_early": "P:", "callback_progressive_kd": "h:",
              "exact_budget_params_ft_fade": "v:", "callback_progressive_fade": "<:"}  # fmt: skip
    shown = [m for m in RECOVER_METHODS[1:] if m not in LEVERS or m == "exact_budget_params_ft_kd"]  # (the best lever)
    for i, method in enumerate(shown):
        pts = []
        for by_seed in cells.get(method, {}).values():
            losses = [c["val_loss"] for c in by_seed.values()]
            kept = sum(c["kept_fraction"] for c in by_seed.values()) / len(by_seed)
            pts.append((kept + (i - len(shown) / 2) * 0.003, sum(losses) / len(losses), min(losses), max(losses), len(losses)))
        if pts:
            pts.sort()
            x, m, lo, hi, n = zip(*pts)
            ax.errorbar(x, m, yerr=[[a - b for a, b in zip(m, lo)], [b - a for a, b in zip(m, hi)]], fmt=styles[method],
                        ms=5, capsize=3, label=f"{method} (seeds: {min(n)}-{max(n)})" if min(n) != max(n) else
                        f"{method} ({n[0]} seeds)")  # fmt: skip
    dense = [c["val_loss"] for c in cells.get("dense_ft", {}).get(DENSE_KEY, {}).values()]
    if dense:
        mean = sum(dense) / len(dense)
        ax.axhline(mean, color="k", ls="--", lw=1, label=f"dense_ft ({mean:.4f}, {len(dense)} seeds)")
        ax.axhspan(min(dense), max(dense), color="k", alpha=0.08)
    ax.axhline(result["dense"]["val_loss"], color="gray", ls=":", lw=1,
               label=f"trained dense, no recovery ({result['dense']['val_loss']:.4f})")  # fmt: skip
    ax.set_xlabel("kept fraction of the targeted layers' weights")
    ax.set_ylabel("validation loss (nats / byte) after recovery")
    m, r = result["setup"]["model"], result.get("recover_setup", {})
    ax.set_title(f"trained GPT (d={m['dim']}, {m['layers']} layers, {m['steps']} steps) + {r.get('steps')} recovery steps;"
                 " mean, min-max over seeds", fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ stage "scratch"


def gpt_params(dim: int, cfg: TrainedGPTConfig) -> int:
    """Parameters of the GPT of ``cfg`` at width ``dim`` (the tied head counted once)."""
    per_block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim)
    return 256 * dim + cfg.block * dim + cfg.layers * per_block + 2 * dim


def scratch_width(target_params: int, cfg: TrainedGPTConfig) -> int:
    """The width (a multiple of the heads, so that every head has an integer width) whose dense GPT's
    parameter count is nearest ``target_params``."""
    return min(range(cfg.heads, cfg.dim + 1, cfg.heads), key=lambda d: abs(gpt_params(d, cfg) - target_params))


def summarize_scratch(result: dict[str, Any]) -> dict[str, Any]:
    """Issue 30's goal: the compressed and recovered model (each method's mean over seeds) against
    the same-size dense model trained from scratch for the same total steps (its best seed: the
    recovered model has to beat every seed of it)."""
    out = {}
    recovered = result.get("summary", {}).get("recover", {}).get("val_loss", {})
    for f, seeds in result["stages"].get("scratch", {}).items():
        losses = [cell["val_loss"] for cell in seeds.values()]
        means = {m: t[f]["mean"] for m, t in recovered.items() if f in t}
        out[f] = {"scratch_val_loss": statistics.fmean(losses), "scratch_val_loss_best": min(losses),
                  "scratch_val_loss_per_seed": {s: c["val_loss"] for s, c in seeds.items()},
                  "recovered_mean": means,
                  "recovered_beat_scratch": {m: v < min(losses) for m, v in means.items()}}  # fmt: skip
    return out


def stage_scratch(result: dict[str, Any], ctx: Context, setup: Setup, rs: RecoverSetup, val: list[Batch],
                  cache_root: Optional[Path], write: Callable[[], None], seeds: Sequence[int],
                  fraction: float = 0.4) -> list[str]:  # fmt: skip
    """A dense GPT of the compressed model's parameter count (``exact_budget_params_ft`` at
    ``fraction``: every parameter, the untouched embeddings, norms and biases included) trained from
    scratch for the trained model's steps plus the recovery's with the original recipe
    (``examples/trained_gpt.py``), from each of ``seeds``, each cached like the trained model."""
    cells = result["stages"].setdefault("scratch", {}).setdefault(str(fraction), {})
    cfg = setup.model
    recovered = result["stages"].get("recover", {}).get("exact_budget_params_ft", {}).get(str(fraction), {})
    kept = next(iter(recovered.values()))["kept_fraction"] if recovered else fraction
    dense_total = gpt_params(cfg.dim, cfg)
    targeted = sum(v.params() for v in ctx.shapes.values())
    target_params = round(dense_total - (1 - kept) * targeted)
    width = scratch_width(target_params, cfg)
    epochs = cfg.epochs + max(1, round(cfg.epochs * rs.steps / cfg.steps))
    steps = cfg.steps + rs.steps
    while steps % epochs:
        epochs += 1
    ran = []
    for seed in seeds:
        if str(seed) in cells:
            continue
        config = dataclasses.replace(cfg, dim=width, steps=steps, epochs=epochs, seed=seed)
        t0 = time.perf_counter()
        model, info = load_trained_gpt(config, cache_root, progress=lambda s: print(s, flush=True))
        cell = cells[str(seed)] = {
            "fraction": fraction, "kept_fraction": kept, "target_params": target_params, "width": width,
            "params": sum(p.numel() for p in model.parameters()), "config": dataclasses.asdict(config),
            "val_loss": mean_loss(model, val), "train_seconds": info["train_seconds"],
            "train_cpu_seconds": info["train_cpu_seconds"], "cached": info["cached"],
            "seconds": time.perf_counter() - t0, "val_curve": info["val_curve"], "commit": package_version()["commit"],
        }  # fmt: skip
        print(f"scratch d={width} seed {seed} ({cell['params']} params, target {target_params}) {steps} steps: "
              f"val loss {cell['val_loss']:.4f}", flush=True)  # fmt: skip
        write()
        ran.append(f"scratch/{fraction}/{seed}")
    return ran


# ------------------------------------------------------------------------------ stage "inference"

INFERENCE_ROUNDS = 15  # alternating rounds (dense, compressed) per fraction; the ratio is their median


def with_ranks(model: nn.Module, shapes: dict[str, LayerView], ranks: dict[str, Optional[int]]) -> nn.Module:
    """A copy of ``model`` with each layer of ``ranks`` a pair of that rank (None: dense), the
    structure a recovery cell ended with; the factors are its weight's truncated SVD (the timing
    depends on the shapes only)."""
    out = copy.deepcopy(model)
    for name, rank in ranks.items():
        if rank is not None:
            linear = out.get_submodule(name)
            wa, wb = svd_factors(linear.weight, rank)
            set_submodule(out, name, FactorizedLinear.from_linear(linear, wa, wb, linear.bias))
    return out


def forward_seconds(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Seconds per forward of ``x`` (eval, no grad): the best of ``repeats`` after a warm-up."""
    model.eval()
    with torch.no_grad():
        model(x)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    return best


def stage_inference(result: dict[str, Any], ctx: Context, val: list[Batch], setup: Setup,
                    write: Callable[[], None]) -> list[str]:  # fmt: skip
    """The compressed model's inference against dense (issue 30's last goal: >= 1.3x at 40 % kept):
    a batch of 64 validation windows, one thread, eval mode, for each kept fraction that has
    recovery cells (the ranks of ``callback_switch0``, seed 0: the exact budgeted one-shot's
    structure) and the uniform exact rank; ``INFERENCE_ROUNDS`` alternating rounds of the two
    models (each the best of 3 forwards), the speedup their median ratio. A cell already measured
    is kept (delete ``stages.inference`` to measure again)."""
    x = torch.cat([b[0] for b in val])[:64]
    cells: dict[str, Any] = result["stages"].setdefault("inference", {})
    ran = []
    switch = result["stages"].get("recover", {}).get("callback_switch0", {})
    structures = {f"budget_{f}": c["0"]["ranks"] for f, c in switch.items() if "0" in c}
    uniform = result["setup_detail"]["uniform_ranks"]
    for f in switch:
        structures[f"uniform_{f}"] = {n: admissible(v, uniform[f]) for n, v in ctx.shapes.items()}
    for key, ranks in structures.items():
        if key in cells:
            continue
        compressed = with_ranks(ctx.trained, ctx.shapes, ranks)
        ratios, dense_s, comp_s = [], [], []
        for _ in range(INFERENCE_ROUNDS):
            d, c = forward_seconds(ctx.trained, x, 3), forward_seconds(compressed, x, 3)
            dense_s.append(d)
            comp_s.append(c)
            ratios.append(d / c)
        cells[key] = {"kept_fraction": kept_of_ranks(ctx.shapes, ranks), "speedup": statistics.median(ratios),
                      "speedup_min": min(ratios), "speedup_max": max(ratios),
                      "dense_ms": 1e3 * statistics.median(dense_s), "compressed_ms": 1e3 * statistics.median(comp_s),
                      "batch": list(x.shape), "threads": torch.get_num_threads()}  # fmt: skip
        print(f"inference {key}: {cells[key]['speedup']:.2f}x dense ({cells[key]['compressed_ms']:.1f} ms vs "
              f"{cells[key]['dense_ms']:.1f} ms)", flush=True)  # fmt: skip
        ran.append(f"inference/{key}")
        write()
    return ran


# ----------------------------------------------------------------------------------------- main


def stage_compress(result: dict[str, Any], ctx: Context, val: list[Batch], setup: Setup,
                   write: Callable[[], None]) -> list[str]:  # fmt: skip
    """Runs the missing (method, fraction) cells of stage ``compress``, writing after each; returns
    the cells it ran ("method/fraction")."""
    cells = result["stages"].setdefault("compress", {})
    ran = []
    for fraction in setup.fractions:
        for method in METHODS:
            key = str(fraction)
            if key in cells.get(method, {}):
                continue
            cell = cells.setdefault(method, {})[key] = run_cell(method, fraction, ctx, val)
            ran.append(f"{method}/{key}")
            print(f"{method:>20} @ {fraction:.1f}: val loss {cell['val_loss']:.4f} (kept {cell['kept_fraction']:.3f}, "
                  f"{cell['compress_seconds']:.1f} s)", flush=True)  # fmt: skip
            write()
    return ran


def deadline_of(text: Optional[str]) -> Optional[datetime.datetime]:
    """``"HH:MM"`` (UTC, today) -> an aware datetime; None stays None."""
    if text is None:
        return None
    hour, minute = map(int, text.split(":"))
    return datetime.datetime.now(datetime.timezone.utc).replace(hour=hour, minute=minute, second=0, microsecond=0)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=(*STAGES, "all"), default=None,
                        help="default: compress (the dry run: all)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="tiny model, few steps, written under a temp folder")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results; dry run: a temp folder)")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(RECOVER_FRACTIONS), help="stage recover, in order")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(RECOVER_SEEDS), help="the seeds of stages recover and scratch")
    parser.add_argument("--deadline", default=None, help="HH:MM UTC: stage recover starts no cell after it")
    parser.add_argument("--methods", nargs="+", choices=RECOVER_METHODS, default=list(RECOVER_METHODS),
                        help="stage recover's methods (item 4's levers run at 40 %% kept only)")  # fmt: skip
    parser.add_argument("--recover-steps", type=int, default=None,
                        help="another recovery length (default 120; its own results file)")  # fmt: skip
    args = parser.parse_args(argv)
    stage = args.stage or ("all" if args.dry_run else "compress")
    torch.set_num_threads(1)
    setup, rs = setup_for(args.dry_run), recover_setup_for(args.dry_run, args.recover_steps)
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "compress_trained_dry_run" if args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    cache_root = out / "trained_gpt_cache" if args.dry_run else None
    trained, info = load_trained_gpt(setup.model, cache_root, progress=lambda s: print(s, flush=True))
    curve = out / "trained_gpt_curve.json"
    if not curve.exists() or json.loads(curve.read_text()).get("key") != info["key"]:  # the committed record stays
        write_curve(info, curve, curve.with_suffix(".png"))
    path = out / f"{results_name(rs, args.dry_run)}.json"
    result = load_results(path, setup)
    if stage in ("recover", "scratch", "inference", "all"):
        record = json.loads(json.dumps(dataclasses.asdict(rs)))
        if result.get("recover_setup", record) != record:
            raise SystemExit(f"{path} holds recovery cells of another protocol: {result['recover_setup']} (now {record})")
        result["recover_setup"] = record
    result["trained"] = {k: info[k] for k in ("key", "steps", "final_val_loss", "train_seconds", "train_cpu_seconds")}
    calibration, val = calibration_batches(setup), validation_batches(setup)
    if "dense" not in result:
        result["dense"] = {"val_loss": mean_loss(trained, val), "calibration_loss": mean_loss(trained, calibration)}
    names = target_names(trained)
    ctx = Context(trained, calibration, views(trained, names), setup.asvd_alpha)
    result["setup_detail"] = {"layers": names, "uniform_ranks": {str(f): uniform_rank(ctx.shapes, f) for f in setup.fractions}}
    write = lambda: save(result, path)  # noqa: E731
    ran: list[str] = []
    if stage in ("compress", "all"):
        ran += stage_compress(result, ctx, val, setup, write)
    if stage in ("recover", "all"):
        ran += stage_recover(result, ctx, val, setup, rs, args.fractions, args.seeds, write, deadline_of(args.deadline),
                             args.methods)  # fmt: skip
    if stage in ("scratch", "all"):
        ran += stage_scratch(result, ctx, setup, rs, val, cache_root, write, args.seeds)
    if stage in ("inference", "all"):
        ran += stage_inference(result, ctx, val, setup, write)
    result["summary"] = {"compress": summarize_compress(result)}
    if result["stages"].get("recover"):
        result["summary"]["recover"] = summarize_recover(result)
    if result["stages"].get("scratch"):
        result["summary"]["scratch"] = summarize_scratch(result)
    result["last_run"] = {"stage": stage, "ran": ran}
    save(result, path)
    png = path.with_suffix(".png")
    plotted = bool(result["stages"].get("compress")) and plot(result, png)
    if result["stages"].get("recover"):
        plot_recover(result, path.with_name(f"{path.stem}_recover.png"))
        print(json.dumps(result["summary"]["recover"]["goals"], indent=1))
    if result["stages"].get("compress"):
        print(json.dumps(result["summary"]["compress"]["goal_exact_below_svd_and_asvd"], indent=1))
    print(f"wrote {path}" + (f" and {png}" if plotted else ""))
    return result


if __name__ == "__main__":
    main()
