"""End-to-end accuracy vs compute on a real task (issue 7, item 4).

Fashion-MNIST (the Debian package ``dataset-fashion-mnist``): a seeded subset of ``--limit``
images of the training pool (default 6,000: 4,800 train / 1,200 validation; the split depends on
the seed) and all 10,000 test images for the reported accuracy. Model:
``MNISTClassifier(channels=(16, 32, 32), hidden=128)``, Adam lr 5e-3 (the best of 1e-3, 3e-3, 5e-3,
8e-3 for the dense model on seed 0), cosine over the run, batch 128, 8 epochs, on the CPU with one
torch thread per worker process.

Factorized layers (the same in every method): ``features.2`` (3x3 conv 16->32 at 28x28, 63 % of
the model's multiply-adds), ``features.5`` (3x3 conv 32->32 at 14x14), ``classifier.0``
(1568->128), ``classifier.2`` (128->128); the first conv (1 input channel) and the 10-class head stay
dense. ``min_features=16`` so that the 16-channel conv counts (the callback's default, 32, would
leave the largest layer dense). Together they hold 98 % of the model's multiply-adds.

Compression levels are rank fractions of each layer's min(in, out) channels/features (the
callback's ``mode="rank"``): 0.625, 0.3125, 0.15625, which keep about 1/2, 1/4 and 1/8 of the
factorized layers' multiply-adds. The same ranks in every method (checked), and a layer whose rank
would not save multiply-adds stays dense (``classifier.2`` at 0.625). Methods, all trained for the
same total number of epochs E:

* ``dense``: the baseline.
* ``init``: factorized at initialization at the target ranks, as Composer's Factorize does
  (``FactorizedLinear.from_linear`` / ``FactorizedConv2d.from_conv2d`` build the pair and call
  ``reset_parameters``: both factors get PyTorch's default random init), then trained E epochs.
* ``init_svd`` (optional, ``--methods``): the same, but the pair starts from the truncated SVD of
  the dense layer's random init (so it starts at the dense layer's scale).
* ``oneshot``: dense for E_d = round(0.7 E) epochs (its own cosine over E_d), then
  ``factorize_model(rank=fraction)`` on the validation images (the same statistics settings as the
  callback: ``max_samples=100_000``, ``sample_fraction="auto"``, ``space="auto"``), then E - E_d
  epochs of fine-tuning with a new Adam (lr ``--ft-lr`` = 3e-4, the best of 3e-4, 1e-3, 3e-3 on the
  validation images for seed 0, cosine over those epochs). The dense part is shared by the levels
  of one seed.
* ``late``: the ``LowRankFactorization`` callback with one milestone, the target fraction from
  epoch round(0.7 E) (data-aware, one step, in the same run: optimizer and cosine continue).
* ``progressive``: the callback with two milestones: rank sqrt(fraction) from epoch round(0.4 E),
  the target fraction from epoch round(0.7 E).

Reported per run: test accuracy, the ranks, weights and multiply-adds (per image) of the factorized
layers and of the whole model, measured on the final model. Aggregates: mean and sample std over
the seeds, and the paired (same seed: same split, same initial weights) difference to dense.

    python benchmarks/bench_accuracy_vs_compute.py [--quick] [--workers 2]

Writes benchmarks/results/accuracy_vs_compute.json and .png (``--quick``: *_quick.*).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from _common import package_version  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["features.2", "features.5", "classifier.0", "classifier.2"]
MIN_FEATURES = 16
MODEL_KW = dict(image_size=28, channels=(16, 32, 32), hidden=128, lr=5e-3, scheduler="cosine")
METHODS = ("dense", "init", "init_svd", "oneshot", "late", "progressive")
DEFAULT_METHODS = ("dense", "init", "oneshot", "late", "progressive")


# ----------------------------------------------------------------------- worker side
def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401 - creates its loggers

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "factorize_plugin")):
            logging.getLogger(name).setLevel(logging.ERROR)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _quiet()


def _data(cfg: dict, seed: int):
    from examples.tasks.mnist import FASHION_MNIST_DIR, MNISTDataModule, _load_fashion_mnist, _to_dataset

    dm = MNISTDataModule(source="fashion-mnist", batch_size=cfg["batch_size"], limit=cfg["limit"], seed=seed)
    dm.setup()
    _, _, x_test, y_test = _load_fashion_mnist(FASHION_MNIST_DIR)
    dm.test_set = _to_dataset(x_test, y_test, 255.0)  # all 10,000 test images (``limit`` would cap them)
    return dm


def _trainer(epochs: int, callbacks=()):
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=list(callbacks), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip


def _model(seed: int, epochs: int, **over):
    import lightning.pytorch as pl

    from examples.tasks.mnist import MNISTClassifier

    pl.seed_everything(seed, verbose=False)
    return MNISTClassifier(**dict(MODEL_KW, max_epochs_hint=epochs, **over))


def test_accuracy(model, dm) -> float:
    import torch

    x, y = dm.test_set.tensors
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), 1000):
            correct += int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum())
    return correct / len(y)


def measure(model) -> dict:
    """Weights and multiply-adds per 28x28 image, per targeted layer and for the whole model."""
    import torch
    import torch.nn as nn

    from factorize_plugin.layers import FactorizedConv2d, FactorizedLinear

    macs: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod, args, out, name=name):
                if isinstance(mod, nn.Linear):
                    macs[name] = mod.in_features * mod.out_features
                else:
                    k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                    macs[name] = out.shape[-1] * out.shape[-2] * mod.out_channels * k
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    model.train(was)
    for h in hooks:
        h.remove()
    layers = {}
    for t in TARGETS:
        mod = model.get_submodule(t)
        rank = mod.rank if isinstance(mod, (FactorizedLinear, FactorizedConv2d)) else None
        weights = sum(p.numel() for n, p in mod.named_parameters() if n.endswith("weight"))
        layers[t] = {
            "rank": rank,
            "weights": weights,
            "macs": sum(v for k, v in macs.items() if k == t or k.startswith(t + ".")),
        }
    return {
        "layers": layers,
        "target_weights": sum(v["weights"] for v in layers.values()),
        "target_macs": sum(v["macs"] for v in layers.values()),
        "model_params": sum(p.numel() for p in model.parameters()),
        "model_macs": sum(macs.values()),
    }


def _ranks_for(model, fraction: float) -> dict:
    """The ranks the callback's ``mode="rank"`` gives each targeted layer (None: stays dense)."""
    from factorize_plugin.core.solver import resolve_rank
    from factorize_plugin.layers import layer_view

    out = {}
    for t in TARGETS:
        v = layer_view(model.get_submodule(t))
        r = resolve_rank(fraction, v.rank_base, v.rank_base)
        out[t] = None if r > v.max_useful_rank else r
    return out


