"""Wall-clock beside multiply-adds: does factorizing with the defaults (speed guard on) ever make a
model slower? (issue 14)

For a narrow MLP (six 64x64 layers, 64 rows per batch) and a wide one (four 1024x1024 layers,
256 rows), on this machine, in one process:

* training: the ``LowRankFactorization`` callback with its defaults factorizes at epoch 0
  (``{0: 0.25}``, Adam); then training steps (forward + backward + Adam step) of the dense model and
  of the result are timed interleaved (median of rounds), beside the FLOPs of one step counted by
  Lightning's ``measure_flops``; rates through Lightning's ``Throughput``;
* inference: ``factorize_model(rank=0.25)`` with its defaults (guard in inference mode); forward
  latency of dense and result, interleaved;
* the same with ``speed_guard=False``, to show what the guard prevents.

    python benchmarks/bench_speed_guard.py [--quick] [--threads 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import package_version  # noqa: E402


def mlp(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _infer(model: nn.Module, x: torch.Tensor):
    def step() -> None:
        with torch.inference_mode():
            model(x)

    return step


def interleaved(steps: dict, rounds: int, per_round: int) -> dict[str, float]:
    """Median seconds per call of each step, timed round after round in turn."""
    for s in steps.values():
        for _ in range(3):
            s()
    samples: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, s in steps.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                s()
            samples[k].append((time.perf_counter() - t0) / per_round)
    return {k: statistics.median(v) for k, v in samples.items()}


def rates(seconds: float, rows: int, flops: int) -> dict:
    from lightning.fabric.utilities.throughput import Throughput

    tp = Throughput(window_size=2)
    tp.update(time=0.0, batches=0, samples=0, flops=0)
    tp.update(time=seconds, batches=1, samples=rows, flops=flops)
    out = tp.compute()
    return {k: float(v) for k, v in out.items() if k in ("batches_per_sec", "samples_per_sec", "flops_per_sec")}


def flops_of_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    from lightning.fabric.utilities.throughput import measure_flops

    return int(measure_flops(model, lambda: model(x), lambda out: nn.functional.cross_entropy(out, y)))


def flops_of_forward(model: nn.Module, x: torch.Tensor) -> int:
    from lightning.fabric.utilities.throughput import measure_flops

    with torch.no_grad():
        return int(measure_flops(model, lambda: model(x)))


def layer_rows(reports) -> list[dict]:
    return [
        dict(name=r.name, shape=list(r.shape), rank=r.new_rank, speedup=r.speedup, note=r.note) for r in reports
    ]


def factorize_in_training(dense: nn.Module, rows: int, width: int, guard: bool) -> tuple[nn.Module, list, float]:
    """The callback with its defaults (optionally guard off) factorizes at epoch 0, one short epoch."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from factorize_plugin import LowRankFactorization
    from factorize_plugin.surgery.swap import refactorize as refactorize_module

    class Module(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, i):
            self(batch[0])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(rows * 8, width, generator=g), torch.randint(0, 10, (rows * 8,), generator=g))
    module = Module(copy.deepcopy(dense))
    captured: list = []
    real = refactorize_module.refactorize

    def spy(*a, **k):
        t0 = time.perf_counter()
        reports = real(*a, **k)
        captured.append((reports, time.perf_counter() - t0))
        return reports

    import factorize_plugin.integration.callback as cb_module

    cb_module.refactorize = spy
    try:
        cb = LowRankFactorization({0: 0.25}, verbose=False, **({} if guard else {"speed_guard": False}))
        pl.Trainer(
            accelerator="cpu", max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2, num_sanity_val_steps=0,
        ).fit(module, DataLoader(data, batch_size=rows), DataLoader(data, batch_size=rows))  # fmt: skip
    finally:
        cb_module.refactorize = real
    reports, seconds = captured[0]
    return module.net, reports, seconds


