"""The learning-rate re-warm after a milestone: swapped-in factors that start with empty optimizer
moments (Adam's first steps with fresh moments move a parameter by about the learning rate,
whatever its gradient's size) while the rest of the model is mid-training need a few steps after
such a swap with the learning rate ramping back up: an optimizer's step k of n runs at (k / n) times
the scheduled rate. Adam's and SGD's state is carried onto the new factors
(``surgery/swap/carry.py``), so with ``"auto"`` a milestone whose swap left every parameter with
state has no ramp (a set length ramps after every swap that changed a layer).

Where the ramped rate exists: only around the parameter update. A step pre-hook wraps the step's
closure (Lightning's automatic optimization passes ``training_step``, ``backward``, gradient
clipping and ``on_before_optimizer_step`` as one) so that every param group's ``lr`` is scaled
after the closure has returned, and a step post-hook puts the scheduled value back; a step without
a closure is scaled in the pre-hook. So ``training_step``, backward hooks, gradient clipping, LR
schedulers, loggers and checkpoints only ever see the scheduled rate, and a multiplicative scheduler
cannot compound the ramp. The one exception is an optimizer that reads its rate before it evaluates
the closure (``READS_RATE_FIRST``: torch's ``LBFGS``): it is scaled before the closure runs, so
code inside that closure sees the ramped rate. Step hooks registered before the re-warm's (at
``on_fit_start``, say) see the ramped rate in their post-hook.

Each optimizer counts its own steps (manual optimization may step one optimizer more often than
another): its scale is capped at 1 and its hooks are removed after its own n-th step (the post-hook
at the end of that training batch: it cannot leave while torch iterates it). Every DDP rank
steps the same optimizer the same number of times, so every rank scales alike. The ramp's progress
is checkpointed (a run resumed mid-way finishes the same ramp) and kept when ``fit`` ends, so the
same engine's (callback's) next run on the same model goes on where it stopped (a fit on another
model starts over, and drops it with the rest of the state).

``rewarm_steps="auto"`` picks a quarter of an epoch's optimizer steps, at most 1000 (Adam's
second moment forgets with time constant 1 / (1 - beta2) = 1000 steps at its default). On the LM
trade-off benchmark at its tuned learning rate (1e-3, 3 seeds; ``benchmarks/results/lm_tradeoff.json``)
the early schedule's mean final validation loss is 2.3903 with the re-warm (a quarter epoch, 10
steps) and 2.3910 without (2.377 / 2.380, 2.410 / 2.402, 2.383 / 2.391 by seed): no measurable
difference. It is kept on as a guard against the fresh moments' first steps that costs nothing
(an earlier gain, measured at a learning rate too high for that model, 3e-3, is withdrawn).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from ..surgery.swap.optim import unwrap_optimizer

AUTO_SHARE, AUTO_CAP = 0.25, 1000
# optimizers whose step reads the rate before it evaluates the closure: scaled before the closure
READS_RATE_FIRST: tuple[type, ...] = (torch.optim.LBFGS,)


def rewarm_length(setting: Union[int, str], steps_per_epoch: Optional[int]) -> int:
    """The ramp's length in optimizer steps for this run (``setting`` "auto": a quarter of an epoch's
    optimizer steps, at least 1, at most 1000; 0 where an epoch's length is unknown)."""
    if setting != "auto":
        return int(setting)
    if not steps_per_epoch or steps_per_epoch <= 0:
        return 0
    return max(1, min(AUTO_CAP, round(AUTO_SHARE * steps_per_epoch)))