def factorize_at_init(model, fraction: float, svd: bool) -> None:
    """Composer-style: every targeted layer becomes a pair at the target rank before training."""
    import torch

    from factorize_plugin.layers import FactorizedConv2d, FactorizedLinear, install_factors, weight_matrix
    from factorize_plugin.surgery.select.modules import set_submodule

    for name, rank in _ranks_for(model, fraction).items():
        if rank is None:
            continue
        dense = model.get_submodule(name)
        w, b = weight_matrix(dense)  # [D, M] float64
        if svd:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            root = s[:rank].sqrt()
            wa, wb = u[:, :rank] * root, root[:, None] * vh[:rank]
        else:
            wa, wb = torch.zeros(w.shape[0], rank, dtype=w.dtype), torch.zeros(rank, w.shape[1], dtype=w.dtype)
        pair = install_factors(dense, wa, wb, b)
        if not svd:  # Composer's from_linear / from_conv2d: reset_parameters() of both factors
            assert isinstance(pair, (FactorizedLinear, FactorizedConv2d))
            pair.first.reset_parameters()
            pair.second.reset_parameters()
        set_submodule(model, name, pair)


def _record(method: str, fraction, seed: int, model, dm, t0: float, **extra) -> dict:
    return dict(
        method=method, fraction=fraction, seed=seed, test_acc=test_accuracy(model, dm), wall_s=time.perf_counter() - t0,
        **measure(model), **extra,
    )  # fmt: skip


