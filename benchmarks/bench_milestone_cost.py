"""What one milestone's solves cost (issue 20, item 2): today's solver against the previous one.

    python benchmarks/bench_milestone_cost.py [--device cuda] [--threads 1] [--out benchmarks/results]
    python benchmarks/bench_milestone_cost.py --dry-run   # a tiny GPT on the CPU: checks the script

The 32 targeted projections of ``examples/gpt_task.GPT`` at dim 1024, 8 blocks, 16 heads, block 512
(``attn.qkv`` 1024->3072, ``attn.proj`` 1024->1024, ``mlp.fc`` 1024->4096, ``mlp.proj`` 4096->1024):
their statistics are collected from the model's real activations on the standard library's text
exactly as the callback collects them (``space="auto"``: ``mlp.proj`` in its projected 1024-space;
held-out halves kept while a layer has few rows), then every layer is solved as a milestone solves
it (``build_candidates``: all ranks at once, plus the held-out curve), twice in the same process:

* ``previous``: the solver as it was up to this change: the right singular vectors of ``L B`` from
  an eigendecomposition of the D x D metric C (L = its square root) and an SVD of ``L B``;
* ``current``: the eigendecomposition of the smaller side only (``B^T C B`` [M, M] when M <= D,
  else ``T T^T`` [D, D] with T = R B and R a Cholesky factor of C).

Reported: seconds per layer shape and in all, the ratio, and the largest relative difference of
the NMSE (fitted and held-out) at ranks 1/8, 1/4, 1/2 of min(in, out). Times are the process's CPU
time with ``--threads`` threads on the CPU (robust to other jobs on the machine), CUDA-synchronized
wall-clock on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import package_version  # noqa: E402
from examples.gpt_task import GPT, Windows, stdlib_corpus  # noqa: E402
from factorize_plugin.core.solver import LowRankDecomposition  # noqa: E402
from factorize_plugin.surgery.collector import ActivationCollector  # noqa: E402
from factorize_plugin.surgery.refactorize import build_candidates  # noqa: E402

FULL = dict(dim=1024, layers=8, heads=16, block=512, sequences=8)
TINY = dict(dim=64, layers=2, heads=4, block=32, sequences=8)
FRACTIONS = (1 / 8, 1 / 4, 1 / 2)


def previous_directions(self: LowRankDecomposition, c: torch.Tensor, b: torch.Tensor, cb, bbt=None) -> tuple:
    """The previous solver's step: L from the D x D eigendecomposition of the metric, V from the SVD
    of L B, then G = B V and C G as it computed them."""
    extra = self._regularizer(c)
    evals, evecs = torch.linalg.eigh(c if extra is None else c + extra)
    root = evals.clamp_min(0.0).sqrt()[:, None] * evecs.T
    _, _, vh = torch.linalg.svd(root @ b, full_matrices=False)
    v = vh[: self.max_rank].T
    pivot = v[v.abs().argmax(0), torch.arange(v.shape[1], device=v.device)]
    v = (v * torch.where(pivot < 0, -1.0, 1.0).to(v)).contiguous()
    g = b @ v
    return v, g, (c @ b if cb is None else cb) @ v


@contextlib.contextmanager
def solver(kind: str):
    current = LowRankDecomposition._directions
    if kind == "previous":
        LowRankDecomposition._directions = previous_directions
    try:
        yield
    finally:
        LowRankDecomposition._directions = current


def collect(cfg: dict, device: torch.device) -> tuple[dict, ActivationCollector]:
    """Statistics of every targeted projection from ``cfg['sequences']`` windows of real text."""
    torch.manual_seed(0)
    model = GPT(block=cfg["block"], dim=cfg["dim"], layers=cfg["layers"], heads=cfg["heads"]).to(device).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head"}
    _, val = stdlib_corpus()
    windows = Windows(val, cfg["block"], cfg["sequences"], seed=None)
    x = torch.stack([windows[i][0] for i in range(len(windows))]).long().to(device)
    collector = ActivationCollector(layers, None, sample_fraction=1.0, space="auto", holdout=True)
    with torch.no_grad(), collector:
        for chunk in x.split(2):
            model(chunk)
    return layers, collector


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def solve(kind: str, layers: dict, collector: ActivationCollector, device: torch.device) -> tuple[dict, dict]:
    """Seconds per layer and the NMSE (fitted, held-out) at the chosen fractions, for one solver."""
    seconds, nmse = {}, {}
    holdout = collector.holdout.pairs()
    with solver(kind):
        for name, module in layers.items():
            start = clock(device)
            cand = build_candidates({name: module}, collector.stats, collector.positions, holdout=holdout)[name]
            seconds[name] = clock(device) - start
            k = cand.decomposition.max_rank
            ranks = [max(1, int(f * k)) for f in FRACTIONS]
            nmse[name] = {
                "fitted": [float(cand.decomposition.nmse_curve[r]) for r in ranks],
                "heldout": None if cand.heldout_curve is None else [float(cand.heldout_curve[r]) for r in ranks],
            }
    return seconds, nmse


def shape_of(module: torch.nn.Linear) -> str:
    return f"{module.in_features}->{module.out_features}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="a tiny GPT on the CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the CPU figures use 1)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else args.device)
    torch.set_num_threads(args.threads)
    cfg = TINY if args.dry_run else FULL
    start = time.perf_counter()
    layers, collector = collect(cfg, device)
    collect_s = time.perf_counter() - start
    print(f"collected {len(layers)} layers' statistics in {collect_s:.1f} s", flush=True)
    results = {}
    for kind in ("current", "previous"):
        seconds, nmse = solve(kind, layers, collector, device)
        results[kind] = dict(seconds=seconds, nmse=nmse, total_seconds=sum(seconds.values()))
        print(f"{kind}: {results[kind]['total_seconds']:.2f} s for {len(layers)} layers", flush=True)
    worst = 0.0
    for name in layers:
        for key in ("fitted", "heldout"):
            a, b = results["current"]["nmse"][name][key], results["previous"]["nmse"][name][key]
            if a is not None:
                worst = max(worst, max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)))
    by_shape: dict[str, dict] = {}
    for name, module in layers.items():
        row = by_shape.setdefault(shape_of(module), {"layers": 0, "current_s": 0.0, "previous_s": 0.0})
        row["layers"] += 1
        row["current_s"] += results["current"]["seconds"][name]
        row["previous_s"] += results["previous"]["seconds"][name]
    summary = {
        "config": {**cfg, "device": str(device), "threads": args.threads, "dry_run": args.dry_run,
                   "rows_per_layer": {n: s for n, s in collector.samples().items()},
                   "heldout_layers": sorted(collector.holdout.pairs())},  # fmt: skip
        "torch": torch.__version__,
        "package": package_version(),
        "by_shape": by_shape,
        "current_seconds": results["current"]["total_seconds"],
        "previous_seconds": results["previous"]["total_seconds"],
        "speedup": results["previous"]["total_seconds"] / max(results["current"]["total_seconds"], 1e-12),
        "max_relative_nmse_difference": worst,
        "per_layer": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "milestone_cost_dry_run.json" if args.dry_run else f"milestone_cost_{device.type}.json"
    (out / name).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("by_shape", "current_seconds", "previous_seconds", "speedup",
                                               "max_relative_nmse_difference")}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