class LRRewarm:
    """Scales the learning rate of ``optimizers`` for their next ``total`` optimizer steps each.

    ``setting``: the engine's (and the callback's) ``rewarm_steps`` (``"auto"`` or a whole number, 0: never)."""

    def __init__(self, setting: Union[int, str] = "auto") -> None:
        self.setting = setting
        self.total = 0
        self._order: list[int] = []  # id() of each ramped optimizer, in the loop's order
        self._counts: dict[int, int] = {}  # id(optimizer) -> ramp steps it has taken
        self._handles: dict[int, list[Any]] = {}  # the hooks of the optimizers still ramping
        self._spent: list[Any] = []  # post-hooks of ramps that ended, removed by release()
        self._saved: dict[int, tuple[Any, list[Any]]] = {}  # id(optimizer) -> it, its scheduled rates while scaled
        self._pending: Optional[dict[str, Any]] = None  # a ramp waiting for its optimizers

    def after_swap(self, host: Any, swapped: bool, fresh: bool) -> int:
        """Starts the ramp after a milestone that ``swapped`` layers (none before the first optimizer
        step: no moments to catch up with); with ``"auto"`` only where the swap left some parameter
        without optimizer state (``fresh``). Returns its length."""
        due = swapped and host.global_step > 0 and (fresh or self.setting != "auto")
        steps = rewarm_length(self.setting, host.steps_per_epoch()) if due else 0
        self.start(host.optimizers, steps)
        return steps

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """A checkpoint's ramp (None: none running); it goes on at ``resume``."""
        self.stop()
        self._pending = dict(state) if state else None

    def resume(self, optimizers: list[Any]) -> None:
        """At ``on_fit_start`` (the optimizers exist): a ramp checkpointed, or cut off by the end of
        the previous ``fit``, goes on."""
        state, self._pending = self._pending, None
        if state:
            counts = state.get("counts")
            if not isinstance(counts, list) or len(counts) != len(optimizers):
                counts = [state["done"]] * len(optimizers)  # an older checkpoint: the slowest one's count
            self.start(optimizers, state["total"], counts)

    def pause(self) -> None:
        """At the end of ``fit``: the hooks go, the progress stays (the next ``fit`` resumes it)."""
        state = self.state_dict()
        self.stop()
        self._pending = state

    @property
    def done(self) -> int:
        """Ramp steps taken (by the optimizer that has taken fewest: each counts its own steps)."""
        return min(self._counts.values(), default=self.total)

    def start(self, optimizers: list[Any], total: int, done: Union[int, list[int]] = 0) -> None:
        """Ramps over ``total`` steps of each optimizer, ``done`` of them already taken (a resumed
        run: one count for all, or one per optimizer)."""
        self.stop()
        self.total = total
        counts = done if isinstance(done, list) else [done] * len(optimizers)
        if min(counts, default=total) >= total:
            return
        for optimizer, count in zip(optimizers, counts, strict=True):
            opt = unwrap_optimizer(optimizer)
            key = id(opt)
            self._order.append(key)
            self._counts[key] = min(count, total)
            if count < total:
                self._handles[key] = [
                    opt.register_step_pre_hook(self._before_step),
                    opt.register_step_post_hook(self._after_step),
                ]

    def stop(self) -> None:
        """Removes every hook (a rate scaled by a step that raised is put back); forgets the ramp."""
        for handles in self._handles.values():
            for handle in handles:
                handle.remove()
        self.release()
        for opt, _ in list(self._saved.values()):
            self._unscale(opt)
        self._order, self._counts, self._handles = [], {}, {}

    def release(self) -> None:
        """Removes the post-hooks of the optimizers whose ramp has ended. An optimizer's post-hook
        cannot remove itself (torch is iterating that dict), so it stays, doing nothing, until this
        runs: after every training batch (``FactorizationEngine.end_batch``) and at ``start`` / ``stop`` / ``pause``."""
        for handle in self._spent:
            handle.remove()
        self._spent = []

    def state_dict(self) -> Optional[dict[str, Any]]:
        """``total``, ``done`` (the slowest optimizer's count) and ``counts`` (one per optimizer, in
        the loop's order); None when no ramp is running or waiting."""
        if self._handles:
            return {"total": self.total, "done": self.done, "counts": [self._counts[k] for k in self._order]}
        return dict(self._pending) if self._pending else None

    # ------------------------------------------------------------------ hooks
    def _before_step(self, opt: Any, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        at = 1 if args and args[0] is opt else 0  # torch passes the step's own arguments, self first
        closure: Optional[Callable[[], Any]] = kwargs.get("closure", args[at] if len(args) > at else None)
        if closure is None or not callable(closure) or isinstance(opt, READS_RATE_FIRST):
            self._scale(opt)
            return None

        def closure_then_scale() -> Any:
            self._unscale(opt)  # a closure evaluated again (a line search) runs at the scheduled rate too
            loss = closure()
            self._scale(opt)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_scale}
        return (*args[:at], closure_then_scale, *args[at + 1 :]), kwargs

    def _after_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        key = id(opt)
        if key not in self._handles:  # its ramp has ended: the hook waits for release()
            return
        self._unscale(opt)
        self._counts[key] += 1
        if self._counts[key] >= self.total:  # this optimizer's own ramp is over
            pre, post = self._handles.pop(key)
            pre.remove()  # safe: torch is iterating the post-hooks, not the pre-hooks
            self._spent.append(post)

    def _scale(self, opt: Any) -> None:
        key = id(opt)
        if key in self._saved:
            return
        factor = min(1.0, (self._counts[key] + 1) / self.total)
        self._saved[key] = (opt, [group["lr"] for group in opt.param_groups])
        for group in opt.param_groups:
            group["lr"] = group["lr"] * factor

    def _unscale(self, opt: Any) -> None:
        key = id(opt)
        if key not in self._saved:
            return
        # strict=False: a param group added after the swap has no saved rate and keeps its own
        for group, lr in zip(opt.param_groups, self._saved.pop(key)[1], strict=False):
            group["lr"] = lr


__all__ = ["LRRewarm", "READS_RATE_FIRST", "rewarm_length"]