def run_job(job: dict) -> list[dict]:
    """One job: a (method, fraction, seed) run, or for ``oneshot`` the shared dense part and every level."""
    _quiet()
    cfg, method, seed = job["cfg"], job["method"], job["seed"]
    E = cfg["epochs"]
    t0 = time.perf_counter()
    dm = _data(cfg, seed)
    if method == "dense":
        model = _model(seed, E)
        _trainer(E).fit(model, dm)
        return [_record("dense", None, seed, model, dm, t0)]
    if method in ("init", "init_svd"):
        out = []
        for f in job["fractions"]:
            t0 = time.perf_counter()
            model = _model(seed, E)
            factorize_at_init(model, f, svd=method == "init_svd")
            _trainer(E).fit(model, dm)
            out.append(_record(method, f, seed, model, dm, t0))
        return out
    if method == "oneshot":
        from factorize_plugin import Statistics
        from factorize_plugin.surgery.oneshot import factorize_model

        e_dense = cfg["oneshot_epoch"]
        dense = _model(seed, e_dense)
        _trainer(e_dense).fit(dense, dm)
        dense_acc = test_accuracy(dense, dm)
        shared_s = time.perf_counter() - t0
        out = []
        for f in job["fractions"]:
            t1 = time.perf_counter()
            model = copy.deepcopy(dense)
            reports = factorize_model(
                model, dm.val_dataloader(), rank=f, targets=TARGETS, input_fn=lambda b: b[0],
                statistics=Statistics(max_samples=100_000, sample_fraction="auto", space="auto"),
            )  # fmt: skip
            acc_after_factorize = test_accuracy(model, dm)
            model.hparams.lr = cfg["ft_lr"]
            model.hparams.max_epochs_hint = E - e_dense
            _trainer(E - e_dense).fit(model, dm)
            rec = _record(
                "oneshot", f, seed, model, dm, t1, dense_part_acc=dense_acc, acc_before_finetune=acc_after_factorize,
                dense_part_wall_s=shared_s, nmse={r.name: r.nmse for r in reports},
            )  # fmt: skip
            out.append(rec)
        return out
    if method in ("progressive", "late"):
        from factorize_plugin import LowRankFactorization, Targets

        out = []
        for f in job["fractions"]:
            t0 = time.perf_counter()
            if method == "progressive":
                schedule = {cfg["milestones"][0]: math.sqrt(f), cfg["milestones"][1]: f}
            else:
                schedule = {cfg["milestones"][1]: f}
            cb = LowRankFactorization(schedule, mode="rank", targets=Targets(TARGETS, min_features=MIN_FEATURES), verbose=False)
            model = _model(seed, E)
            _trainer(E, [cb]).fit(model, dm)
            hist = [
                {"epoch": h["epoch"], "value": h["value"], "ranks": h["ranks"], "nmse": h["nmse"], "statistics": h["statistics"]}
                for h in cb.history
            ]
            out.append(_record(method, f, seed, model, dm, t0, schedule={str(k): v for k, v in schedule.items()}, history=hist))
        return out
    raise ValueError(method)


# ----------------------------------------------------------------------- aggregation
def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _model_macs_at(ranks: dict) -> int:
    """Multiply-adds per image of the whole model with the targeted layers at ``ranks`` (None: dense)."""
    import torch

    from factorize_plugin.layers import install_factors, weight_matrix
    from factorize_plugin.surgery.select.modules import set_submodule

    model = _model(0, 1)
    for name, r in ranks.items():
        if r is not None:
            w, b = weight_matrix(model.get_submodule(name))
            wa, wb = torch.zeros(w.shape[0], r, dtype=w.dtype), torch.zeros(r, w.shape[1], dtype=w.dtype)
            set_submodule(model, name, install_factors(model.get_submodule(name), wa, wb, b))
    return measure(model)["model_macs"]


