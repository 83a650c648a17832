"""``schedule="auto"`` never ends dense by accident (issue 29): the latest switch is computed from
the validation runs the Trainer will actually make (``check_val_every_n_epoch``, ``max_steps`` with
the epoch's optimizer steps from ``limit_train_batches`` and ``accumulate_grad_batches``,
``max_epochs``) and moves to the last run that can still apply it; where none can, a warning before
training says so; with ``max_time`` a warning at the first validation run where the time left
cannot reach the latest switch.

Real Lightning Trainers on TinyNet (8 training batches of 32 per epoch); ``speed_guard=False``
(``TINY``): the structures asserted never depend on this machine's timings; the time-limit case
uses a Timer whose clock counts training batches."""

from __future__ import annotations

import re
import warnings
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, Timer

from factorize_plugin import Auto, FixedRank, LowRankFactorization, Readiness
from lightning_helpers import TINY, SettlingNet, TinyNet, structure

BATCHES = 8  # TinyNet: 256 training samples in batches of 32


class RestlessNet(SettlingNet):
    """Spectra that never settle, however often they are watched: the largest singular value of
    each targeted layer cycles through 1x, 3x, 9x its base (period 3 epochs), so consecutive
    validation runs (every epoch, or every second) always see stable ranks far apart."""

    def spectrum_weight(self, name: str, epoch: int) -> torch.Tensor:
        u, v, s = self._bases[name]
        s = s.clone()
        s[0] = s[0] * 3 ** (epoch % 3)
        return (u * s) @ v.T


class ManualNet(TinyNet):
    """TinyNet under manual optimization: how many optimizer steps an epoch makes is the
    ``training_step``'s business, not known before training."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


class BatchClock(Timer):
    """``max_time`` on a clock that counts training batches (1 s each): the Timer stops the run as
    the real one would, but the same way on every machine."""

    def __init__(self, seconds: int) -> None:
        super().__init__(duration=timedelta(seconds=seconds), interval="step", verbose=False)
        self.batches = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self.batches += 1
        super().on_train_batch_end(trainer, *args, **kwargs)

    def time_elapsed(self, stage: str = "train") -> float:
        return float(self.batches)


class StopBeforeTraining(Callback):
    """Ends ``fit`` at the first training batch: whatever was warned by then was warned before training."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise _Stopped


class _Stopped(Exception):
    pass


def _trainer(callbacks: list, **limits: Any) -> pl.Trainer:
    """A quiet, deterministic CPU Trainer with the given limits (``max_epochs``, ``max_steps``, ...)."""
    return pl.Trainer(
        accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, **limits,
    )  # fmt: skip


def _callback(**readiness: Any) -> LowRankFactorization:
    # room=None: every layer must settle (RestlessNet's never do), so only `latest` can switch
    return LowRankFactorization(Auto(target=FixedRank(0.5), readiness=Readiness(room=None, **readiness)), **TINY)


def _watch(cb: LowRankFactorization) -> list[dict]:
    return [h for h in cb.history if h.get("event") == "watch"]


def _milestones(cb: LowRankFactorization) -> list[int]:
    return [h["epoch"] for h in cb.history if h.get("event") == "milestone"]


def _auto_warnings(record: list) -> list[str]:
    return [str(w.message) for w in record if "schedule='auto'" in str(w.message)]


def _fit(cb: LowRankFactorization, model: pl.LightningModule, **limits: Any) -> tuple[pl.Trainer, list[str]]:
    """Fits with ``limits``; returns the Trainer and the callback's ``schedule='auto'`` warnings."""
    trainer = _trainer([cb], **limits)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model)
    return trainer, _auto_warnings(record)


# ------------------------------------------------------------------ the switch moves to a run that can apply it
def test_sparse_validation_moves_the_latest_switch_to_the_last_run_that_can_apply_it():
    # validation at the end of epochs 1, 3, 5; latest 0.75 x 6 -> epoch 5, which would need a
    # decision at the run of epoch 4 (none) or 5 (epoch 6 does not train): the run of epoch 3 decides
    cb = _callback()
    model = RestlessNet()
    _, warned = _fit(cb, model, max_epochs=6, check_val_every_n_epoch=2)
    watch = _watch(cb)
    assert [w["epoch"] for w in watch] == [1, 3]
    assert [w["reason"] for w in watch] == [None, "latest"] and watch[-1]["switch_epoch"] == 4
    assert [w["latest_switch_epoch"] for w in watch] == [4, 4]
    assert _milestones(cb) == [4]
    assert all(r is not None for r in structure(model).values())
    assert warned == []  # nothing went wrong: no warning


def test_a_run_limited_by_max_steps_only_switches_at_its_latest_epoch():
    # max_steps=32 at 8 steps per epoch: 4 epochs; latest 0.75 x 4 -> epoch 3
    cb = _callback()
    model = RestlessNet()
    trainer, warned = _fit(cb, model, max_epochs=None, max_steps=4 * BATCHES)
    assert trainer.global_step == 4 * BATCHES
    watch = _watch(cb)
    assert [w["reason"] for w in watch] == [None, None, "latest"] and watch[-1]["switch_epoch"] == 3
    assert _milestones(cb) == [3]
    assert all(r is not None for r in structure(model).values())
    assert warned == []


def test_the_epoch_length_counts_limit_train_batches_and_accumulation():
    # 3 batches per epoch, an optimizer step every 2 and at the epoch's last batch: 2 steps per epoch,
    # so max_steps=8 trains 4 epochs -> latest epoch 3 (3 steps per epoch would give 2; 8 batches, 1)
    cb = _callback()
    trainer, warned = _fit(
        cb, RestlessNet(), max_epochs=None, max_steps=8, limit_train_batches=3, accumulate_grad_batches=2
    )
    assert trainer.global_step == 8 and trainer.current_epoch == 4
    assert _watch(cb)[-1]["reason"] == "latest" and _milestones(cb) == [3]
    assert warned == []


