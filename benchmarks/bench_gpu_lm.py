"""The GPT LM on one GPU, bf16-mixed: what the callback does to a real training run (issue 20, item 3).

    python benchmarks/bench_gpu_lm.py [--steps 800 | --quick] [--budget-s 300] [--out benchmarks/results]
    python benchmarks/bench_gpu_lm.py --dry-run   # the same code on the CPU at tiny sizes (tested)

The configuration of ``benchmarks/results/gpu_measurements_2026.md``: ``examples/gpt_task.GPT`` at dim 1024,
8 layers, 16 heads, block 512, batch 32, AdamW, ``precision="bf16-mixed"``, 800 steps in 4 epochs,
trained through ``examples/gpt_train.run`` (same seed, data and steps for every run). In order:

* ``dense``;
* ``step_table``: the whole model's training step (forward + backward + AdamW under bf16 autocast,
  a real batch, CUDA events, median of ``--repeats``) dense and with every projection factorized by
  ``factorize_model(..., rank=f, speed_guard=False)`` at f = 1/2, 1/4, 1/8;
* ``callback_1:0.25`` and ``callback_1:0.5,2:0.25``: the callback with its defaults (whatever the
  speed decision's default is when this runs);
* ``guard_off_1:0.25`` and ``guard_off_1:0.5,2:0.25``: the same with ``speed_guard=False``;
* ``init_0:0.25``: factorized at initialization (``{0: 0.25}`` through the callback, defaults).

Per run it records the whole ``fit`` wall-clock, the validation loss after each epoch (against the
wall-clock since the start of fit), per epoch the training time (first batch to last, the GPU's
queue drained at both ends) and the whole epoch's time, the callback's history (ranks, notes,
per-layer speedups, NMSE, whatever else it records), its logged ``factorize/*`` metrics, and the
milestone cost: the time spent in the callback's ``on_train_epoch_start`` at each epoch (two timer
callbacks placed just before and just after it, the queue drained at both; the milestones are the
epochs of its schedule). Writes ``gpu_lm.json`` (after every part, so a killed run keeps what it
finished) and ``gpu_lm.png`` (validation loss against wall-clock) under ``--out``.

Time budget: one run of at most 6 minutes. From the measured numbers (27.6 s for the dense 800-step
fit; the callback runs 32.8 / 39.1 / 32.5 s with the guard keeping everything dense, 27.4 s with the
guard off; a milestone ~7 s; a dense step 29.5 ms) the plan is: dense ~28 s, step table ~25 s
(three ``factorize_model`` solves of 32 layers, ~6 s each, and 4 x (5 + 20) steps), the callback
runs ~33 / ~39 s, guard off ~28 / ~32 s, at initialization ~33 s: ~220 s, plus ~15 s of imports and
CUDA start-up. So all 800 steps fit, with ~1.5 minutes to spare for a slower speed decision. The
guard: before each part its time is estimated (the planned seconds above, scaled by the measured
dense fit / 28 once the dense run has finished, times 1.15); where the time since the script
started plus that estimate exceeds ``--budget-s`` (default 300 s), that part and every later one
are skipped and recorded as skipped (with why), so the 6-minute limit is not blown: the ~220 s
planned, the estimates' 15 % margin and 45 s left between the default 300 s and 6 minutes absorb a
part that runs past its estimate and the start-up before the clock starts. The JSON is rewritten
after every part, so even a run killed from outside (``timeout 360 python ...``) keeps what it
finished. A part that fails records its error and traceback and the script goes on with the next
one (it exits 1 at the end).

Without CUDA (and without ``--dry-run``) it exits with a message. ``--dry-run`` runs the same code
on the CPU (dim 64, 2 layers, block 32, 8 steps in 4 epochs, bf16-mixed, one thread) in well under a minute
and writes ``gpu_lm_dry_run.json`` / ``.png`` (``tests/test_examples.py`` runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import copy
import json
import platform
import time
import traceback
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from benchmarks._common import package_version
from examples.gpt_task import GPT, VOCAB, Windows, corpus
from examples.gpt_train import run
from factorize_plugin import factorize_model

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (0.5, 0.25, 0.125)
TARGETS = ["blocks.*"]  # every projection of every block (the tied head is not a target)
# measured on the H200 for 800 steps (results/gpu_measurements_2026.md), seconds; the step table's is an estimate
PLANNED = {
    "dense": 28.0,
    "step_table": 25.0,
    "callback_1:0.25": 33.0,
    "callback_1:0.5,2:0.25": 39.0,
    "guard_off_1:0.25": 28.0,
    "guard_off_1:0.5,2:0.25": 32.0,
    "init_0:0.25": 33.0,
}
FITS: dict[str, tuple[Optional[dict[int, float]], dict[str, Any]]] = {
    "dense": (None, {}),
    "callback_1:0.25": ({1: 0.25}, {}),
    "callback_1:0.5,2:0.25": ({1: 0.5, 2: 0.25}, {}),
    "guard_off_1:0.25": ({1: 0.25}, {"speed_guard": False}),
    "guard_off_1:0.5,2:0.25": ({1: 0.5, 2: 0.25}, {"speed_guard": False}),
    "init_0:0.25": ({0: 0.25}, {}),
}
ORDER = ["dense", "step_table", "callback_1:0.25", "guard_off_1:0.25", "callback_1:0.5,2:0.25", "guard_off_1:0.5,2:0.25", "init_0:0.25"]


def config(dry_run: bool, steps: int, epochs: int) -> dict[str, Any]:
    if dry_run:
        model = dict(dim=64, layers=2, heads=4, block=32, batch_size=8, val_windows=16, corpus_bytes=300_000)
        return dict(model=model, steps=8, epochs=4, accelerator="cpu", precision="bf16-mixed", repeats=3, warmup=1, calibration=2)
    # the whole standard library (issue 21): at this size the 4 MB of top-level files is memorized
    model = dict(dim=1024, layers=8, heads=16, block=512, batch_size=32, val_windows=256, corpus_bytes=4_000_000, corpus="full")
    return dict(model=model, steps=steps, epochs=epochs, accelerator="gpu", precision="bf16-mixed", repeats=20, warmup=5, calibration=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HookClock(Callback):
    """The time spent in the ``on_train_epoch_start`` of the callbacks placed between its two
    halves (``HookClock.around``), at each epoch, the device's queue drained at both ends."""

    def __init__(self, record: list[dict[str, Any]], milestones: set[int], start: Optional["HookClock"] = None) -> None:
        self.record, self.milestones, self.start, self.t0 = record, milestones, start, 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        now = time.perf_counter()
        if self.start is None:  # the half before the timed callbacks
            self.t0 = now
            return
        epoch = trainer.current_epoch
        self.record.append({"epoch": epoch, "milestone": epoch in self.milestones, "seconds": now - self.start.t0})

    @staticmethod
    def around(record: list[dict[str, Any]], milestones: set[int]) -> Callable[[Callback], list[Callback]]:
        def wrap(factorize: Callback) -> list[Callback]:
            start = HookClock(record, milestones)
            return [start, factorize, HookClock(record, milestones, start)]

        return wrap