def train_macs_fraction(run: dict, cfg: dict, dense_macs: int) -> float:
    """Forward multiply-adds spent on the training images over the whole run, as a fraction of the
    dense run's (backward is about twice the forward for every layer, so the ratio holds for
    forward + backward); validation and statistics passes are not counted."""
    E = cfg["epochs"]
    final = {t: v["rank"] for t, v in run["layers"].items()}
    m1, m2 = cfg["milestones"]
    phases = {
        "dense": [(E, {})],
        "init": [(E, final)],
        "init_svd": [(E, final)],
        "oneshot": [(cfg["oneshot_epoch"], {}), (E - cfg["oneshot_epoch"], final)],
        "late": [(m2, {}), (E - m2, final)],
    }.get(run["method"])
    if phases is None:  # progressive: the ranks in force after each milestone
        hist = run["history"]
        phases = [(m1, {})] + [
            ((hist[i + 1]["epoch"] if i + 1 < len(hist) else E) - h["epoch"], h["ranks"]) for i, h in enumerate(hist)
        ]
    return sum(n * _model_macs_at(r) for n, r in phases) / (E * dense_macs)


def aggregate(runs: list[dict], dense_ref: dict, cfg: Optional[dict] = None) -> list[dict]:
    dense_by_seed = {r["seed"]: r["test_acc"] for r in runs if r["method"] == "dense"}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["fraction"]), []).append(r)
    rows = []
    for (method, f), rs in sorted(groups.items(), key=lambda kv: (METHODS.index(kv[0][0]), -(kv[0][1] or 1.0))):
        acc_m, acc_s = _mean_std([100 * r["test_acc"] for r in rs])
        diffs = [100 * (r["test_acc"] - dense_by_seed[r["seed"]]) for r in rs if r["seed"] in dense_by_seed]
        d_m, d_s = _mean_std(diffs) if diffs else (float("nan"), float("nan"))
        m0 = rs[0]
        ranks = {t: v["rank"] for t, v in m0["layers"].items()}
        rows.append(
            dict(
                method=method, fraction=f, n=len(rs), acc_mean=acc_m, acc_std=acc_s, diff_vs_dense_mean=d_m, diff_vs_dense_std=d_s,
                ranks=ranks, ranks_identical_over_seeds=all({t: v["rank"] for t, v in r["layers"].items()} == ranks for r in rs),
                target_weights_kept=m0["target_weights"] / dense_ref["target_weights"],
                target_macs_kept=m0["target_macs"] / dense_ref["target_macs"],
                model_params_kept=m0["model_params"] / dense_ref["model_params"],
                model_macs_kept=m0["model_macs"] / dense_ref["model_macs"],
                wall_s_mean=statistics.fmean(r["wall_s"] for r in rs),
            )
        )  # fmt: skip
        if cfg is not None:
            rows[-1]["train_macs_fraction"] = statistics.fmean(train_macs_fraction(r, cfg, dense_ref["model_macs"]) for r in rs)
    return rows


