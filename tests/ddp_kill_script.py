"""Two-process CPU/gloo runs under ``strategy="ddp"`` where rank 1 dies inside a milestone (run by
tests/test_rank_killed.py). Lightning re-launches this script (same arguments) as rank 1.

``python tests/ddp_kill_script.py OUT_DIR kill``: WideNet, milestone at epoch 1, statistics in two
passes (``max_statistics_bytes``: one layer per pass, one owner each), a checkpoint every epoch.
At the milestone rank 1 ``os._exit``s inside its solve of the second pass (a monkeypatch of the
solver, in this script only), after rank 0 solved the first pass: rank 0 must fail, not hang.

``python tests/ddp_kill_script.py OUT_DIR resume``: fresh processes and a fresh dense model resume
from the last checkpoint written; each rank writes ``OUT_DIR/rank<r>.pt`` (the structure and
weights after the restore, the factors before the DDP wrapper is rebuilt, the history).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

import factorize_plugin.integration.lightning_host as host_module  # noqa: E402
import factorize_plugin.surgery.swap.refactorize as refactorize_module  # noqa: E402
from factorize_plugin import LowRankFactorization, Statistics  # noqa: E402
from factorize_plugin.surgery.statistics.passes import statistics_bound  # noqa: E402
from lightning_helpers import (  # noqa: E402
    DDP_MODEL_KWARGS,
    TINY,
    WIDE_TARGETS,
    WideNet,
    composed,
    state_dict_cpu,
    structure,
)

SCHEDULE = {1: 0.25}
DIED = "rank1_died_in_solve"


def budget() -> int:
    """One of the two 256 x 256 layers' statistics (DDP: no held-out halves): one layer per pass."""
    return statistics_bound(WideNet().classifier[0], "auto", holdout=False, factorized=True)


def callback() -> LowRankFactorization:
    return LowRankFactorization(
        SCHEDULE, **dict(TINY, targets=WIDE_TARGETS), statistics=Statistics(sample_fraction=1.0, max_bytes=budget()), output_batches=0,
    )  # fmt: skip


def make_trainer(callbacks, **kwargs) -> pl.Trainer:
    # the process group's timeout (rendezvous and collectives) bounds any wait on a dead rank; it
    # must cover a slow start of rank 1 on a loaded machine (the collectives fail at once anyway:
    # gloo sees the dead peer's socket close)
    return pl.Trainer(
        strategy=DDPStrategy(timeout=timedelta(seconds=300)), accelerator="cpu", devices=2, max_epochs=2,
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        **kwargs,
    )  # fmt: skip


def kill(out: str) -> None:
    real = refactorize_module.decompose

    def dying(*args, **kwargs):
        if int(os.environ.get("LOCAL_RANK", "0")) == 1:
            open(os.path.join(out, DIED), "w").close()
            os._exit(17)  # no cleanup, no exception handling: as a killed process
        return real(*args, **kwargs)

    refactorize_module.decompose = dying
    pl.seed_everything(0)
    model = WideNet(**DDP_MODEL_KWARGS)
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    make_trainer([callback(), ckpt]).fit(model)


class Record(pl.Callback):
    """The structure and weights once the checkpoint is restored (before the milestone), and each
    rank's own factors right before the DDP wrapper is rebuilt (it broadcasts rank 0's)."""

    def __init__(self) -> None:
        self.start_structure = None
        self.start_state = None

    def on_train_start(self, trainer, pl_module):
        self.start_structure = structure(pl_module, WIDE_TARGETS)
        self.start_state = state_dict_cpu(pl_module)


def resume(out: str) -> None:
    before_rewrap: list = []
    real = host_module.rewrap_ddp

    def spy(trainer):
        before_rewrap.append(composed(trainer.lightning_module, WIDE_TARGETS))
        real(trainer)

    host_module.rewrap_ddp = spy
    ckpts = sorted(os.listdir(os.path.join(out, "ckpt")))
    pl.seed_everything(0)
    model = WideNet(**DDP_MODEL_KWARGS)  # dense
    cb, record = callback(), Record()
    trainer = make_trainer([cb, record], enable_checkpointing=False)
    trainer.fit(model, ckpt_path=os.path.join(out, "ckpt", ckpts[-1]))
    result = {
        "ckpt": ckpts[-1],
        "start_structure": record.start_structure,
        "start_state": record.start_state,
        "before_rewrap": before_rewrap,
        "done": list(cb.done),
        "history": cb.history,
        "structure": structure(model, WIDE_TARGETS),
        "final": state_dict_cpu(model),
        "budget": budget(),
    }
    torch.save(result, os.path.join(out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    {"kill": kill, "resume": resume}[sys.argv[2]](sys.argv[1])
