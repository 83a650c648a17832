"""Cost of collecting activation statistics during validation (issue 14: 80-batch runs <= 1.10x on the CPU).

Times a validation pass (forward under inference_mode) with and without an ActivationCollector
on every targeted layer, for an MLP and a CNN, interleaved in one process; reports the ratio.
"With" includes all of the collection's work: building the collector and merging every row it
kept into the float64 statistics (nothing is left pending for the solve to pay).

    python benchmarks/bench_collection_overhead.py [--quick] [--out benchmarks/results]

On this CPU about a quarter of a plain validation run of the CNN is kernel time for page faults:
glibc returns large freed blocks to the system and faults them in again on the next batch, and
the collection's own temporaries add to that churn. Run it a second time with a steady heap,

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824 \
        python benchmarks/bench_collection_overhead.py

to see the collection's own cost (written to collection_overhead_steady_malloc.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
from _common import package_version  # benchmarks/ is on sys.path when run as a script

from factorize_plugin.surgery.select.targets import select_layers
from factorize_plugin.surgery.statistics.collector import ActivationCollector


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128 * 8 * 8, 256),
        nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip


def run(model: nn.Module, batches: list[torch.Tensor], max_samples: int | None, collect: bool) -> float:
    layers = select_layers(model, min_params=1024)
    start = time.perf_counter()
    with torch.inference_mode():
        if collect:
            # the callback's settings; it passes Lightning's num_val_batches as expected_batches
            collector = ActivationCollector(
                layers, max_samples=max_samples, sample_fraction="auto", space="auto", expected_batches=len(batches)
            )
            with collector:
                for x in batches:
                    model(x)
            for stats in collector.stats.values():
                stats.flush()  # the deferred float64 merges count too
            assert min(collector.samples().values()) > 0
        else:
            for x in batches:
                model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier ratios on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reps = 3 if args.quick else 7
    sizes = (5,) if args.quick else (20, 80)  # validation runs of 20 and 80 batches
    cases = {
        "mlp": (mlp(), [torch.randn(256, 784) for _ in range(max(sizes))]),
        "cnn": (cnn(), [torch.randn(64, 3, 32, 32) for _ in range(max(sizes))]),
    }
    rows = []
    for (name, (model, all_batches)), n_batches in ((c, n) for c in cases.items() for n in sizes):
        model.eval()
        batches = all_batches[:n_batches]
        for cap in (100_000,):
            run(model, batches[:2], cap, True)  # warm-up
            off, on = [], []
            for _ in range(reps):  # interleaved
                off.append(run(model, batches, cap, False))
                on.append(run(model, batches, cap, True))
            row = {
                "model": name,
                "max_samples": cap,
                "batches": n_batches,
                "seconds_off": statistics.median(off),
                "seconds_on": statistics.median(on),
            }
            # median of the interleaved pairs' ratios: robust to the machine's drift between pairs
            row["ratio"] = statistics.median(b / a for a, b in zip(off, on))
            row["pair_ratios"] = [round(b / a, 3) for a, b in zip(off, on)]
            rows.append(row)
            print(f"{name:4} batches={n_batches:>3} cap={cap!s:>6}: off {row['seconds_off']:.3f}s on {row['seconds_on']:.3f}s ratio {row['ratio']:.2f}x")
    malloc = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "collection_overhead",
        "goal": "validation with collection <= 1.25x without, on the CPU (issue 14: 80-batch runs <= 1.10x)",
        "settings": "sample_fraction='auto', space='auto', max_samples=100,000 and expected_batches=the run's length (the callback's defaults); 'on' includes building the collector (float64 buffers, projection copies) and merging every kept row into the float64 statistics",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "malloc": malloc or "glibc defaults",
        "quick": args.quick,
        "package": package_version(),
        "rows": rows,
    }
    name = "collection_overhead" + ("_steady_malloc" if malloc else "") + ("_quick" if args.quick else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