def fit_run(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    schedule, callback = FITS[name]
    hook_times: list[dict[str, Any]] = []
    wrap = HookClock.around(hook_times, set(schedule)) if schedule is not None else None
    trainer = dict(accelerator=cfg["accelerator"], precision=cfg["precision"])
    result = run(schedule, cfg["steps"], cfg["epochs"], model=cfg["model"], callback=callback or None, trainer=trainer, wrap=wrap)
    result["callback_settings"] = callback or "defaults"
    if schedule is not None:
        result["hook_seconds"] = hook_times
        result["milestone_seconds"] = [h for h in hook_times if h["milestone"]]
    result["changed_layers"] = sum(1 for r in result["ranks"].values() if r is not None)
    return result


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_ms(model: torch.nn.Module, batches: list, warmup: int, repeats: int) -> dict[str, float]:
    """Median (and min / max) milliseconds of one whole training step, AdamW as in GPTTask."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=3e-4, betas=(0.9, 0.95))
    device = batches[0][0].device
    for i in range(warmup):
        _train_step(model, opt, *batches[i % len(batches)])
    _sync(device)
    times = []
    for i in range(repeats):
        x, y = batches[i % len(batches)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _train_step(model, opt, x, y)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            _train_step(model, opt, x, y)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": times[len(times) // 2], "min_ms": times[0], "max_ms": times[-1], "repeats": repeats}


def step_table(cfg: dict[str, Any]) -> dict[str, Any]:
    m = cfg["model"]
    device = torch.device("cuda" if cfg["accelerator"] == "gpu" else "cpu")
    pl.seed_everything(0, verbose=False)
    dense = GPT(VOCAB, m["block"], m["dim"], m["layers"], m["heads"]).to(device)
    train, _ = corpus(m.get("corpus", "top_level"), m["corpus_bytes"])
    count = m["batch_size"] * max(cfg["calibration"], 8)
    loader = DataLoader(Windows(train, m["block"], count, seed=0), batch_size=m["batch_size"], drop_last=True)
    batches = [(x.to(device), y.to(device)) for x, y in loader]
    calibration = [x for x, _ in batches[: cfg["calibration"]]]
    dense_time = step_ms(copy.deepcopy(dense), batches, cfg["warmup"], cfg["repeats"])
    rows = []
    for fraction in FRACTIONS:
        model = copy.deepcopy(dense)
        _sync(device)
        t0 = time.perf_counter()
        reports = factorize_model(model, calibration, rank=fraction, targets=TARGETS, speed_guard=False)
        _sync(device)
        solve = time.perf_counter() - t0
        t = step_ms(model, batches, cfg["warmup"], cfg["repeats"])
        changed = [r for r in reports if r.changed]
        rows.append(
            {
                "fraction": fraction, "dense_ms": dense_time["median_ms"], "factorized_ms": t["median_ms"],
                "speedup": dense_time["median_ms"] / t["median_ms"], "factorized_timing": t,
                "layers": len(reports), "changed": len(changed), "ranks": {r.name: r.new_rank for r in reports},
                "mean_nmse": sum(r.nmse for r in changed) / max(1, len(changed)), "factorize_model_seconds": solve,
            }
        )  # fmt: skip
        print(f"  step table, rank {fraction}: {dense_time['median_ms']:.2f} -> {t['median_ms']:.2f} ms "
              f"({rows[-1]['speedup']:.2f}x), {len(changed)}/{len(reports)} layers, solve {solve:.1f} s", flush=True)  # fmt: skip
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"dense": dense_time, "rows": rows, "tokens_per_step": m["batch_size"] * m["block"], "targets": TARGETS}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="200 steps instead of --steps (a shorter GPU run)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip the parts that would end after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes (checks the script)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_lm.py needs a CUDA GPU; none is visible here (--dry-run checks the script on the CPU)")
    cfg = config(args.dry_run, 200 if args.quick else args.steps, args.epochs)
    if args.dry_run:
        torch.set_num_threads(1)  # a shared CPU: more threads only contend
        device_name = "cpu (dry run)"
    else:  # float32 matmul precision left at PyTorch's default: the solver's numerics as users get them
        device_name = torch.cuda.get_device_name()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_lm_dry_run" if args.dry_run else "gpu_lm"
    result: dict[str, Any] = {
        "benchmark": "gpu_lm",
        "setup": {
            "device": device_name, "torch": torch.__version__, "lightning": pl.__version__, "machine": platform.machine(),
            "model": "examples/gpt_task.GPT, byte-level, tied head", "model_kwargs": cfg["model"], "steps": cfg["steps"],
            "epochs": cfg["epochs"], "precision": cfg["precision"], "optimizer": "AdamW (GPTTask.configure_optimizers)",
            "budget_s": args.budget_s, "dry_run": args.dry_run, "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
        "runs": {}, "step_table": None, "milestone_cost": {}, "skipped": {}, "errors": {},
        "version": package_version(),
    }  # fmt: skip
    scale = cfg["steps"] / 800  # the plan's seconds, until the dense run has measured this machine
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    over = False
    for name in ORDER:
        elapsed = time.perf_counter() - t_start
        estimate = 1.15 * PLANNED[name] * (scale if name != "step_table" or "dense" in result["runs"] else 1.0)
        if over or elapsed + estimate > args.budget_s:
            over = True
            result["skipped"][name] = f"budget: {elapsed:.0f} s elapsed + ~{estimate:.0f} s estimated > --budget-s {args.budget_s:.0f}"
            print(f"{name}: skipped ({result['skipped'][name]})", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            if name == "step_table":
                result["step_table"] = step_table(cfg)
            else:
                r = result["runs"][name] = fit_run(name, cfg)
                if "milestone_seconds" in r:
                    result["milestone_cost"][name] = r["milestone_seconds"]
                if name == "dense":
                    scale = r["fit_seconds"] / PLANNED["dense"]
                print(f"{name:>24}: fit {r['fit_seconds']:6.1f} s, final val loss {r['final_val_loss']:.4f}, "
                      f"{r['changed_layers']} layers factorized, milestones "
                      f"{[round(m['seconds'], 2) for m in r.get('milestone_seconds', [])]} s", flush=True)  # fmt: skip
        except Exception as exc:  # record it and go on: one broken part must not waste the device time of the others
            result["errors"][name] = {"error": repr(exc), "traceback": traceback.format_exc()}
            print(f"{name}: FAILED {exc!r}", flush=True)
        result.setdefault("part_seconds", {})[name] = time.perf_counter() - t0
        summarize(result)
        json_path.write_text(json.dumps(result, indent=1, default=str))
    result["benchmark_seconds"] = time.perf_counter() - t_start
    summarize(result)
    json_path.write_text(json.dumps(result, indent=1, default=str))
    plot(result, png_path)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {json_path} and {png_path} in {result['benchmark_seconds']:.1f} s")
    if result["errors"]:
        raise SystemExit(f"parts failed: {sorted(result['errors'])}")
    return result


def summarize(result: dict[str, Any]) -> None:
    runs = result["runs"]
    dense = runs.get("dense")
    summary: dict[str, Any] = {}
    for name, r in runs.items():
        row = {"fit_seconds": r["fit_seconds"], "final_val_loss": r["final_val_loss"], "changed_layers": r["changed_layers"]}
        if dense is not None:
            row["speed_vs_dense"] = dense["fit_seconds"] / r["fit_seconds"]
            row["loss_vs_dense"] = r["final_val_loss"] / dense["final_val_loss"] - 1
        if "milestone_seconds" in r:
            row["milestone_seconds"] = [m["seconds"] for m in r["milestone_seconds"]]
        summary[name] = row
    if result["step_table"] is not None:
        summary["step_table_speedup"] = {str(row["fraction"]): row["speedup"] for row in result["step_table"]["rows"]}
    result["summary"] = summary


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, r in result["runs"].items():
        xs = [p["seconds"] for p in r["curve"]]
        ys = [p["val_loss"] for p in r["curve"]]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{name} ({r['fit_seconds']:.1f} s)")
    ax.set_xlabel("wall-clock since the start of fit (s)")
    ax.set_ylabel("validation loss (nats / byte)")
    s = result["setup"]
    ax.set_title(f"GPT LM, {s['device']}, {s['precision']}, {s['steps']} steps", fontsize=10)
    ax.grid(alpha=0.3)
    if result["runs"]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
