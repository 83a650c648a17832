"""``LowRankFactorization(..., interval="step")`` (issue 30, item 1), single process: milestones at
optimizer steps, statistics from a validation run ending at the step or from a calibration pass,
and resume from real checkpoints at an epoch boundary and mid-epoch (a resumable loader: exactly;
a plain one: Lightning's behaviour), with no milestone repeated or skipped."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import factorize_plugin.engine.engine as engine_module
from factorize_plugin import LowRankFactorization, ParamBudget, SpeedGuard
from lightning_helpers import TARGETS, TINY, TinyNet, max_abs_diff, state_dict_cpu, structure

SCHEDULE = {3: 0.5, 10: 0.25}
MAX_EPOCHS, STEPS_PER_EPOCH = 2, 8  # 256 training digits in batches of 32
R1 = {"features.2": 4, "classifier.0": 16, "classifier.2": 5}
R2 = {"features.2": 2, "classifier.0": 8, "classifier.2": 2}
DENSE = dict.fromkeys(TARGETS)
WANT = {s: DENSE if s < 3 else R1 if s < 10 else R2 for s in range(MAX_EPOCHS * STEPS_PER_EPOCH)}


class ResumableLoader(DataLoader):
    """A DataLoader Lightning resumes mid-epoch (it has ``state_dict`` / ``load_state_dict``): it
    counts the batches yielded in the current pass; after ``load_state_dict`` the next pass skips
    that many (the sampler's permutation is the epoch's own, so the rest of the epoch follows)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._yielded, self._skip = 0, 0

    def __iter__(self):
        skip, self._skip, self._yielded = self._skip, 0, 0
        for i, batch in enumerate(super().__iter__()):
            self._yielded = i + 1
            if i >= skip:
                yield batch

    def state_dict(self) -> dict:
        return {"yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self._skip = int(state["yielded"])


class StepNet(TinyNet):
    """TinyNet shuffled with a per-epoch seed; ``resumable``: its training loader resumes mid-epoch."""

    def __init__(self, resumable: bool = False) -> None:
        super().__init__(shuffle="epoch_seeded")
        self.resumable = resumable

    def train_dataloader(self):
        loader = super().train_dataloader()
        if not self.resumable:
            return loader
        return ResumableLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler)


class StepProbe(pl.Callback):
    """The targets' structure at every training batch's start (after the callback's swap), by step."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at[trainer.global_step] = structure(pl_module)


def fit(
    schedule=SCHEDULE, ckpt_dir=None, ckpt_path=None, resumable=False, callback_kw=None, extra=(), **trainer_kw
) -> SimpleNamespace:
    pl.seed_everything(0)
    model = StepNet(resumable)
    cb = LowRankFactorization(schedule, interval="step", **{**TINY, **(callback_kw or {})})
    probe = StepProbe()
    callbacks = [cb, probe, *extra]
    if ckpt_dir is not None:
        callbacks += [
            ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1),
            ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", save_top_k=-1, every_n_train_steps=1),
        ]
    trainer_kw.setdefault("max_epochs", MAX_EPOCHS)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, **trainer_kw,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, ckpt_path=ckpt_path)
    return SimpleNamespace(
        model=model, cb=cb, probe=probe, final=state_dict_cpu(model), warnings=[str(w.message) for w in caught]
    )


def milestones(cb) -> list[tuple]:
    return [(h["milestone"], h["global_step"], h["epoch"], h["ranks"], h["statistics"]) for h in cb.history]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs with a plain and a resumable training loader, a checkpoint after every
    epoch (``epoch=E.ckpt``, after its validation run) and after every optimizer step (``step=S.ckpt``,
    in ``on_train_batch_end``)."""
    out = {}
    for kind in ("plain", "resumable"):
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = fit(ckpt_dir=folder, resumable=kind == "resumable")
        out[kind].folder = folder
    return out


def test_milestones_fall_on_optimizer_steps(references):
    ref = references["plain"]
    assert ref.probe.at == WANT  # in force from the batch after the milestone's step, never earlier
    assert ref.cb.done == [3, 10]
    assert milestones(ref.cb) == [(3, 3, 0, R1, "calibration"), (10, 10, 1, R2, "calibration")]
    assert [h["rewarm_steps"] for h in ref.cb.history] == [0, 0]  # "auto": the optimizer state is carried, no ramp
    # the resumable loader yields the same batches: the two references are the same run
    assert max_abs_diff(references["resumable"].final, ref.final) == 0.0


def test_statistics_from_a_validation_run_at_the_step_or_a_calibration_pass():
    """val_check_interval=4: validation runs end at steps 4, 8, 12, 16. Key 0 calibrates before the
    first batch, key 4 reuses the run that just ended at step 4, key 10 (no run there) calibrates.
    No re-warm at all: key 0 comes before any optimizer step, and the later swaps carry the
    optimizer state onto the new factors."""
    run = fit({0: 0.5, 4: 0.25, 10: 0.125}, val_check_interval=4)
    assert [(m, s, src) for m, s, _, _, src in milestones(run.cb)] == [
        (0, 0, "calibration"), (4, 4, "validation"), (10, 10, "calibration"),
    ]  # fmt: skip
    assert [h["rewarm_steps"] for h in run.cb.history] == [0, 0, 0]  # the state carried at each swap
    assert run.probe.at[0] == R1 and run.probe.at[3] == R1 and run.probe.at[4] == R2
    assert run.probe.at[9] == R2 and run.probe.at[10] == {"features.2": 1, "classifier.0": 4, "classifier.2": 1}


