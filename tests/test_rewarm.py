"""The learning-rate re-warm after a swap (issue 21, item 3; issue 29, item 5): the rate an optimizer
step uses ramps from 1/n to 1 of the scheduled one over that optimizer's next n steps after a
milestone, never above it; user code inside the step (training_step, backward hooks, clipping),
schedulers and checkpoints never see a scaled rate; a run resumed mid-ramp, or the same callback's
next fit on the same model, finishes the same ramp; bad settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from factorize_plugin import LowRankFactorization
from factorize_plugin.engine import rewarm as rewarm_module
from factorize_plugin.engine.rewarm import LRRewarm
from factorize_plugin.surgery import settings
from factorize_plugin.surgery.swap.optim import unwrap_optimizer
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


class AdagradNet(TinyNet):
    def configure_optimizers(self):
        return torch.optim.Adagrad(self.parameters(), lr=1e-2)  # a state the swap cannot carry ("sum")


def _run(schedule, epochs=3, ckpt_dir=None, ckpt_path=None, model=None, **kw):
    probe = LRProbe()
    cb = LowRankFactorization(schedule, **{**TINY, **kw})
    model = model or TinyNet(optimizer="sgd", scheduler="step")  # StepLR: multiplicative, it would compound a leak
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
    _, cb, _ = _run({1: 0.5}, epochs=2, model=AdagradNet())  # (a state the swap does not carry)
    assert cb.history[-1]["rewarm_steps"] == STEPS_PER_EPOCH // 4
    probe, cb, _ = _run({0: 0.5}, epochs=1, model=AdagradNet())
    assert cb.history[-1]["rewarm_steps"] == 0  # no optimizer step yet: nothing to re-warm from
    assert probe.used == probe.scheduled


def test_a_run_resumed_mid_ramp_finishes_the_same_ramp(tmp_path):
    # a ramp of 12 steps from step 8: the checkpoint at the end of epoch 1 (step 16) is 8 steps into it
    full, _, full_model = _run({1: 0.5}, epochs=3, ckpt_dir=tmp_path, rewarm_steps=12)
    ckpt = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("LowRankFactorization")]
    assert state["rewarm"] == {"total": 12, "done": 8, "counts": [8]}
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
        assert ramp.state_dict() in ({"total": 2, "done": 1, "counts": [1, 1]}, None)
    assert moves == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("bad", [-1, 1.5, "soon", None, True])
def test_rewarm_steps_must_be_auto_or_a_whole_number(bad):
    with pytest.raises(ValueError, match="rewarm_steps"):
        LowRankFactorization({1: 0.5}, rewarm_steps=bad)


# ---------------------------------------------------------------- issue 29, item 5
class RatesProbe(Callback):
    """Per optimizer (by position in ``trainer.optimizers``): each step's rate as scheduled (a step
    pre-hook) and as used (a post-hook), both registered before the re-warm's; and, after every
    batch, how many step hooks each optimizer holds (the probe's own two included; listed after the
    callback, the probe counts after the callback's batch end)."""

    def __init__(self) -> None:
        self.used: dict[int, list[list[float]]] = {}
        self.scheduled: dict[int, list[list[float]]] = {}
        self.hooks: list[list[int]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        for i, optimizer in enumerate(trainer.optimizers):
            opt = unwrap_optimizer(optimizer)
            used, scheduled = self.used.setdefault(i, []), self.scheduled.setdefault(i, [])
            opt.register_step_pre_hook(lambda o, a, k, s=scheduled: s.append([g["lr"] for g in o.param_groups]))
            opt.register_step_post_hook(lambda o, a, k, u=used: u.append([g["lr"] for g in o.param_groups]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opts = [unwrap_optimizer(o) for o in trainer.optimizers]
        self.hooks.append([len(o._optimizer_step_pre_hooks) + len(o._optimizer_step_post_hooks) for o in opts])

    def factors(self, i: int) -> list[float]:
        """The used / scheduled rate of optimizer ``i``'s first group, step by step."""
        return [u[0] / s[0] for u, s in zip(self.used[i], self.scheduled[i])]


class TwoOptimizers(TinyNet):
    """Manual optimization with two SGDs (features, classifier); the features' is stepped twice per batch."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd", scheduler=None)
        self.automatic_optimization = False

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.features.parameters(), lr=0.1),
            torch.optim.SGD(self.classifier.parameters(), lr=0.1),
        ]

    def training_step(self, batch, batch_idx):
        x, y = batch
        features, head = self.optimizers()
        for opt in (features, features, head):
            loss = F.cross_entropy(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()


def test_each_optimizer_is_capped_at_the_scheduled_rate_and_released_when_its_own_ramp_ends():
    probe = RatesProbe()
    cb = LowRankFactorization({1: 0.5}, **{**TINY, "rewarm_steps": 4})
    resume_trainer([cb, probe], 2).fit(TwoOptimizers())
    assert cb.history[-1]["rewarm_steps"] == 4  # layers were swapped
    ramp = [0.25, 0.5, 0.75, 1.0]
    features, head = probe.factors(0), probe.factors(1)
    assert features == pytest.approx([1.0] * 16 + ramp + [1.0] * 12)  # 2 steps a batch: 4 steps = 2 batches
    assert head == pytest.approx([1.0] * 8 + ramp + [1.0] * 4)
    after = probe.hooks[STEPS_PER_EPOCH:]  # epoch 1's batches: (features' hooks, head's hooks)
    assert after[0] == [4, 4] and after[1] == [2, 4] and after[3] == [2, 2]


class RateWitness(TinyNet):
    """Records the first optimizer's rates wherever user code runs during a training step: in
    ``training_step``, in a backward hook on the logits, in ``on_after_backward`` and in
    ``configure_gradient_clipping`` (all inside the optimizer closure under automatic optimization)."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(optimizer=optimizer, scheduler="step")
        self.seen: dict[str, list[list[float]]] = {
            "training_step": [],
            "backward": [],
            "after_backward": [],
            "clip": [],
        }

    def _rates(self) -> list[float]:
        return [g["lr"] for g in unwrap_optimizer(self.trainer.optimizers[0]).param_groups]

    def training_step(self, batch, batch_idx):
        self.seen["training_step"].append(self._rates())
        x, y = batch
        logits = self(x)
        logits.register_hook(lambda grad: self.seen["backward"].append(self._rates()))
        return F.cross_entropy(logits, y)

    def on_after_backward(self) -> None:
        self.seen["after_backward"].append(self._rates())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        self.seen["clip"].append(self._rates())


def test_user_code_inside_the_step_sees_the_scheduled_rate():
    probe = LRProbe()
    cb = LowRankFactorization({1: 0.5}, **{**TINY, "rewarm_steps": 4})
    model = RateWitness()
    resume_trainer([probe, cb], 2).fit(model)
    start = STEPS_PER_EPOCH
    assert probe.used[start] != probe.scheduled[start]  # the update itself is ramped
    for where, rates in model.seen.items():
        assert rates == probe.scheduled, where


def test_a_closure_runs_at_the_scheduled_rate_and_the_update_at_the_ramped_one():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    ramp = LRRewarm()
    ramp.start([opt], 4)
    seen = []

    def closure():
        seen.append(opt.param_groups[0]["lr"])
        w.grad = torch.ones(1)
        return 0.0

    opt.step(closure)
    assert seen == [1.0] and w.item() == -0.25 and opt.param_groups[0]["lr"] == 1.0


def test_lbfgs_reads_its_rate_before_the_closure_so_its_step_is_scaled_before():
    def run(lr: float, ramp_steps: int) -> float:
        w = torch.nn.Parameter(torch.ones(1))
        opt = torch.optim.LBFGS([w], lr=lr, max_iter=1)
        LRRewarm().start([opt], ramp_steps)

        def closure():
            opt.zero_grad()
            loss = (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.item()

    assert run(1.0, 4) == run(0.25, 0) != run(1.0, 0)


def test_a_ramp_cut_off_by_the_end_of_fit_goes_on_in_the_next_fit():
    # a ramp of 12 steps from step 8: 8 taken when the first fit ends after 2 epochs
    cb = LowRankFactorization({1: 0.5}, **{**TINY, "rewarm_steps": 12})
    model = TinyNet(optimizer="sgd", scheduler="step")
    first = RatesProbe()
    resume_trainer([first, cb], 2).fit(model)
    assert first.factors(0)[STEPS_PER_EPOCH:] == pytest.approx([(k + 1) / 12 for k in range(8)])
    assert cb.state_dict()["rewarm"]["done"] == 8  # a checkpoint saved between the fits holds it too
    second = RatesProbe()
    resume_trainer([second, cb], 1).fit(model)  # the probe hooks in first
    assert second.factors(0) == pytest.approx([9 / 12, 10 / 12, 11 / 12, 1.0] + [1.0] * 4)
    assert cb.state_dict()["rewarm"] is None and second.hooks[-1] == [2]


def test_a_new_model_drops_the_cut_off_ramp():
    cb = LowRankFactorization({1: 0.5}, **{**TINY, "rewarm_steps": 12})
    resume_trainer([cb], 2).fit(TinyNet(optimizer="sgd", scheduler="step"))
    probe = RatesProbe()
    resume_trainer([probe, cb], 1).fit(TinyNet(optimizer="sgd", scheduler="step"))
    assert probe.factors(0) == pytest.approx([1.0] * STEPS_PER_EPOCH) and cb.history == []


@pytest.mark.parametrize("bad", [10**12, 10**6 + 1, 1e12])
def test_rewarm_steps_has_a_sane_upper_bound(bad):
    assert settings.MAX_REWARM_STEPS == 10**6
    with pytest.raises(ValueError, match=r"rewarm_steps must be .*<= 1000000"):
        LowRankFactorization({1: 0.5}, rewarm_steps=bad)
    assert LowRankFactorization({1: 0.5}, rewarm_steps=10**6).rewarm_steps == 10**6


def test_the_docstrings_quote_the_benchmark_as_recorded():
    results = json.loads((Path(__file__).parents[1] / "benchmarks/results/lm_tradeoff.json").read_text())
    methods = results["summary"]["methods"]
    quoted = [f"{methods[m]['mean_final_val_loss']:.4f}" for m in ("callback_early_1:0.25", "exp_early_no_rewarm")]
    assert quoted == ["2.3903", "2.3910"]
    callback_reference = (Path(__file__).parents[1] / "docs" / "callback.md").read_text()  # (the argument reference)
    for doc in (rewarm_module.__doc__, callback_reference):
        assert all(q in doc for q in quoted) and "1.1 %" not in doc and "5 seeds" not in doc


def test_a_step_hook_registered_after_the_ramps_survives_its_end():
    # the ramp's own post-hook cannot leave torch's hook dict while torch iterates it: it goes at release()
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    ramp = LRRewarm()
    ramp.start([opt], 1)
    seen = []
    opt.register_step_post_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    for _ in range(2):
        w.grad = torch.ones(1)
        opt.step()
    assert seen == [1.0, 1.0] and w.item() == -2.0 and ramp.state_dict() is None
    assert len(opt._optimizer_step_pre_hooks) == 0 and len(opt._optimizer_step_post_hooks) == 2
    ramp.release()
    assert len(opt._optimizer_step_post_hooks) == 1


@pytest.mark.parametrize("net, ramps", [(lambda: TinyNet(optimizer="adam"), False), (lambda: TinyNet(optimizer="sgd"), False),
                                        (AdagradNet, True)], ids=["adam", "sgd", "adagrad"])  # fmt: skip
def test_auto_ramps_only_after_a_swap_that_left_moments_empty(net, ramps):
    """Adam's and SGD's state is carried onto the new factors, from a dense layer and from a
    refactorized pair (``surgery/swap/carry.py``), so ``"auto"`` has no ramp after those swaps;
    an optimizer whose state is not carried (Adagrad) gets one after each. A set length ramps
    after every swap, carried or not."""
    cb = LowRankFactorization({1: 0.5, 2: 0.25}, **TINY)
    resume_trainer([cb], 3).fit(net())
    assert all(r is not None for r in cb.history[0]["ranks"].values())  # a real swap at each milestone
    assert [h["rewarm_steps"] for h in cb.history] == [STEPS_PER_EPOCH // 4 if ramps else 0] * 2
    _, cb, _ = _run({1: 0.5, 2: 0.25}, rewarm_steps=3, model=net())
    assert [h["rewarm_steps"] for h in cb.history] == [3, 3]
