"""Two-process CPU/gloo run of LowRankFactorization under ``strategy="ddp"`` (run by tests/test_ddp.py).

``python tests/ddp_script.py OUT_DIR``: Lightning re-launches this script as rank 1. In the same
processes: (1) an uninterrupted 3-epoch run with milestones at epochs 1 and 2, checkpointing every
epoch; (2) a fresh dense model resumed from the epoch-1 checkpoint (after the first milestone,
the second one's statistics to be re-collected). Each rank writes ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import factorize_plugin.integration.lightning_host as host_module  # noqa: E402
from factorize_plugin import LowRankFactorization  # noqa: E402
from factorize_plugin.surgery.timing.speed import SpeedGuard  # noqa: E402
from lightning_helpers import (  # noqa: E402
    DDP_CALLBACK_KWARGS,
    DDP_MODEL_KWARGS,
    DDP_SCHEDULE,
    TinyNet,
    composed,
    state_dict_cpu,
    structure,
)

clock_calls: list[list] = []


def rank_dependent_clock(step, model):
    """The whole-model speed check's fake clock, which disagrees across ranks: on rank 0 the
    training step costs 0.1 + each target's rank fraction (1 dense), so lower ranks are faster; on
    rank 1 the inverse. It runs the real step once (rank 0's training_step alone, no collective).
    Agreed decisions = rank 0's (and rank 1 never times)."""
    step()
    s = structure(model)
    clock_calls.append(sorted(n for n, r in s.items() if r is not None))
    fraction = {"features.2": 16, "classifier.0": 32, "classifier.2": 10}
    seconds = 0.1 + sum(1.0 if r is None else r / fraction[n] for n, r in s.items())
    return seconds if int(os.environ.get("LOCAL_RANK", "0")) == 0 else 1.0 / seconds

# Capture every rank's own factors right before the DDP wrapper is rebuilt: the new wrapper
# broadcasts rank 0's parameters, which would hide ranks that solved different problems.
before_rewrap: list[dict] = []
_real_rewrap = host_module.rewrap_ddp


def _spy_rewrap(trainer):
    before_rewrap.append(composed(trainer.lightning_module))
    _real_rewrap(trainer)


host_module.rewrap_ddp = _spy_rewrap


class Record(pl.Callback):
    """Each rank's first training batch per epoch (its sum), and the weights after epoch 0."""

    def __init__(self) -> None:
        self.sums: list[float] = []
        self.epoch0 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.sums.append(float(batch[0].double().sum()))

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.epoch0 = state_dict_cpu(pl_module)


def make_trainer(callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, **kwargs,
    )  # fmt: skip


def main(out: str) -> None:
    ckpt_dir = os.path.join(out, "ckpt")
    pl.seed_everything(0)
    model = TinyNet(**DDP_MODEL_KWARGS)
    cb = LowRankFactorization(DDP_SCHEDULE, **dict(DDP_CALLBACK_KWARGS, speed_guard=SpeedGuard(clock=rank_dependent_clock)))
    first = Record()
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer([cb, first, ckpt])
    trainer.fit(model)
    rank = trainer.global_rank
    result = {
        "world_size": trainer.world_size,
        "first_batch_sums": first.sums,
        "epoch0": first.epoch0,
        "before_rewrap": list(before_rewrap),
        "history": cb.history,
        "structure": structure(model),
        "final": state_dict_cpu(model),
        "val_batches": list(trainer.num_val_batches),
        "clock_calls": list(clock_calls),
    }

    before_rewrap.clear()
    pl.seed_everything(0)
    fresh = TinyNet(**DDP_MODEL_KWARGS)  # dense
    cb2 = LowRankFactorization(DDP_SCHEDULE, **DDP_CALLBACK_KWARGS)
    resumed = make_trainer([cb2], enable_checkpointing=False)
    resumed.fit(fresh, ckpt_path=os.path.join(ckpt_dir, "epoch=1.ckpt"))
    result.update(
        resumed_final=state_dict_cpu(fresh),
        resumed_history=cb2.history,
        resumed_done=cb2.done,
        resumed_rewraps=len(before_rewrap),
    )
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
