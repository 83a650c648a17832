"""Compressing a model that is already trained (issue 30, item 3): the GPT of
``examples/trained_gpt.py`` (trained 960 steps on the standard library, CPU configuration) at 80 /
60 / 40 / 20 % of the targeted layers' weights kept.

    python benchmarks/bench_compress_trained.py [--stage compress]      # resumes from its JSON
    python benchmarks/bench_compress_trained.py --dry-run [--out DIR]   # tiny model, seconds (tested)

Stage ``compress`` (this file's only stage so far; ``recover`` and ``scratch`` will add their own
sections to the same JSON): the validation loss right after compression, no training, by

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
import json
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from benchmarks._common import package_version
from examples.gpt_task import Windows, corpus
from examples.trained_gpt import TrainedGPTConfig, dry_run_config, load_trained_gpt, mean_loss, write_curve
from factorize_plugin import FactorizedLinear, ParamBudget, factorize_model
from factorize_plugin.layers.adapters import LayerView, layer_view
from factorize_plugin.surgery.candidates import admissible
from factorize_plugin.surgery.modules import match_names, set_submodule

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (0.8, 0.6, 0.4, 0.2)
TARGETS = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc", "blocks.*.mlp.proj")
METHODS = ("svd", "asvd", "exact_uniform", "exact_budget_params", "exact_budget_macs")
UNIFORM = ("svd", "asvd", "exact_uniform")  # one rank everywhere: the same layers kept dense, the same weights
ASVD_ALPHA = 0.5
CALIBRATION_SEED = 1  # the training run drew its windows with seed 0 (generators 0..epochs-1); this draws 7919
STAGES = ("compress",)

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
    return factorize_model(model, ctx.calibration, targets=list(TARGETS), min_params=0, min_features=0,
                           speed_guard=False, **policy)  # fmt: skip


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


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=STAGES, default="compress")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, few steps, written under a temp folder")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results; dry run: a temp folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = setup_for(args.dry_run)
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "compress_trained_dry_run" if args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    cache_root = out / "trained_gpt_cache" if args.dry_run else None
    trained, info = load_trained_gpt(setup.model, cache_root, progress=lambda s: print(s, flush=True))
    curve = out / "trained_gpt_curve.json"
    if not curve.exists() or json.loads(curve.read_text()).get("key") != info["key"]:  # the committed record stays
        write_curve(info, curve, curve.with_suffix(".png"))
    path = out / "compress_trained.json"
    result = load_results(path, setup)
    result["trained"] = {k: info[k] for k in ("key", "steps", "final_val_loss", "train_seconds", "train_cpu_seconds")}
    calibration, val = calibration_batches(setup), validation_batches(setup)
    if "dense" not in result:
        result["dense"] = {"val_loss": mean_loss(trained, val), "calibration_loss": mean_loss(trained, calibration)}
    names = target_names(trained)
    ctx = Context(trained, calibration, views(trained, names), setup.asvd_alpha)
    result["setup_detail"] = {"layers": names, "uniform_ranks": {str(f): uniform_rank(ctx.shapes, f) for f in setup.fractions}}
    ran = stage_compress(result, ctx, val, setup, lambda: save(result, path))
    result["summary"] = {"compress": summarize_compress(result)}
    result["last_run"] = {"stage": args.stage, "ran": ran}
    save(result, path)
    plotted = plot(result, out / "compress_trained.png")
    print(json.dumps(result["summary"]["compress"]["goal_exact_below_svd_and_asvd"], indent=1))
    print(f"wrote {path}" + (f" and {out / 'compress_trained.png'}" if plotted else " (no matplotlib: no PNG)"))
    return result


if __name__ == "__main__":
    main()