def case(name: str, width: int, depth: int, rows: int, rounds: int) -> dict:
    from factorize_plugin import factorize_model

    dense = mlp(width, depth)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(rows, width, generator=g), torch.randint(0, 10, (rows,), generator=g)
    out: dict = dict(model=name, width=width, depth=depth, rows=rows)
    per_round = max(2, int(0.05 / max(1e-5, 3 * width * width * depth * rows / 5e9)))

    # training: the callback's defaults, then the guard off
    train: dict = {}
    models = {"dense": dense}
    for label, guard in (("guarded", True), ("unguarded", False)):
        net, reports, seconds = factorize_in_training(dense, rows, width, guard)
        models[label] = net
        train[label] = dict(layers=layer_rows(reports), refactorize_seconds=seconds)
    steps = {}
    for label, net in models.items():
        net = copy.deepcopy(net)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        steps[label] = _train_step(net, opt, x, y)
    secs = interleaved(steps, rounds, per_round)
    for label, net in models.items():
        flops = flops_of_train_step(copy.deepcopy(net), x, y)
        train.setdefault(label, {}).update(step_seconds=secs[label], flops=flops, **rates(secs[label], rows, flops))
    for label in ("guarded", "unguarded"):
        train[label]["speedup_vs_dense"] = secs["dense"] / secs[label]
        train[label]["flops_ratio_vs_dense"] = train[label]["flops"] / train["dense"]["flops"]
    out["training"] = train

    # inference: factorize_model's defaults, then the guard off
    calib = [torch.randn(rows, width, generator=g) for _ in range(4)]
    infer: dict = {}
    imodels = {"dense": dense}
    for label, guard in (("guarded", True), ("unguarded", False)):
        net = copy.deepcopy(dense)
        t0 = time.perf_counter()
        reports = factorize_model(net, calib, rank=0.25, **({} if guard else {"speed_guard": False}))
        infer[label] = dict(layers=layer_rows(reports), factorize_seconds=time.perf_counter() - t0)
        imodels[label] = net
    secs = interleaved({k: _infer(m, x) for k, m in imodels.items()}, rounds, per_round * 3)
    for label, net in imodels.items():
        flops = flops_of_forward(net, x)
        infer.setdefault(label, {}).update(latency_seconds=secs[label], flops=flops, **rates(secs[label], rows, flops))
    for label in ("guarded", "unguarded"):
        infer[label]["speedup_vs_dense"] = secs["dense"] / secs[label]
        infer[label]["flops_ratio_vs_dense"] = infer[label]["flops"] / infer["dense"]["flops"]
    out["inference"] = infer
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 5 if args.quick else 15
    rows = []
    for name, width, depth, n in (("narrow", 64, 6, 64), ("wide", 1024, 4, 256)):
        r = case(name, width, depth, n, rounds)
        rows.append(r)
        for part, key in (("training", "step_seconds"), ("inference", "latency_seconds")):
            p = r[part]
            kept = sum(1 for layer in p["guarded"]["layers"] if layer["rank"] is not None)
            print(
                f"{name:6} {part:9}: dense {p['dense'][key] * 1e3:.3f} ms | defaults (guard on) {p['guarded'][key] * 1e3:.3f} ms "
                f"= {p['guarded']['speedup_vs_dense']:.2f}x, flops {p['guarded']['flops_ratio_vs_dense']:.2f} of dense, "
                f"{kept} layers factorized | guard off {p['unguarded']['speedup_vs_dense']:.2f}x, flops "
                f"{p['unguarded']['flops_ratio_vs_dense']:.2f}",
                flush=True,
            )
    result = dict(
        benchmark="speed_guard", torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
        processor=platform.processor(), quick=args.quick, package=package_version(),
        settings="Adam; rank 0.25; callback schedule {0: 0.25} with its defaults (SpeedGuard margin 1.15, train mode); "
        "factorize_model defaults (SpeedGuard margin 1.15, inference mode); step times interleaved, median of rounds",
        rows=rows,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("speed_guard_quick.json" if args.quick else "speed_guard.json")).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