# Resume points (schedule {3: 0.5, 10: 0.25}, 8 steps per epoch, re-warm of 2 steps):
#   epoch=0: an epoch boundary (step 8: the first milestone done, the second pending);
#   step=3: mid-epoch, the first milestone due at the next batch; step=4: mid-epoch, mid-ramp.
@pytest.mark.parametrize(
    "kind, ckpt, start",
    [("plain", "epoch=0", 8), ("resumable", "step=3", 3), ("resumable", "step=4", 4)],
    ids=["epoch-boundary", "mid-epoch-at-milestone", "mid-epoch-mid-ramp"],
)
def test_resume_continues_exactly(references, kind, ckpt, start):
    ref = references[kind]
    res = fit(ckpt_path=ref.folder / f"{ckpt}.ckpt", resumable=kind == "resumable")
    assert max_abs_diff(res.final, ref.final) <= 1e-6  # the uninterrupted run's weights
    assert res.probe.at == {s: WANT[s] for s in range(start, MAX_EPOCHS * STEPS_PER_EPOCH)}
    assert res.cb.done == [3, 10] and milestones(res.cb) == milestones(ref.cb)  # none repeated or skipped
    assert not [w for w in res.warnings if "not applied when due" in w or "not resumable" in w]


def test_mid_epoch_resume_with_a_plain_loader_follows_lightning(references):
    """Lightning's documented behaviour without a resumable loader: it warns, and the loader starts
    its epoch over while the batch count and global_step go on. The data differ from the
    uninterrupted run's, but each milestone still applies once, at its step."""
    ref = references["plain"]
    res = fit(ckpt_path=ref.folder / "step=5.ckpt")
    assert any("not resumable" in w for w in res.warnings)
    assert res.probe.at == {s: WANT[s] for s in range(5, MAX_EPOCHS * STEPS_PER_EPOCH)}
    assert res.cb.done == [3, 10]
    assert [(m, s, e) for m, s, e, _, _ in milestones(res.cb)] == [(3, 3, 0), (10, 10, 1)]
    assert max_abs_diff(res.final, ref.final) > 0  # (the batches were not the same)


BASE = {"features.2": 8, "classifier.0": 32, "classifier.2": 10}  # each target's min(in, out)


def faster_when_smaller(step, model) -> float:
    """An injected whole-model clock (no timing): one real training step, then 0.1 + each target's
    rank fraction (1 when dense) seconds, so every milestone here is clearly faster."""
    step()
    return 0.1 + sum(1.0 if r is None else r / BASE[n] for n, r in structure(model).items())


def test_the_speed_decision_times_the_batch_the_milestone_precedes(monkeypatch):
    kept, sums = [], {}
    real = engine_module.speed_check

    def spy(trainer, pl_module, guard, watch, *args):
        kept.append((trainer.global_step, [float(b[0].sum()) for b in watch.batch or []]))
        return real(trainer, pl_module, guard, watch, *args)

    class BatchSums(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sums[trainer.global_step] = float(batch[0].sum())

    monkeypatch.setattr(engine_module, "speed_check", spy)
    run = fit(callback_kw={"speed_guard": SpeedGuard(clock=faster_when_smaller)}, extra=[BatchSums()])
    assert kept == [(3, [sums[3]]), (10, [sums[10]])]  # the training batch about to train, mid-epoch
    assert run.probe.at == WANT
    assert [h["speedup_model"] for h in run.cb.history] == pytest.approx([3.1 / 1.6, 1.6 / 0.8])


def test_a_milestone_past_the_last_step_warns_before_training():
    run = fit({3: 0.5, 4: 0.25}, max_steps=4)
    assert any("milestone(s) [4] are at or after the run's last optimizer step (4" in w for w in run.warnings)
    assert run.cb.done == [3]


def test_refusals():
    with pytest.raises(ValueError, match="epochs only"):
        LowRankFactorization("auto", interval="step")
    with pytest.raises(ValueError, match="interval must be one of"):
        LowRankFactorization({1: 0.5}, interval="steps")
    with pytest.raises(ValueError, match="goes back up at step 20"):
        LowRankFactorization({10: ParamBudget(0.3), 20: ParamBudget(0.5)}, interval="step")
    with pytest.raises(ValueError, match="not a whole step"):
        LowRankFactorization({1.5: 0.5}, interval="step")
    # a checkpoint's milestones counted in the other unit: refused (they would be skipped or repeated)
    state = LowRankFactorization({3: 0.5}, interval="step").state_dict()
    assert state["interval"] == "step"
    with pytest.raises(ValueError, match="count steps"):
        LowRankFactorization({3: 0.5}).load_state_dict({**state, "done": [3]})
    LowRankFactorization({3: 0.5}).load_state_dict(state)  # nothing done yet: nothing to misread
