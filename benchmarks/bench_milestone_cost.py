"""What one milestone's solves cost (issue 20, item 2): today's solver against the original one.

    python benchmarks/bench_milestone_cost.py [--device cuda] [--threads 1] [--out benchmarks/results]
    python benchmarks/bench_milestone_cost.py --dry-run [--device cuda]  # a tiny GPT: checks the script

The 32 targeted projections of ``examples/gpt_task.GPT`` at dim 1024, 8 blocks, 16 heads, block 512
(``attn.qkv`` 1024->3072, ``attn.proj`` 1024->1024, ``mlp.fc`` 1024->4096, ``mlp.proj`` 4096->1024):
their statistics are collected from the model's real activations on the standard library's text
exactly as the callback collects them (``space="auto"``: ``mlp.proj`` in its projected 1024-space;
held-out halves kept while a layer has few rows), on ``--device``, where the solves then run too.
Every layer is solved as a milestone solves it (``build_candidates``: all ranks at once, plus the
held-out curve) and its factors formed at rank 1/4 of min(in, out), twice in the same process,
alternating per layer which goes first:

* ``previous``: the original solver, frozen here (``previous_solve``): the right singular vectors
  of ``L B`` from an eigendecomposition of the D x D metric C (L = its square root) and an SVD of
  ``L B``, and a second, independent solve on half A for the held-out curve;
* ``current``: the package's solver: the eigendecomposition of the smaller side only (``B^T C B``
  [M, M] when M <= D; ``R C R^T`` [D, D] with R the Cholesky factor of W W^T when M > D), the
  held-out refit reusing the weight's work (``LowRankDecomposition.refit``), V formed only for
  the installed rank.

Reported: seconds per layer shape and in all (the process's CPU time with ``--threads`` threads
on a CPU, robust to other jobs; wall-clock too; CUDA-synchronized wall-clock on a GPU), the ratio,
and the largest relative difference of the NMSE at ranks 1/8, 1/4, 1/2: fitted, measured on the
installed factors (``nmse_of``, input-space layers), and held-out where the fit on half A is
determined (its NMSE on A above ``DETERMINED``: past the rank of A's data every completion fits A
exactly, and the held-out error depends on which one a solver picks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import package_version  # noqa: E402
from examples.gpt_task import GPT, Windows, stdlib_corpus  # noqa: E402
from factorize_plugin.core.solver import nmse_of  # noqa: E402
from factorize_plugin.core.statistics import MomentAccumulator  # noqa: E402
from factorize_plugin.layers.adapters import weight_matrix  # noqa: E402
from factorize_plugin.surgery.statistics.collector import ActivationCollector  # noqa: E402
from factorize_plugin.surgery.swap.refactorize import build_candidates  # noqa: E402

FULL = dict(dim=1024, layers=8, heads=16, block=512, sequences=8)
TINY = dict(dim=64, layers=2, heads=4, block=32, sequences=8)
FRACTIONS = (1 / 8, 1 / 4, 1 / 2)
INSTALLED = 1 / 4  # the rank whose factors a milestone forms
DETERMINED = 1e-6  # held-out values compared only where the fit on half A has at least this NMSE on A
ORIGINAL_CPU_SECONDS = 434.1  # the original solver on this CPU, benchmarks/results/milestone_cost_cpu.json before


class PreviousFit:
    """The original solver for a layer whose target is its own output (``x @ W + b``), frozen.

    Fits on ``stats`` (input moments, or moments of z = x @ W0 with ``stats.projection`` = W0):
    V [M, k] from the SVD of L W (L^T L = C, from the eigendecomposition of C [D, D]), G = W V,
    the NMSE curve [k + 1], and the curve on other statistics (``nmse_on``)."""

    def __init__(self, stats: MomentAccumulator, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        f64 = dict(dtype=torch.float64, device=stats.device)
        d, m = weight.shape
        self.fit_bias = bias is not None
        self.input_map = None if stats.projection is None else stats.projection.to(**f64)
        self.w = torch.eye(m, **f64) if self.input_map is not None else weight.detach().to(**f64)
        self.bias = None if bias is None else bias.detach().to(**f64)
        self.wwt = self.w @ self.w.T if self.w.shape[1] > self.w.shape[0] else None
        mom = self.moments(stats)
        self.mean_x, self.mean_y = mom["mean_x"], mom["mean_y"]
        c, k = mom["cxx"], min(d, m)
        evals, evecs = torch.linalg.eigh(c)
        root = evals.clamp_min(0.0).sqrt()[:, None] * evecs.T
        _, _, vh = torch.linalg.svd(root @ self.w, full_matrices=False)
        v = vh[:k].T
        pivot = v[v.abs().argmax(0), torch.arange(v.shape[1], device=v.device)]
        self.V = (v * torch.where(pivot < 0, -1.0, 1.0).to(v)).contiguous()
        self.G = self.w @ self.V
        cg = (c @ self.w if mom["cxy"] is None else mom["cxy"]) @ self.V
        self.nmse_curve = self.curve(mom, cg)

    def moments(self, stats: MomentAccumulator) -> dict:
        n, cxx, mx = stats.count, stats.cxx, stats.mean_x
        cxy = None if self.wwt is not None else cxx @ self.w
        syy = (cxx * self.wwt).sum() if self.wwt is not None else (self.w * cxy).sum()
        my = mx @ self.w + (0.0 if self.bias is None else self.bias)
        if self.fit_bias:
            return dict(count=n, mean_x=mx, mean_y=my, cxx=cxx, cxy=cxy, syy=syy, total=syy)
        return dict(count=n, mean_x=torch.zeros_like(mx), mean_y=torch.zeros_like(my), cxx=cxx + n * torch.outer(mx, mx),
                    cxy=None if cxy is None else cxy + n * torch.outer(mx, my), syy=syy + n * my.square().sum(),
                    total=syy)  # fmt: skip

    def curve(self, mom: dict, cg: torch.Tensor) -> torch.Tensor:
        q = (cg * self.G).sum(0)  # the cross term g^T Cxy v = g^T C G too: the target is x W
        n, dx, dy = mom["count"], mom["mean_x"] - self.mean_x, mom["mean_y"] - self.mean_y
        a = dx @ self.G
        per_rank = -q + n * (a.square() - 2 * a * (dy @ self.V))
        err = (mom["syy"] + n * dy.square().sum() + torch.cat([q.new_zeros(1), per_rank.cumsum(0)])).clamp_min(0.0)
        return err / mom["total"]

    def nmse_on(self, stats: MomentAccumulator) -> torch.Tensor:
        mom = self.moments(stats)
        return self.curve(mom, mom["cxx"] @ self.G)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        g, v = self.G[:, :rank], self.V[:, :rank]
        bias = self.mean_y - self.mean_x @ g @ v.T if self.fit_bias else None
        g = g if self.input_map is None else self.input_map @ g
        norms = g.norm(dim=0).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        return g / norms, norms[:, None] * v.T, bias


def previous_solve(module: torch.nn.Module, stats: MomentAccumulator, halves) -> tuple:
    """(fit, held-out curve or None, fitted curve on half A or None) as the original milestone."""
    w, b = weight_matrix(module)
    fit = PreviousFit(stats, w, b)
    if halves is None:
        return fit, None, None
    on_a = PreviousFit(halves[0], w, b)
    return fit, on_a.nmse_on(halves[1]), on_a.nmse_curve


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


def clock(device: torch.device) -> tuple[float, float]:
    """(the solve's clock, wall-clock): CPU time of the process on a CPU, wall-clock on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        now = time.perf_counter()
        return now, now
    return time.process_time(), time.perf_counter()


def solve_layer(kind: str, name: str, module: torch.nn.Module, collector: ActivationCollector, halves,
                device: torch.device) -> dict:  # fmt: skip
    """One layer as a milestone solves it with solver ``kind``: seconds, and the NMSE at the fractions."""
    stats = collector.stats[name]
    start = clock(device)
    if kind == "current":
        cand = build_candidates({name: module}, {name: stats}, holdout=None if halves is None else {name: halves})[name]
        fit, heldout, on_a = cand.decomposition, cand.heldout_curve, None
    else:
        fit, heldout, on_a = previous_solve(module, stats, halves)
    k = fit.nmse_curve.numel() - 1
    wa, wb, bias = fit.factors(max(1, int(INSTALLED * k)))
    stop = clock(device)
    ranks = [max(1, int(f * k)) for f in FRACTIONS]
    w, b = weight_matrix(module)
    return {
        "seconds": stop[0] - start[0],
        "wall_seconds": stop[1] - start[1],
        "fitted": [float(fit.nmse_curve[r]) for r in ranks],
        "heldout": None if heldout is None else [float(heldout[r]) for r in ranks],
        "fitted_on_a": None if on_a is None else [float(on_a[r]) for r in ranks],
        # the installed factors' error, measured from the statistics (input-space layers)
        "installed": None if stats.projection is not None else nmse_of(stats, wa @ wb, bias, w, b),
    }


def shape_of(module: torch.nn.Linear) -> str:
    return f"{module.in_features}->{module.out_features}"


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def summarize(per_layer: dict, shapes: dict, config: dict) -> dict:
    """The totals, ratios and NMSE differences over the layers in ``per_layer`` (name -> shape)."""
    worst = {"fitted": 0.0, "heldout": 0.0, "installed": 0.0}
    heldout_compared = heldout_skipped = 0
    for name in per_layer["current"]:
        cur, prev = per_layer["current"][name], per_layer["previous"][name]
        worst["fitted"] = max(worst["fitted"], *(relative(a, b) for a, b in zip(cur["fitted"], prev["fitted"])))
        if cur["installed"] is not None:
            at = prev["fitted"][FRACTIONS.index(INSTALLED)]
            worst["installed"] = max(worst["installed"], relative(cur["installed"], at))
        if prev["heldout"] is not None:
            for a, b, on_a in zip(cur["heldout"], prev["heldout"], prev["fitted_on_a"]):
                if on_a > DETERMINED:
                    worst["heldout"] = max(worst["heldout"], relative(a, b))
                    heldout_compared += 1
                else:
                    heldout_skipped += 1
    by_shape: dict[str, dict] = {}
    for name in per_layer["current"]:
        row = by_shape.setdefault(shapes[name], {"layers": 0, "current_s": 0.0, "previous_s": 0.0})
        row["layers"] += 1
        row["current_s"] += per_layer["current"][name]["seconds"]
        row["previous_s"] += per_layer["previous"][name]["seconds"]
    for row in by_shape.values():
        row["speedup"] = row["previous_s"] / max(row["current_s"], 1e-12)
    total = {k: sum(r["seconds"] for r in per_layer[k].values()) for k in per_layer}
    wall = {k: sum(r["wall_seconds"] for r in per_layer[k].values()) for k in per_layer}
    return {
        "config": config,
        "torch": torch.__version__,
        "package": package_version(),
        "layers_done": len(per_layer["current"]),
        "by_shape": by_shape,
        "current_seconds": total["current"],
        "previous_seconds": total["previous"],
        "current_wall_seconds": wall["current"],
        "previous_wall_seconds": wall["previous"],
        "speedup": total["previous"] / max(total["current"], 1e-12),
        "speedup_wall": wall["previous"] / max(wall["current"], 1e-12),
        "speedup_vs_original_committed": ORIGINAL_CPU_SECONDS / max(total["current"], 1e-12)
        if config.get("device") == "cpu" and not config.get("dry_run") and len(per_layer["current"]) == 32 else None,
        "max_relative_nmse_difference": max(worst.values()),
        "max_relative_nmse_difference_by_kind": worst,
        "heldout_values_compared": heldout_compared,
        "heldout_values_undetermined": heldout_skipped,
        "shapes": shapes,
        "per_layer": per_layer,
    }


KEYS = ("layers_done", "by_shape", "current_seconds", "previous_seconds", "speedup", "speedup_wall",
        "max_relative_nmse_difference", "max_relative_nmse_difference_by_kind", "heldout_values_compared",
        "heldout_values_undetermined")  # fmt: skip


def merge(paths: list[str], out: Path) -> None:
    """One result from parts run in separate processes (``--blocks``), each layer timed in one."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    per_layer = {k: {n: r for part in parts for n, r in part["per_layer"][k].items()} for k in ("current", "previous")}
    shapes = {n: s for part in parts for n, s in part["shapes"].items()}
    config = {**parts[0]["config"], "blocks": None, "parts": [p["config"] for p in parts]}
    for key in ("rows_per_layer",):
        config[key] = {n: v for p in parts for n, v in p["config"][key].items()}
    config["heldout_layers"] = sorted({n for p in parts for n in p["config"]["heldout_layers"]})
    summary = summarize(per_layer, shapes, config)
    name = f"milestone_cost_{torch.device(config['device']).type}.json"
    (out / name).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in KEYS}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="a tiny GPT (on --device)")
    parser.add_argument("--device", default="cpu", help="where the statistics are collected and solved")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the CPU figures use 1)")
    parser.add_argument("--blocks", default=None, help="only these blocks, e.g. 0,1,2 (a part; see --merge)")
    parser.add_argument("--merge", nargs="+", default=None, help="combine the JSON of parts run with --blocks")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args.merge, out)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cfg = TINY if args.dry_run else FULL
    start = time.perf_counter()
    layers, collector = collect(cfg, device)
    collect_s = time.perf_counter() - start
    blocks = None if args.blocks is None else {int(b) for b in args.blocks.split(",")}
    chosen = {n: m for n, m in layers.items() if blocks is None or int(n.split(".")[1]) in blocks}
    solve_devices = sorted({str(collector.stats[n].device) for n in chosen})
    if any(torch.device(d).type != device.type for d in solve_devices):
        raise RuntimeError(f"the statistics live on {solve_devices}, not on {device}: the solves would not run there")
    print(f"collected {len(layers)} layers' statistics on {solve_devices} in {collect_s:.1f} s", flush=True)
    holdout = collector.holdout.pairs()
    config = {**cfg, "device": str(device), "solve_devices": solve_devices, "threads": args.threads,
              "dry_run": args.dry_run, "blocks": args.blocks,
              "clock": "cuda wall-clock" if device.type == "cuda" else "process CPU time",
              "rows_per_layer": {n: s for n, s in collector.samples().items() if n in chosen},
              "heldout_layers": sorted(n for n in holdout if n in chosen), "installed_fraction": INSTALLED,
              "heldout_determined_above": DETERMINED}  # fmt: skip
    suffix = "" if args.blocks is None else "_blocks" + args.blocks.replace(",", "-")
    name = "milestone_cost_dry_run.json" if args.dry_run else f"milestone_cost_{device.type}{suffix}.json"
    per_layer: dict[str, dict] = {"current": {}, "previous": {}}
    shapes = {}
    for i, (name_i, module) in enumerate(chosen.items()):
        order = ("previous", "current") if i % 2 == 0 else ("current", "previous")
        for kind in order:
            per_layer[kind][name_i] = solve_layer(kind, name_i, module, collector, holdout.get(name_i), device)
        shapes[name_i] = shape_of(module)
        row = {k: per_layer[k][name_i]["seconds"] for k in order}
        print(f"{name_i}: previous {row['previous']:.2f} s, current {row['current']:.2f} s", flush=True)
        summary = summarize(per_layer, shapes, config)
        (out / name).write_text(json.dumps(summary, indent=1))  # after every layer: a partial run leaves a result
    print(json.dumps({k: summary[k] for k in KEYS}, indent=1))


if __name__ == "__main__":
    main()
