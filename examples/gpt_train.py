"""Train the GPT-style byte-level language model of ``examples.gpt_task`` on the Python standard
library's own source files, with ``LowRankFactorization`` lowering the ranks of the attention and
MLP projections over the run (the head, tied to the embedding, stays as it is), on the CPU.

    python examples/gpt_train.py [--steps 600] [--epochs 6] [--schedule 1:0.5,2:0.25] [--dense]

Prints validation loss (nats per byte) and perplexity after each epoch, the whole ``fit`` wall-clock
time (validation, collection and solves included) and training tokens/s per epoch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples.*

import argparse
import math
import time
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from examples.gpt_task import GPTTask
from factorize_plugin import LowRankFactorization


def _sync(pl_module) -> None:
    """Waits for the GPU's queue (a no-op on the CPU), so that wall-clock readings are honest."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


class RunClock(Callback):
    """Wall-clock of the whole fit, val loss after each validation run (with its time since the
    start of fit) and per epoch: training tokens/s (optimizer steps only: batch start to batch end),
    ``train_seconds`` (first batch start to last batch end, the GPU's queue drained at both ends)
    and ``epoch_seconds`` (the whole epoch, its start hooks (milestones) and validation included)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.cpu_start = 0.0  # time.process_time(): this process's CPU time, honest on a loaded machine
        self.points: list[dict[str, float]] = []
        self.epochs: list[dict[str, float]] = []
        self._batch_start = 0.0
        self._train_seconds = 0.0
        self._tokens = 0
        self._epoch_start = 0.0
        self._first_batch = 0.0
        self._last_batch = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._train_seconds, self._tokens = 0.0, 0
        _sync(pl_module)
        self._epoch_start = self._first_batch = self._last_batch = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            _sync(pl_module)
        self._batch_start = time.perf_counter()
        if batch_idx == 0:
            self._first_batch = self._batch_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            _sync(pl_module)
        self._last_batch = time.perf_counter()
        self._train_seconds += self._last_batch - self._batch_start
        self._tokens += batch[0].numel()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        loss = float(trainer.callback_metrics["val_loss"])
        self.points.append(
            {"seconds": time.perf_counter() - self.start, "cpu_seconds": time.process_time() - self.cpu_start,
             "step": trainer.global_step, "val_loss": loss}
        )  # fmt: skip

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _sync(pl_module)
        self.epochs.append(
            {
                "epoch": trainer.current_epoch,
                "tokens_per_s": self._tokens / max(self._train_seconds, 1e-9),
                "train_seconds": self._last_batch - self._first_batch,
                "epoch_seconds": time.perf_counter() - self._epoch_start,
            }
        )


def parse_schedule(text: str) -> dict[int, float]:
    """``"1:0.5,2:0.25"`` -> ``{1: 0.5, 2: 0.25}``."""
    out = {}
    for item in filter(None, text.split(",")):
        epoch, value = item.split(":")
        out[int(epoch)] = float(value)
    return out


def run(
    schedule: Optional[Union[dict[int, Any], str]],
    steps: int = 600,
    epochs: int = 6,
    seed: int = 0,
    model: Optional[dict[str, Any]] = None,
    callback: Optional[dict[str, Any]] = None,
    verbose: bool = False,
    trainer: Optional[dict[str, Any]] = None,
    wrap: Optional[Callable[[LowRankFactorization], list[Callback]]] = None,
) -> dict[str, Any]:
    """One training run (dense when ``schedule`` is None; ``"auto"`` lets the callback choose); returns its
    measurements.

    ``trainer`` overrides the Trainer's arguments (default: one CPU, full precision), e.g.
    ``dict(accelerator="gpu", precision="bf16-mixed")``. ``wrap`` is given the run's
    ``LowRankFactorization`` and returns the callbacks that stand in its place, in order (it among
    them), e.g. timers around its hooks (``benchmarks/bench_gpu_lm.py``)."""
    pl.seed_everything(seed, verbose=False)
    kwargs = dict(dim=256, layers=4, heads=4, block=64, batch_size=16, val_windows=256)
    kwargs.update(model or {})
    per_epoch = steps // epochs
    task = GPTTask(**kwargs, train_windows=per_epoch * kwargs["batch_size"], max_steps=steps, seed=seed)
    clock = RunClock()
    callbacks: list[Callback] = [clock]
    factorize = None
    if schedule is not None:
        factorize = LowRankFactorization(schedule, verbose=verbose, **(callback or {}))
        callbacks += wrap(factorize) if wrap is not None else [factorize]
    settings: dict[str, Any] = dict(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
        reload_dataloaders_every_n_epochs=1,  # fresh random windows each epoch
    )
    settings.update(trainer or {})
    fitter = pl.Trainer(**settings)
    t0, c0 = time.perf_counter(), time.process_time()
    fitter.fit(task)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    final = clock.points[-1]["val_loss"]
    return {
        "schedule": schedule,
        "fit_seconds": seconds,
        "fit_cpu_seconds": cpu_seconds,
        "steps": fitter.global_step,
        "final_val_loss": final,
        "final_perplexity": math.exp(final),
        "curve": clock.points,
        "epochs": clock.epochs,
        "ranks": dict(factorize.ranks) if factorize is not None else {},
        "notes": dict(factorize.skipped) if factorize is not None else {},
        "history": list(factorize.history) if factorize is not None else [],
        "metrics": {k: float(v) for k, v in fitter.callback_metrics.items() if k.count("/") <= 1 and v.numel() == 1},
        "params": sum(p.numel() for p in task.parameters()),
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--schedule", default="1:0.5,2:0.25", help="epoch:rank fraction, comma separated")
    parser.add_argument("--dense", action="store_true", help="no factorization (the baseline)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--corpus", default="top_level", choices=["top_level", "full"],
                        help="top_level: 4 MB of the stdlib's top-level files; full: the whole stdlib, split by file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    schedule = None if args.dense else parse_schedule(args.schedule)
    result = run(schedule, args.steps, args.epochs, model=dict(dim=args.dim, layers=args.layers, corpus=args.corpus),
                 verbose=True)
    for p in result["curve"]:
        print(
            f"step {p['step']:>5}  {p['seconds']:7.1f} s  val loss {p['val_loss']:.4f}"
            f"  ppl {math.exp(p['val_loss']):.3f}"
        )
    for e in result["epochs"]:
        print(f"epoch {e['epoch']}: {e['tokens_per_s']:,.0f} training tokens/s")
    print(
        f"fit: {result['fit_seconds']:.1f} s for {result['steps']} steps;"
        f" final val loss {result['final_val_loss']:.4f}"
    )
    return result


if __name__ == "__main__":
    main()
