"""Forward+backward throughput of dense vs factorized layers on a GPU, in bf16 (issue 7, item 3).

    python benchmarks/bench_gpu_speed.py [--quick] [--out benchmarks/results]
    python benchmarks/bench_gpu_speed.py --dry-run   # tiny float32 layers on the CPU: checks the script


For transformer-sized Linear layers (4096->16384, 16384->4096) at rank fractions 1/4 and 1/8, and
for 3x3 convolutions of 64..512 channels at 1/4 rank, times dense and factorized (two matmuls /
KxK conv + 1x1 conv) forward+backward with CUDA events, and reports the measured speedup beside
the ideal multiply-add ratio. The rows where the measured speedup is below 1 are where the
callback should not factorize. Each row also carries the speed guard's own decision on the same
layer, rank and input (``SpeedGuard`` in train mode with AdamW, margin 1.15: its measured ratio,
whether it would factorize, and the note it writes when it keeps the layer dense), so the first GPU
run records which layers the defaults keep dense and why. Needs a CUDA GPU; exits with a message
otherwise. ``--dry-run`` runs the same code on tiny float32 layers on the CPU (timed with
``perf_counter``), so that a session with a GPU does not spend its device time on a broken script
(``tests/test_examples.py`` runs it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from _common import package_version  # benchmarks/ is on sys.path when run as a script

from factorize_plugin.layers import FactorizedConv2d, FactorizedLinear
from factorize_plugin.layers.adapters import layer_view
from factorize_plugin.surgery.timing.speed import LayerInput, OptimizerSpec, SpeedGuard, TimingCase

GUARD = SpeedGuard(mode="train")


def guard_decision(dense: nn.Module, x: torch.Tensor, rank: int) -> dict:
    """What the speed guard (defaults, train mode, AdamW) decides for ``dense`` at ``rank`` on ``x``."""
    view = layer_view(dense)
    inputs = LayerInput.of(x)
    case = TimingCase(view, rank, inputs, "train", dense.bias is not None, dense.weight.dtype, True, OptimizerSpec(torch.optim.AdamW))
    (comparison,) = GUARD.comparisons([(case.dense, case)])
    ratio, allowed = comparison.ratio, comparison.passes
    note = "" if allowed else (
        f"kept dense: rank {rank} measured {comparison.describe()} the dense layer's speed (needs {GUARD.margin:.2f}x) on "
        f"{inputs.describe()} at {inputs.rows(view)} rows, train step with AdamW ({comparison.verdict})"
    )
    return dict(guard_speedup=ratio, guard_low=comparison.low, guard_high=comparison.high, guard_rounds=comparison.rounds,
                guard_verdict=comparison.verdict, guard_factorizes=allowed, guard_note=note)


def _time(module: nn.Module, x: torch.Tensor, iters: int) -> float:
    """Median milliseconds of forward+backward (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(3):
        module(x).float().sum().backward()
    times = []
    for _ in range(iters):
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            module(x).float().sum().backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            module(x).float().sum().backward()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def linear_rows(iters: int, tokens: int, shapes, **dev) -> list[dict]:
    rows = []
    for d, m in shapes:
        dense = nn.Linear(d, m, **dev)
        x = torch.randn(tokens, d, **dev, requires_grad=True)
        t_dense = _time(dense, x, iters)
        for frac in (4, 8):
            r = min(d, m) // frac
            fact = FactorizedLinear(d, m, r, **dev)
            t = _time(fact, x, iters)
            ideal = d * m / (r * (d + m))
            rows.append(dict(kind="linear", shape=[d, m], rank=r, tokens=tokens, dense_ms=t_dense, factorized_ms=t,
                             speedup=t_dense / t, ideal=ideal, fraction_of_ideal=t_dense / t / ideal,
                             **guard_decision(dense, x, r)))
    return rows


def conv_rows(iters: int, batch: int, channels, size, **dev) -> list[dict]:
    rows = []
    for c in channels:
        hw = size(c)
        dense = nn.Conv2d(c, c, 3, padding=1, **dev).to(memory_format=torch.channels_last)
        x = torch.randn(batch, c, hw, hw, **dev).to(memory_format=torch.channels_last).requires_grad_()
        t_dense = _time(dense, x, iters)
        r = c // 4
        fact = FactorizedConv2d(c, c, 3, r, padding=1, **dev).to(memory_format=torch.channels_last)
        t = _time(fact, x, iters)
        ideal = c * c * 9 / (r * (c * 9 + c))
        rows.append(dict(kind="conv3x3", channels=c, hw=hw, rank=r, batch=batch, dense_ms=t_dense, factorized_ms=t,
                         speedup=t_dense / t, ideal=ideal, fraction_of_ideal=t_dense / t / ideal,
                         **guard_decision(dense, x, r)))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="tiny float32 layers on the CPU (checks the script)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.dry_run:
        dev = dict(device="cpu", dtype=torch.float32)
        iters = 3
        rows = linear_rows(iters, 64, ((32, 128), (128, 32)), **dev) + conv_rows(iters, 2, (8, 16), lambda c: 8, **dev)
        device_name = "cpu (dry run)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu_speed.py needs a CUDA GPU; none is visible here (--dry-run checks it on the CPU)")
        torch.backends.cuda.matmul.allow_tf32 = True
        dev = dict(device="cuda", dtype=torch.bfloat16)
        iters = 10 if args.quick else 50
        rows = linear_rows(iters, 2048 if args.quick else 8192, ((4096, 16384), (16384, 4096)), **dev) + conv_rows(
            iters, 32 if args.quick else 128, (64, 128, 256, 512), lambda c: 56 if c <= 128 else 28, **dev
        )
        device_name = torch.cuda.get_device_name()
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = [r for r in rows if not r["guard_factorizes"]]
    print(f"speed guard (margin {GUARD.margin}, train mode): keeps {len(kept)} of {len(rows)} layers dense")
    for r in kept:
        print("  ", r.get("shape") or f"conv3x3 {r['channels']} channels", r["guard_note"])
    result = dict(benchmark="gpu_speed", device=device_name, torch=torch.__version__, dtype=str(dev["dtype"]).replace("torch.", ""),
                  quick=args.quick, guard=dict(margin=GUARD.margin, mode=GUARD.mode, optimizer="AdamW"),
                  package=package_version(), rows=rows)
    (out / ("gpu_speed_dry_run.json" if args.dry_run else "gpu_speed.json")).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
