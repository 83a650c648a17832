"""``schedule="auto"`` against the best hand-written schedule of the Fashion-MNIST grid (issue 22).

The task, model, data split, training (Adam 5e-3, cosine, batch 128, 8 epochs, 1 thread) and
targeted layers are those of ``bench_accuracy_vs_compute.py`` (its functions are reused). At each
compression level (a rank fraction of each layer's min(in, out): the same final ranks for every
method) three schedules train from the same seed in the same process, one after the other:

* ``late``: the hand schedule ``{6: f}`` (one milestone at 70 % of the run);
* ``progressive``: the hand schedule ``{3: sqrt(f), 6: f}``;
* ``auto``: ``LowRankFactorization("auto", target=FixedRank(f))`` with the default ``Readiness``
  (no per-benchmark setting): it switches when every layer's stable rank moved by at most 10 %
  between two validation runs or is within a quarter of the rank it will keep, at epoch 6 at the
  latest.

The speed guard is off by default (``--speed-guard on``: the callback's default) so that every
schedule ends at the same ranks: on a loaded machine the guard's timings otherwise decide at random
whether a milestone applies at all (``results/auto_schedule_guard_on.json``).

Reported per run: test accuracy on all 10,000 test images, wall-clock and process CPU seconds of
the whole ``fit``, the switch epoch auto chose and the cost of its watching (signal seconds / the
validation run's seconds, per validation run). The table compares auto with the best hand schedule
(highest mean test accuracy) of each level.

    python benchmarks/bench_auto_schedule.py [--seeds 0 1 2] [--fractions 0.625 0.3125]
    # one process per seed, then: --merge results/auto_schedule_seed{0,1,2}.json

Writes benchmarks/results/auto_schedule.json (the committed one: f = 0.625, seeds 0-2, one process
per seed, merged).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from _common import package_version  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_accuracy_vs_compute as grid  # noqa: E402 - after the path set-up

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("late", "progressive", "auto")


def run_one(cfg: dict, method: str, fraction: float, seed: int) -> dict:
    """Trains one schedule from ``seed``; returns accuracy, times, the milestones and the watching."""
    from factorize_plugin import Auto, FixedRank, LowRankFactorization, Targets

    E = cfg["epochs"]
    m1, m2 = cfg["milestones"]
    kw = dict(targets=Targets(grid.TARGETS, min_features=grid.MIN_FEATURES), verbose=False, speed_guard=cfg["speed_guard"])
    if method == "auto":
        cb = LowRankFactorization(Auto(target=FixedRank(fraction)), **kw)
    elif method == "late":
        cb = LowRankFactorization({m2: fraction}, mode="rank", **kw)
    else:
        cb = LowRankFactorization({m1: math.sqrt(fraction), m2: fraction}, mode="rank", **kw)
    dm = grid._data(cfg, seed)
    model = grid._model(seed, E)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    grid._trainer(E, [cb]).fit(model, dm)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    watch = [h for h in cb.history if h.get("event") == "watch"]
    milestones = [h for h in cb.history if h.get("event") == "milestone"]
    return dict(
        method=method, fraction=fraction, seed=seed, test_acc=grid.test_accuracy(model, dm), fit_wall_s=wall,
        fit_cpu_s=cpu, milestone_epochs=[h["epoch"] for h in milestones], final_ranks=cb.ranks,
        speedup_model=[h.get("speedup_model") for h in milestones],
        watch=[{k: w[k] for k in ("epoch", "stable_rank", "stable_rank_change", "moving", "within_room", "ready", "reason",
                                  "signal_seconds", "validation_seconds", "watch_cost")} for w in watch],
    )  # fmt: skip


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for f in sorted({r["fraction"] for r in runs}, reverse=True):
        by = {m: [r for r in runs if r["fraction"] == f and r["method"] == m] for m in METHODS}
        stats = {
            m: dict(
                acc_mean=100 * statistics.fmean(r["test_acc"] for r in rs),
                acc_std=100 * statistics.stdev([r["test_acc"] for r in rs]) if len(rs) > 1 else 0.0,
                wall_mean=statistics.fmean(r["fit_wall_s"] for r in rs),
                cpu_mean=statistics.fmean(r["fit_cpu_s"] for r in rs),
            )
            for m, rs in by.items()
            if rs
        }
        hand = max((m for m in ("late", "progressive") if m in stats), key=lambda m: stats[m]["acc_mean"])
        costs = [w["watch_cost"] for r in by["auto"] for w in r["watch"]]
        auto = stats["auto"]
        rows.append(
            dict(
                fraction=f, best_hand=hand, hand=stats[hand], auto=auto, all=stats,
                auto_minus_hand_pp=auto["acc_mean"] - stats[hand]["acc_mean"],
                auto_within_0_5pp=auto["acc_mean"] >= stats[hand]["acc_mean"] - 0.5,
                auto_wall_vs_hand=auto["wall_mean"] / stats[hand]["wall_mean"],
                auto_cpu_vs_hand=auto["cpu_mean"] / stats[hand]["cpu_mean"],
                switch_epochs=[r["milestone_epochs"] for r in by["auto"]],
                switch_reasons=[[w["reason"] for w in r["watch"] if w["ready"]] for r in by["auto"]],
                watch_cost_max=max(costs), watch_cost_median=statistics.median(costs),
                watch_cost_max_after_first=max(
                    (w["watch_cost"] for r in by["auto"] for w in r["watch"][1:]), default=float("nan")
                ),
                ranks=by["auto"][0]["final_ranks"],
                same_final_ranks=all(r["final_ranks"] == by["auto"][0]["final_ranks"] for rs in by.values() for r in rs),
            )
        )  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.625, 0.3125])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--limit", type=int, default=6000)
    p.add_argument("--out", default=str(RESULTS / "auto_schedule.json"))
    p.add_argument("--speed-guard", choices=("on", "off"), default="off",
                   help="off (default): the same final ranks for every schedule; on a loaded machine the guard's "
                        "timings decide at random whether a milestone applies at all")  # fmt: skip
    p.add_argument("--merge", nargs="+", default=None, help="combine the runs of result files (one per seed) into --out")
    args = p.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        runs = [r for part in parts for r in part["runs"]]
        merged = dict(parts[0], summary=summarize(runs), runs=runs, merged_from=[Path(f).name for f in args.merge],
                      total_wall_s=max(part["total_wall_s"] for part in parts),
                      total_cpu_s=sum(part["total_cpu_s"] for part in parts))  # fmt: skip
        merged["config"] = dict(merged["config"], seeds=sorted({r["seed"] for r in runs}))
        Path(args.out).write_text(json.dumps(merged, indent=1))
        _print_table(merged, Path(args.out))
        return

    import torch

    torch.set_num_threads(1)
    grid._quiet()
    E = args.epochs
    cfg = dict(epochs=E, limit=args.limit, batch_size=128, milestones=[round(0.4 * E), round(0.7 * E)],
               speed_guard=args.speed_guard == "on")  # fmt: skip
    runs: list[dict] = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    for seed in args.seeds:
        for f in args.fractions:
            for method in METHODS:  # interleaved: a load change on the machine hits all three alike
                runs.append(run_one(cfg, method, f, seed))
                r = runs[-1]
                print(f"seed {seed} f={f} {method:<12} acc {100 * r['test_acc']:.2f} wall {r['fit_wall_s']:.1f} s "
                      f"cpu {r['fit_cpu_s']:.1f} s milestones {r['milestone_epochs']}", flush=True)  # fmt: skip
            result = dict(
                config=dict(cfg, seeds=args.seeds, fractions=args.fractions, targets=grid.TARGETS,
                            min_features=grid.MIN_FEATURES, model=dict(grid.MODEL_KW, max_epochs_hint=E), threads=1,
                            readiness="Readiness() defaults", dataset="fashion-mnist (/usr/share/datasets/fashion-mnist)"),
                package=package_version(),
                machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                             load_avg_at_end=os.getloadavg()),
                complete=seed == args.seeds[-1] and f == args.fractions[-1],
                total_wall_s=time.perf_counter() - wall0, total_cpu_s=time.process_time() - cpu0,
                summary=summarize(runs), runs=runs,
            )  # fmt: skip
            out.write_text(json.dumps(result, indent=1))  # after every level: a partial result survives
    _print_table(result, out)


def _print_table(result: dict, out: Path) -> None:
    print(f"\n{'level':>7} | {'best hand schedule':<30} | {'auto':<22} | switch epochs | watch cost (max)")
    for row in result["summary"]:
        h, a = row["hand"], row["auto"]
        print(f"{row['fraction']:>7.4g} | {row['best_hand']:<11} {h['acc_mean']:.2f}% {h['wall_mean']:.1f} s | "
              f"{a['acc_mean']:.2f}% {a['wall_mean']:.1f} s | {row['switch_epochs']} | {row['watch_cost_max']:.4f}")  # fmt: skip
    print(f"total {result['total_wall_s']:.0f} s wall, {result['total_cpu_s']:.0f} s CPU; wrote {out}")


if __name__ == "__main__":
    main()
