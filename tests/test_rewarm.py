"""The learning-rate re-warm after a swap (issue 21, item 3): the rate an optimizer step uses ramps
from 1/n to 1 of the scheduled one over n steps after a milestone; schedulers and checkpoints never
see a scaled rate; a run resumed mid-ramp finishes the same ramp; bad settings are refused."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from factorize_plugin import LowRankFactorization
from factorize_plugin.integration.rewarm import LRRewarm
from factorize_plugin.surgery.optim import unwrap_optimizer
from lightning_helpers import TINY, TinyNet, resume_trainer

STEPS_PER_EPOCH = 8  # TinyNet: 256 training samples in batches of 32


class LRProbe(Callback):
    """Per optimizer step, each group's rate as the scheduler set it (``scheduled``: a step pre-hook)
    and as the step used it (``used``: a post-hook); both registered before the re-warm's hooks, so
    the pre-hook runs before the scaling and the post-hook before the restore."""

    def __init__(self) -> None:
        self.used: list[list[float]] = []
        self.scheduled: list[list[float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        opt = unwrap_optimizer(trainer.optimizers[0])
        opt.register_step_pre_hook(lambda o, args, kwargs: self.scheduled.append([g["lr"] for g in o.param_groups]))
        opt.register_step_post_hook(lambda o, args, kwargs: self.used.append([g["lr"] for g in o.param_groups]))


def _run(schedule, epochs=3, ckpt_dir=None, ckpt_path=None, **kw):
    probe = LRProbe()
    cb = LowRankFactorization(schedule, **{**TINY, **kw})
    model = TinyNet(optimizer="sgd", scheduler="step")  # StepLR: multiplicative, it would compound a leak
    resume_trainer([probe, cb], epochs, ckpt_dir=ckpt_dir).fit(model, ckpt_path=ckpt_path)
    return probe, cb, model


def test_the_rate_ramps_after_a_swap_and_the_scheduler_never_sees_it():
    probe, cb, _ = _run({1: 0.5}, rewarm_steps=4)
    plain, plain_cb, _ = _run({1: 0.5}, rewarm_steps=0)
    assert cb.history[-1]["rewarm_steps"] == 4 and plain_cb.history[-1]["rewarm_steps"] == 0
    assert probe.scheduled == plain.scheduled  # the scheduler's values are untouched
    assert plain.used == plain.scheduled
    start = STEPS_PER_EPOCH  # the milestone at epoch 1
    for step, (used, scheduled) in enumerate(zip(probe.used, probe.scheduled)):
        factor = (step - start + 1) / 4 if start <= step < start + 4 else 1.0
        assert used == pytest.approx([lr * factor for lr in scheduled], rel=1e-12), step
    assert probe.used[start] != probe.scheduled[start]  # the first step after the swap: 1/4 of the rate


def test_auto_is_a_quarter_epoch_and_a_milestone_before_training_has_none():
    _, cb, _ = _run({1: 0.5}, epochs=2)
    assert cb.history[-1]["rewarm_steps"] == STEPS_PER_EPOCH // 4
    probe, cb, _ = _run({0: 0.5}, epochs=1)
    assert cb.history[-1]["rewarm_steps"] == 0  # no optimizer step yet: nothing to re-warm from
    assert probe.used == probe.scheduled


def test_a_run_resumed_mid_ramp_finishes_the_same_ramp(tmp_path):
    # a ramp of 12 steps from step 8: the checkpoint at the end of epoch 1 (step 16) is 8 steps into it
    full, _, full_model = _run({1: 0.5}, epochs=3, ckpt_dir=tmp_path, rewarm_steps=12)
    ckpt = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("LowRankFactorization")]
    assert state["rewarm"] == {"total": 12, "done": 8}
    resumed, _, model = _run({1: 0.5}, epochs=3, ckpt_path=str(tmp_path / "epoch=1.ckpt"), rewarm_steps=12)
    assert resumed.used == full.used[2 * STEPS_PER_EPOCH :]
    assert resumed.used[:4] != resumed.scheduled[:4]  # still ramping after the resume
    for a, b in zip(model.state_dict().values(), full_model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_the_ramp_scales_inside_the_step_only():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    ramp = LRRewarm()
    ramp.start([opt], 2)
    moves = []
    for _ in range(3):
        before = w.item()
        w.grad = torch.ones(1)
        opt.step()
        sched.step()
        moves.append(before - w.item())
    assert moves == [0.5, 0.5, 0.25]  # 1/2 of 1.0, 2/2 of 0.5, then the schedule's 0.25
    assert opt.param_groups[0]["lr"] == 0.125 and ramp.state_dict() is None and not ramp._handles


def test_two_optimizers_each_take_their_own_ramp():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opts = [torch.optim.SGD([a], lr=1.0), torch.optim.SGD([b], lr=1.0)]
    ramp = LRRewarm()
    ramp.start(opts, 2)
    moves = []
    for _ in range(3):  # one training step = one step of each optimizer (a GAN's two)
        for p, opt in zip((a, b), opts):
            before = p.item()
            p.grad = torch.ones(1)
            opt.step()
            moves.append(before - p.item())
        assert ramp.state_dict() in ({"total": 2, "done": 1}, None)
    assert moves == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("bad", [-1, 1.5, "soon", None, True])
def test_rewarm_steps_must_be_auto_or_a_whole_number(bad):
    with pytest.raises(ValueError, match="rewarm_steps"):
        LowRankFactorization({1: 0.5}, rewarm_steps=bad)
