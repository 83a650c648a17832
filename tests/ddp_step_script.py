"""Two-process CPU/gloo run of ``LowRankFactorization(..., interval="step")`` under ``strategy="ddp"``
(run by tests/test_ddp_step.py).

``python tests/ddp_step_script.py OUT_DIR``: Lightning re-launches this script as rank 1. In the same
processes: (1) an uninterrupted 2-epoch run (8 optimizer steps per epoch, a validation run every 4
batches) with ``progressive(FixedRank(4), [0, 4, 10])`` at steps 0, 4, 10, checkpointing after
every step; (2) a fresh dense model resumed from the step-5 checkpoint (mid-epoch, after the
second milestone). Each rank writes ``OUT_DIR/rank<r>.pt``.
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
from factorize_plugin import FixedRank, LowRankFactorization, progressive  # noqa: E402
from lightning_helpers import DDP_CALLBACK_KWARGS, DDP_MODEL_KWARGS, TinyNet, composed, state_dict_cpu, structure  # noqa: E402

SCHEDULE = progressive(FixedRank(4), [0, 4, 10])

# every rank's own factors right before the DDP wrapper is rebuilt (the new wrapper broadcasts rank
# 0's parameters, which would hide ranks that solved different problems)
before_rewrap: list[dict] = []
_real_rewrap = host_module.rewrap_ddp


def _spy_rewrap(trainer):
    before_rewrap.append(composed(trainer.lightning_module))
    _real_rewrap(trainer)


host_module.rewrap_ddp = _spy_rewrap


class StepProbe(pl.Callback):
    """The targets' structure at every training batch's start (after the callback's swap), by step."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at[trainer.global_step] = structure(pl_module)


def make_trainer(callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, val_check_interval=4, callbacks=callbacks,
        logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True, **kwargs,
    )  # fmt: skip


def main(out: str) -> None:
    ckpt_dir = os.path.join(out, "ckpt")
    pl.seed_everything(0)
    model = TinyNet(**DDP_MODEL_KWARGS)
    cb = LowRankFactorization(SCHEDULE, interval="step", **DDP_CALLBACK_KWARGS)
    probe = StepProbe()
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", save_top_k=-1, every_n_train_steps=1)
    trainer = make_trainer([cb, probe, ckpt])
    trainer.fit(model)
    result = {
        "world_size": trainer.world_size,
        "before_rewrap": list(before_rewrap),
        "history": cb.history,
        "done": list(cb.done),
        "at": probe.at,
        "final": state_dict_cpu(model),
    }

    before_rewrap.clear()
    pl.seed_everything(0)
    fresh = TinyNet(**DDP_MODEL_KWARGS)  # dense
    cb2 = LowRankFactorization(SCHEDULE, interval="step", **DDP_CALLBACK_KWARGS)
    probe2 = StepProbe()
    resumed = make_trainer([cb2, probe2], enable_checkpointing=False)
    resumed.fit(fresh, ckpt_path=os.path.join(ckpt_dir, "step=5.ckpt"))
    result.update(
        resumed_final=state_dict_cpu(fresh),
        resumed_history=cb2.history,
        resumed_done=list(cb2.done),
        resumed_at=probe2.at,
        resumed_rewraps=len(before_rewrap),
    )
    torch.save(result, os.path.join(out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