def verdict(rows: list[dict]) -> dict:
    """The issue's goal at the level closest to half of the factorized layers' multiply-adds."""
    prog = [r for r in rows if r["method"] == "progressive"]
    if not prog:
        return {"evaluated": False}
    level = min(prog, key=lambda r: abs(r["target_macs_kept"] - 0.5))
    f = level["fraction"]
    by = {r["method"]: r for r in rows if r["fraction"] == f}
    dense = next(r for r in rows if r["method"] == "dense")
    out = {
        "evaluated": True,
        "fraction": f,
        "target_macs_kept": level["target_macs_kept"],
        "dense_acc": dense["acc_mean"],
        "progressive_acc": level["acc_mean"],
        "progressive_minus_dense_pp": level["diff_vs_dense_mean"],
        "progressive_minus_dense_pp_std_over_seeds": level["diff_vs_dense_std"],
        "loses_at_most_0.5pp": level["diff_vs_dense_mean"] >= -0.5,
    }
    for other in ("init", "init_svd", "oneshot", "late"):
        if other in by:
            out[f"{other}_acc"] = by[other]["acc_mean"]
            out[f"beats_{other}"] = level["acc_mean"] > by[other]["acc_mean"]
    out["goal_met"] = bool(out["loses_at_most_0.5pp"] and out.get("beats_init", False))
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    dense = next(r for r in rows if r["method"] == "dense")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    style = {
        "init": ("tab:red", "s", "factorized at init (Composer: random factors)"),
        "init_svd": ("tab:pink", "v", "factorized at init (SVD of the dense init)"),
        "oneshot": ("tab:green", "^", "dense, one-shot data-aware factorize_model, fine-tune"),
        "late": ("tab:olive", "D", "callback, one milestone at 70 %"),
        "progressive": ("tab:blue", "o", "progressive callback (40 % and 70 %)"),
    }
    ax.axhline(dense["acc_mean"], color="black", lw=1, label=f"dense ({dense['acc_mean']:.2f} ± {dense['acc_std']:.2f} %)")
    ax.axhspan(dense["acc_mean"] - dense["acc_std"], dense["acc_mean"] + dense["acc_std"], color="black", alpha=0.08)
    ax.axhline(dense["acc_mean"] - 0.5, color="black", lw=0.8, ls=":", label="dense - 0.5 pp (goal)")
    for i, (method, (color, marker, label)) in enumerate(style.items()):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["target_macs_kept"])
        if not rs:
            continue
        shift = 0.004 * (i - 2)  # a small horizontal offset, so that overlapping error bars stay visible
        ax.errorbar(
            [r["target_macs_kept"] + shift for r in rs], [r["acc_mean"] for r in rs], yerr=[r["acc_std"] for r in rs],
            color=color, marker=marker, capsize=3, label=label,
        )  # fmt: skip
    ax.set_xlabel("multiply-adds kept in the factorized layers (fraction of dense)")
    ax.set_ylabel("test accuracy (%)")
    cfg = result["config"]
    ax.set_title(
        f"Fashion-MNIST, {cfg['n_train']} train / {cfg['n_test']} test images, {cfg['epochs']} epochs, "
        f"mean ± std of {len(cfg['seeds'])} seeds",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    top = ax.secondary_xaxis(
        "top",
        functions=(
            lambda x: x * result["dense_reference"]["target_macs"] / result["dense_reference"]["model_macs"]
            + 1 - result["dense_reference"]["target_macs"] / result["dense_reference"]["model_macs"],
            lambda y: (y - 1) * result["dense_reference"]["model_macs"] / result["dense_reference"]["target_macs"] + 1,
        ),
    )
    top.set_xlabel("multiply-adds kept in the whole model", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 2 levels, 3,000 images, 4 epochs (about 1-2 min)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="images of the Fashion-MNIST training pool used (train + val)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--fractions", type=float, nargs="+", default=None, help="rank fractions of min(in, out)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tuning learning rate of the one-shot method")
    p.add_argument("--workers", type=int, default=2, help="worker processes (one torch thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--from-json", default=None, help="re-aggregate and re-plot a result file (no training)")
    args = p.parse_args()
    if args.from_json:
        _quiet()
        path = Path(args.from_json)
        report(json.loads(path.read_text()), path)
        return

    quick = args.quick
    epochs = args.epochs or (4 if quick else 8)
    cfg = dict(
        epochs=epochs,
        limit=args.limit or (3000 if quick else 6000),
        batch_size=args.batch_size,
        ft_lr=args.ft_lr,
        milestones=[round(0.4 * epochs), round(0.7 * epochs)],
        oneshot_epoch=round(0.7 * epochs),
    )
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    fractions = args.fractions or ([0.625, 0.3125] if quick else [0.625, 0.3125, 0.15625])

    jobs = []
    for seed in seeds:
        for method in args.methods:
            if method in ("dense", "oneshot"):
                jobs.append(dict(cfg=cfg, method=method, seed=seed, fractions=fractions))
            else:  # one job per level: finer-grained load balancing
                jobs += [dict(cfg=cfg, method=method, seed=seed, fractions=[f]) for f in fractions]
    cost = {"oneshot": 3, "dense": 2, "progressive": 1.5, "late": 1.2, "init": 1, "init_svd": 1}
    jobs.sort(key=lambda j: -cost[j["method"]])  # longest first

    import torch

    torch.set_num_threads(args.threads)
    _quiet()
    from examples.tasks.mnist import MNISTClassifier  # noqa: F401 - fail early if missing

    dm = _data(cfg, seeds[0])
    dense_ref = measure(_model(0, epochs))
    cfg.update(n_train=len(dm.train_set), n_val=len(dm.val_set), n_test=len(dm.test_set))

    package = package_version()
    t0 = time.perf_counter()
    runs: list[dict] = []
    print(f"{len(jobs)} jobs on {args.workers} worker(s): {cfg}", flush=True)
    if args.workers <= 1:
        _init_worker(args.threads)
        for j in jobs:
            runs += run_job(j)
            print(f"  done {j['method']} seed {j['seed']} {j['fractions']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.threads,), maxtasksperchild=None) as pool:
            for j, res in zip(jobs, pool.imap(run_job, jobs)):
                runs += res
                print(f"  done {j['method']} seed {j['seed']} {j['fractions']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    total_s = time.perf_counter() - t0

    result = dict(
        config=dict(cfg, seeds=seeds, fractions=fractions, methods=args.methods, targets=TARGETS, min_features=MIN_FEATURES,
                    model=dict(MODEL_KW, max_epochs_hint=epochs), workers=args.workers, threads_per_worker=args.threads,
                    dataset="fashion-mnist (/usr/share/datasets/fashion-mnist)"),
        package=package,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                     load_avg_at_end=os.getloadavg()),
        total_wall_s=total_s,
        dense_reference=dense_ref,
        runs=runs,
    )  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    report(result, RESULTS / f"accuracy_vs_compute{suffix}.json")


def report(result: dict, out: Path) -> None:
    """Aggregates ``result["runs"]`` (summary, goal), writes the JSON and the PNG, prints the table."""
    cfg = result["config"]
    rows = aggregate(result["runs"], result["dense_reference"], cfg)
    # every method at a level must have the same final ranks
    for f in cfg["fractions"]:
        ranks = {json.dumps(r["ranks"], sort_keys=True) for r in rows if r["fraction"] == f}
        if len(ranks) != 1:
            print(f"WARNING: methods reached different ranks at fraction {f}: {ranks}", flush=True)
    runs = result.pop("runs")
    result.update(summary=rows, goal=verdict(rows), runs=runs)  # runs last: the JSON reads top-down
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{'method':<12} {'frac':>7} {'MACs kept (fact./model)':>24} {'weights kept (fact./model)':>27} "
          f"{'train MACs':>10} {'test acc %':>15} {'vs dense (pp)':>15}  ranks")  # fmt: skip
    for r in rows:
        fr = "-" if r["fraction"] is None else f"{r['fraction']:.4g}"
        print(
            f"{r['method']:<12} {fr:>7} {r['target_macs_kept']:>12.3f} / {r['model_macs_kept']:.3f} "
            f"{r['target_weights_kept']:>14.3f} / {r['model_params_kept']:.3f} {r['train_macs_fraction']:>10.3f} "
            f"{r['acc_mean']:>8.2f} ± {r['acc_std']:.2f} {r['diff_vs_dense_mean']:>+8.2f} ± {r['diff_vs_dense_std']:.2f}  "
            f"{list(r['ranks'].values())}"
        )
    print("\ngoal:", json.dumps(result["goal"], indent=1))
    print(f"total {result['total_wall_s']:.0f} s; wrote {out}")
    try:
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    except ImportError as e:  # pragma: no cover - matplotlib missing
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
