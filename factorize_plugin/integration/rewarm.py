"""The learning-rate re-warm after a milestone: the swapped-in factors start with empty optimizer
moments (Adam's first steps with fresh moments move a parameter by about the learning rate, whatever
its gradient's size) while the rest of the model is mid-training, so for a few steps after a swap the
learning rate ramps back up: step k of n runs at (k / n) times the scheduled rate.

The scaling lives only inside ``optimizer.step()`` (a step pre-hook scales every param group's
``lr``, a post-hook puts the scheduled value back), so LR schedulers, checkpoints and loggers never
see a scaled rate and a multiplicative scheduler cannot compound it. Every DDP rank steps the same
optimizer the same number of times, so every rank scales alike. ``steps_left`` is checkpointed: a
run resumed mid-way finishes the same ramp.

``rewarm_steps="auto"`` picks a quarter of an epoch's optimizer steps, at most 1000 (Adam's
second moment forgets with time constant 1 / (1 - beta2) = 1000 steps at its default): on the LM
trade-off benchmark a quarter epoch (10 steps) lowered the early schedule's mean final validation
loss by 1.1 % over 5 seeds (-3.6 % and -3.0 % on two; +0.6, +0.4 and +0.0 % on the others;
``benchmarks/results/lm_tradeoff.json``), and the Fashion-MNIST schedules kept their accuracy.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from ..surgery.optim import unwrap_optimizer

AUTO_SHARE, AUTO_CAP = 0.25, 1000


def rewarm_length(setting: Union[int, str], trainer: Any) -> int:
    """The ramp's length in optimizer steps for this run (``setting`` "auto": a quarter of an epoch's
    optimizer steps, at least 1, at most 1000; 0 where an epoch's length is unknown)."""
    if setting != "auto":
        return int(setting)
    batches = trainer.num_training_batches
    if not isinstance(batches, int) or batches <= 0:  # inf: an iterable without a length
        return 0
    per_epoch = max(1, batches // max(1, trainer.accumulate_grad_batches))
    return max(1, min(AUTO_CAP, round(AUTO_SHARE * per_epoch)))


class LRRewarm:
    """Scales the learning rate of ``optimizers`` for their next ``steps`` optimizer steps.

    ``setting``: the callback's ``rewarm_steps`` (``"auto"`` or a whole number, 0: never)."""

    def __init__(self, setting: Union[int, str] = "auto") -> None:
        self.setting = setting
        self.total = 0
        self._counts: dict[int, int] = {}  # id(optimizer) -> ramp steps it has taken
        self._handles: list[Any] = []
        self._saved: dict[int, list[Any]] = {}
        self._restored: Optional[dict[str, int]] = None

    def after_swap(self, trainer: Any, swapped: bool) -> int:
        """Starts the ramp after a milestone (none if nothing was swapped, or before the first
        optimizer step: no moments to catch up with); returns its length."""
        steps = rewarm_length(self.setting, trainer) if swapped and trainer.global_step > 0 else 0
        self.start(trainer.optimizers, steps)
        return steps

    def load_state_dict(self, state: Optional[dict[str, int]]) -> None:
        """A checkpoint's ramp (None: none running); it resumes at ``resume``."""
        self.stop()
        self._restored = dict(state) if state else None

    def resume(self, optimizers: list[Any]) -> None:
        """At ``on_fit_start`` (the optimizers exist): a ramp checkpointed mid-way goes on."""
        if self._restored:
            self.start(optimizers, self._restored["total"], self._restored["done"])
        self._restored = None

    @property
    def done(self) -> int:
        """Ramp steps taken (by the optimizer that has taken fewest: each counts its own steps)."""
        return min(self._counts.values(), default=self.total)

    def start(self, optimizers: list[Any], total: int, done: int = 0) -> None:
        """Ramps over ``total`` steps of each optimizer, ``done`` of them already taken (a resumed run)."""
        self.stop()
        self.total = total
        if done >= total:
            return
        for optimizer in optimizers:
            opt = unwrap_optimizer(optimizer)
            self._counts[id(opt)] = done
            self._handles.append(opt.register_step_pre_hook(self._scale))
            self._handles.append(opt.register_step_post_hook(self._restore))

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._saved, self._counts = [], {}, {}

    def _scale(self, opt: Any, args: Any, kwargs: Any) -> None:
        factor = (self._counts[id(opt)] + 1) / self.total
        self._saved[id(opt)] = [group["lr"] for group in opt.param_groups]
        for group in opt.param_groups:
            group["lr"] = group["lr"] * factor

    def _restore(self, opt: Any, args: Any, kwargs: Any) -> None:
        for group, lr in zip(opt.param_groups, self._saved.pop(id(opt))):
            group["lr"] = lr
        self._counts[id(opt)] += 1
        if self.done >= self.total:
            self.stop()

    def state_dict(self) -> Optional[dict[str, int]]:
        return {"total": self.total, "done": self.done} if self._counts else None


__all__ = ["LRRewarm", "rewarm_length"]