def test_max_steps_below_max_epochs_sets_the_length():
    cb = _callback(latest=0.5)
    trainer, warned = _fit(cb, RestlessNet(), max_epochs=20, max_steps=4 * BATCHES)
    assert trainer.current_epoch == 4
    assert _milestones(cb) == [2]  # 0.5 x 4 epochs, not 0.5 x 20 (which would never come)
    assert warned == []


# ------------------------------------------------------------------ warned before training
@pytest.mark.parametrize(
    "limits, says",
    [
        (dict(max_epochs=3, check_val_every_n_epoch=3), r"check_val_every_n_epoch=3.*max_epochs"),
        (dict(max_epochs=1), r"max_epochs"),
        (dict(max_epochs=None, max_steps=BATCHES), r"max_steps=8"),
    ],
    ids=["validation-every-3-of-3-epochs", "one-epoch", "max-steps-one-epoch"],
)
def test_no_validation_run_can_apply_a_switch_warns_before_training(limits, says):
    cb = _callback(latest=None)  # even when only the signal may switch: it cannot either
    trainer = _trainer([cb, StopBeforeTraining()], **limits)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(_Stopped):
            trainer.fit(RestlessNet())
    (message,) = _auto_warnings(record)
    assert "cannot switch" in message and "ends dense" in message
    assert re.search(says, message), message


@pytest.mark.parametrize(
    "model, limits, says",
    [
        (RestlessNet, dict(max_epochs=-1, limit_train_batches=1), r"max_epochs=-1"),
        (RestlessNet, dict(max_epochs=None, max_time=timedelta(hours=1)), r"max_time"),
        (ManualNet, dict(max_epochs=None, max_steps=100), r"manual optimization"),
    ],
    ids=["endless", "max-time-only", "max-steps-manual-optimization"],
)
def test_latest_that_cannot_be_computed_warns_before_training(model, limits, says):
    cb = _callback()
    trainer = _trainer([cb, StopBeforeTraining()], **limits)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(_Stopped):
            trainer.fit(model())
    (message,) = _auto_warnings(record)
    assert "Readiness.latest" in message and re.search(says, message), message
    assert "Readiness(latest=None)" in message  # how to silence it when intended


def test_latest_none_and_an_unknown_length_is_quiet():
    cb = _callback(latest=None)
    trainer = _trainer([cb, StopBeforeTraining()], max_epochs=-1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(_Stopped):
            trainer.fit(RestlessNet())
    assert _auto_warnings(record) == []


# ------------------------------------------------------------------ max_time: warned when it becomes clear
def test_max_time_warns_at_the_first_run_where_the_latest_switch_is_out_of_reach():
    # 8 s per epoch on the batch clock, 20 s: the Timer stops the run in epoch 2; the latest switch
    # (epoch 5 of max_epochs=6) needs epochs 1-4 to finish first: clear at the run of epoch 0
    cb = _callback()
    clock = BatchClock(seconds=20)
    seen: list[int] = []

    class Probe(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen.append(len(_auto_warnings(record)))

    trainer = _trainer([cb, clock, Probe()], max_epochs=6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(RestlessNet())
    assert clock.batches == 20  # the time limit did stop the run, in epoch 2
    assert [w["epoch"] for w in _watch(cb)] == [0, 1, 2]
    assert seen[0] == 1  # warned at the validation run of epoch 0, and only once
    (message,) = _auto_warnings(record)
    assert "max_time" in message and "epoch 2" in message and "epoch 5" in message, message
    assert _milestones(cb) == []  # a time estimate never moves the switch: the decision stays deterministic


def test_max_time_with_room_for_the_latest_switch_is_quiet():
    cb = _callback()
    trainer = _trainer([cb, BatchClock(seconds=1000)], max_epochs=6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(RestlessNet())
    assert _auto_warnings(record) == [] and _milestones(cb) == [5]


@pytest.mark.parametrize("ckpt", ["epoch=1.ckpt", "step=11.ckpt"], ids=["at-an-epoch-end", "mid-epoch"])
def test_a_resumed_max_steps_run_plans_the_same_latest_switch(tmp_path, ckpt):
    # max_steps=41 at 8 steps per epoch: 6 epochs (the last of 1 step), latest 0.75 x 6 -> epoch 5.
    # Resumed after epoch 1 (step 16; Lightning's current_epoch still 1 at on_train_start) or in
    # epoch 1 after its 3rd batch (step 11), 25 / 30 steps are left: counted from where training
    # goes on, still 6 epochs (from current_epoch and global_step alone: 5, a switch at epoch 4)
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(cb: LowRankFactorization, save: bool) -> pl.Trainer:
        saves = [
            ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1),
            ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=11),
        ]  # fmt: skip
        return pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=None, max_steps=41, callbacks=[cb, *(saves if save else [])],
            logger=False, enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False,
            deterministic=True,
        )  # fmt: skip

    full = _callback()
    trainer(full, save=True).fit(RestlessNet())
    resumed = _callback()
    trainer(resumed, save=False).fit(RestlessNet(), ckpt_path=str(tmp_path / ckpt))
    assert _milestones(full) == _milestones(resumed) == [5]
    assert _watch(resumed)[-1]["epoch"] == 4 and _watch(resumed)[-1]["latest_switch_epoch"] == 5
