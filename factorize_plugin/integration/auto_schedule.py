"""``schedule="auto"``: when to switch, decided at each validation run from the readiness signal.

The callback asks ``AutoSchedule`` at the start of every validation run of ``fit`` (never the
sanity check): the layers' stable ranks are measured (``surgery/ranks/readiness.py``, weights only),
averaged over the DDP ranks, and compared with the previous run's and with the rank the target
plans for each layer (a layer is settled when it moved by at most ``tolerance``, or when its stable
rank is within ``room`` of the rank it will keep). When the model is ready (or the
``latest`` epoch has come) the target becomes a milestone at the next epoch start, added to the
callback's schedule before its own hook decides to collect statistics in this same validation
run; the switch then goes through the ordinary milestone path. At the end of the run the decision
goes into ``history`` (``"event": "watch"``) with the signal's cost and is logged.

The latest switch (``Readiness.latest``) is planned at ``on_train_start`` (``switch_plan``), when
the Trainer knows the epoch's length, from the validation runs that will actually happen: the run's
epochs come from ``max_epochs`` and ``max_steps`` (with the epoch's optimizer steps from
``num_training_batches``, itself after ``limit_train_batches``, and ``accumulate_grad_batches``),
whichever ends it first, and a validation run can apply a switch only when the epoch after it still
trains. A switch that ``check_val_every_n_epoch`` would otherwise push past the run's end is
decided at the last validation run that can still apply it: the model never ends dense because of
where the validation runs fall. Where no validation run can apply any switch, or the latest epoch
cannot be known before training (``max_epochs=-1``, ``max_time`` alone, ``max_steps`` under manual
optimization), a warning before training says so and what to change. ``max_time`` is only known as
the run goes: a warning at the first validation run where the time left (at the run's mean epoch
time so far) cannot reach the latest switch; the decision itself never depends on a clock, so the
same run switches at the same epoch on every machine.

DDP: the weights are identical on every rank (DDP all-reduces the gradients), so every rank would
measure the same stable ranks; they are all-reduced anyway (one collective of one float per layer,
in name order) so that a last-bit difference between ranks (a nondeterministic kernel) can never
split the decision: every rank decides from the same numbers, by the same rule.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Optional, Union, cast

import torch
import torch.nn as nn
from lightning.pytorch.callbacks import GradientAccumulationScheduler, Timer
from lightning.pytorch.utilities import rank_zero_warn

from ..engine.schedule import ScheduleValue, read_schedule
from ..surgery.ranks.policies import ParamBudget, RankPolicy
from ..surgery.ranks.policy_spec import policy_spec
from ..surgery.ranks.readiness import (
    Readiness,
    largest_change,
    layer_states,
    planned_ranks,
    readiness_spec,
    stable_ranks,
)
from ..surgery.specs import Auto
from .lightning_internals import training_position


def default_target() -> ParamBudget:
    """``schedule="auto"``'s default target (a fresh one per callback: a ``ParamBudget`` keeps its
    last plan): half the targeted multiply-adds, allocated by the layers' exact NMSE curves, without
    the output probe, which at the switch cost about 2.9x a whole dense run on the LM trade-off
    benchmark (``benchmarks/results/lm_tradeoff_auto_defaults.json``)."""
    return ParamBudget(0.5, metric="macs", sensitivity=False)


class AutoSchedule:
    """The decision state of ``schedule="auto"`` (checkpointed as plain data).

    ``target``: the policy the switch applies; ``readiness``: when (``Readiness``). One switch: the
    watching ends once a switch epoch is decided.
    """

    def __init__(self, target: RankPolicy, readiness: Readiness) -> None:
        self.target, self.readiness = target, readiness
        self.reset()

    def reset(self) -> None:
        self.previous: Optional[dict[str, float]] = None  # stable ranks at the last validation run
        self.calm = 0  # settled validation runs in a row
        self.switch_epoch: Optional[int] = None
        self._pending: Optional[dict[str, Any]] = None  # this validation run's entry, until its end
        self._started = 0.0
        self._plan: Optional[SwitchPlan] = None  # this fit's (on_train_start); not checkpointed
        self._time_warned = False

    def plan(self, trainer: Any) -> "SwitchPlan":
        """At ``on_train_start`` of every ``fit`` (the first moment the Trainer knows the epoch's
        length): plans the latest switch from this run's limits and warns, before any training, where
        the run cannot switch or its latest switch cannot be known. A run that has already decided
        (resumed after the decision) has nothing to warn about."""
        self._plan, self._time_warned = switch_plan(trainer, self.readiness), False
        if self.switch_epoch is None:
            for message in self._plan.warnings:
                rank_zero_warn(f"LowRankFactorization: schedule='auto': {message}")
        return self._plan

    def before_validation(
        self, trainer: Any, layers: Mapping[str, nn.Module], schedule: dict[int, Any], policies: dict[int, Any]
    ) -> None:
        """Measures the signal and decides; a switch is added to ``schedule`` / ``policies``."""
        if self.switch_epoch is not None:
            return
        t0 = time.perf_counter()
        ranks = _agreed(trainer, stable_ranks(layers, self.readiness.iterations))
        change = largest_change(ranks, self.previous)
        states = layer_states(ranks, self.previous, planned_ranks(layers, self.target), self.readiness)
        settled = bool(states) and "moving" not in states.values()
        self.calm = self.calm + 1 if settled else 0
        self.previous = ranks
        epoch = trainer.current_epoch
        plan = self._plan if self._plan is not None else switch_plan(trainer, self.readiness)  # outside fit
        reason = None
        if self.calm >= self.readiness.patience:
            reason = "settled"
        elif plan.decide_at is not None and epoch >= plan.decide_at:
            reason = "latest"
        if reason is not None and plan.trains(epoch + 1):  # never for an epoch that will not run
            self.switch_epoch = epoch + 1
            schedule[self.switch_epoch] = policies[self.switch_epoch] = self.target
        elif reason is None:
            self._warn_out_of_time(trainer, epoch, plan)
        seconds = time.perf_counter() - t0
        self._pending = {
            "event": "watch", "epoch": epoch, "global_step": trainer.global_step, "stable_rank": dict(ranks),
            "stable_rank_change": change, "moving": sorted(n for n, v in states.items() if v == "moving"),
            "within_room": sorted(n for n, v in states.items() if v == "within_room"), "settled_runs": self.calm,
            "ready": reason is not None, "reason": reason, "switch_epoch": self.switch_epoch,
            "latest_switch_epoch": plan.latest_switch_epoch, "signal_seconds": seconds,
        }  # fmt: skip
        self._started = time.perf_counter()

    def _warn_out_of_time(self, trainer: Any, epoch: int, plan: "SwitchPlan") -> None:
        """``max_time`` (a ``Timer`` with a duration): warns once, at the first validation run where
        the time left at the mean epoch time so far will not reach the latest switch. Only a
        warning: a decision moved by a clock would differ from machine to machine (and with the
        load), which is what the readiness signal and the planned latest epoch avoid."""
        if self._time_warned or plan.decide_at is None or epoch >= plan.decide_at:
            return
        timer = _timer(trainer)
        if timer is None:
            return
        left = cast(float, timer.time_remaining())  # _timer returns only a Timer with a duration
        per_epoch = timer.time_elapsed() / (epoch + 1)  # the Timer counts all epochs
        if per_epoch <= 0 or left >= (plan.decide_at - epoch) * per_epoch:
            return
        self._time_warned = True
        stop = epoch + 1 + int(max(left, 0.0) // per_epoch)
        rank_zero_warn(
            f"LowRankFactorization: schedule='auto': max_time will likely stop this run during epoch {stop} "
            f"({max(left, 0.0):.4g} s left at about {per_epoch:.4g} s per epoch so far), before the latest switch "
            f"(decided at the validation run of epoch {plan.decide_at}, applied from epoch {plan.latest_switch_epoch}"
            f"): unless the layers' spectra settle first, the model ends dense. Raise max_time, or set max_epochs "
            "to the epochs the time allows (the latest switch counts from them), or lower Readiness.latest"
        )

    def after_validation(self, trainer: Any, pl_module: Any, history: list) -> None:
        """Completes this run's entry (the validation run's time, the watching's share of it), appends
        it to ``history`` and logs it."""
        entry, self._pending = self._pending, None
        if entry is None:
            return
        entry["validation_seconds"] = time.perf_counter() - self._started
        entry["watch_cost"] = entry["signal_seconds"] / max(entry["validation_seconds"], 1e-9)
        history.append(entry)
        metrics = {"factorize/ready": float(entry["ready"]), "factorize/watch_cost": entry["watch_cost"]}
        if entry["stable_rank_change"] is not None and math.isfinite(entry["stable_rank_change"]):
            metrics["factorize/stable_rank_change"] = entry["stable_rank_change"]
        metrics.update({f"factorize/{n}/stable_rank": v for n, v in entry["stable_rank"].items()})
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)

    def restore(self, schedule: dict[int, Any], policies: dict[int, Any]) -> None:
        """After ``load_state_dict``: the decided switch back in the schedule."""
        if self.switch_epoch is not None:
            schedule[self.switch_epoch] = policies[self.switch_epoch] = self.target

    def state_dict(self) -> dict[str, Any]:
        return {
            "target": policy_spec(self.target), "readiness": readiness_spec(self.readiness),
            "previous": None if self.previous is None else dict(self.previous), "calm": self.calm,
            "switch_epoch": self.switch_epoch,
        }  # fmt: skip

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        """The watching state of a checkpoint (None: a state written without ``schedule="auto"``:
        watching starts over). The target and readiness are this callback's own (as with an edited
        schedule)."""
        self.reset()
        if state:
            self.previous = None if state.get("previous") is None else dict(state["previous"])
            self.calm = int(state.get("calm", 0))
            self.switch_epoch = state.get("switch_epoch")


def read_any_schedule(
    schedule: Union[Auto, Mapping[Any, ScheduleValue], str], mode: str, interval: str = "epoch"
) -> tuple[dict[int, ScheduleValue], dict[int, RankPolicy], Optional[AutoSchedule]]:
    """(schedule values, policies, AutoSchedule or None) of the callback's ``schedule``: a
    hand-written ``{epoch: value}`` (``read_schedule``; ``{step: value}`` with ``interval="step"``),
    or an ``Auto`` (``specs.auto_from`` turns ``"auto"`` into one) whose target is a ``RankPolicy``
    or a scalar read by ``mode`` (default ``default_target()``), epochs only."""
    if isinstance(schedule, str):
        raise ValueError(
            f"schedule={schedule!r}: a schedule is a mapping {{{interval}: value}} such as {{2: 0.5, 4: 0.25}}, "
            "or 'auto' / Auto(target, readiness) (switch when the layers' stable ranks settle)"
        )
    if isinstance(schedule, Auto):
        if interval != "epoch":
            raise ValueError(
                f"schedule='auto' with interval={interval!r}: auto decides at validation runs and switches at the next "
                "epoch start, so it counts epochs only. Drop interval= (or pass interval='epoch'), or write the step "
                "schedule by hand, e.g. schedule=progressive(ParamBudget(0.5), [0, 100, 200]) with interval='step'"
            )
        target = schedule.target
        policy = default_target() if target is None else read_schedule({0: target}, mode)[1][0]
        return {}, {}, AutoSchedule(policy, schedule.readiness or Readiness())
    values, policies = read_schedule(schedule, mode, unit=interval)
    return values, policies, None


@dataclasses.dataclass(frozen=True)
class SwitchPlan:
    """What a run's Trainer limits leave ``schedule="auto"``, computed before training.

    ``epochs``: how many epochs the run trains, counted from epoch 0 (None: not known before
    training). ``latest_epoch``: ``Readiness.latest_epoch(epochs)``. ``decide_at``: the epoch of the
    validation run that switches at the latest, settled or not: the first run at or after the one
    ending epoch ``latest_epoch - 1``, or where no such run can apply a switch (its next epoch does
    not train), the last run that can (None: no latest switch). ``warnings``: what the run's limits
    make impossible, to be said before training."""

    epochs: Optional[int]
    latest_epoch: Optional[int]
    decide_at: Optional[int]
    warnings: tuple[str, ...] = ()

    @property
    def latest_switch_epoch(self) -> Optional[int]:
        """The epoch from which the model runs at low rank at the latest (None: no such bound)."""
        return None if self.decide_at is None else self.decide_at + 1

    def trains(self, epoch: int) -> bool:
        """Whether ``epoch`` will train (True where the run's length is not known)."""
        return self.epochs is None or epoch < self.epochs


def switch_plan(trainer: Any, readiness: Readiness) -> SwitchPlan:
    """The latest switch from the validation runs ``trainer`` will make in this ``fit`` (from its
    current epoch on, so also after a resume), with the warnings its limits call for.

    Needs ``trainer.num_training_batches`` (known from ``on_train_start``): ``max_steps`` is
    converted to epochs with the epoch's optimizer steps, ``ceil(batches / accumulate_grad_batches)``
    (Lightning also steps at an epoch's last batch). An early stop (``EarlyStopping``, a time limit)
    cannot be planned for; the plan counts on the run's configured length."""
    start, trained = training_position(trainer)  # after a resume current_epoch may lag by one
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    first_step = trainer.global_step  # the optimizer step at which epoch `start` began
    epochs: Optional[int] = max_epochs if max_epochs is not None and max_epochs >= 0 else None
    length = f"max_epochs={max_epochs}"
    unknown: Optional[str] = None  # why the length is not known before training
    step_limited: Optional[int] = None  # the optimizer steps per epoch where max_steps sets the length
    if max_steps is not None and max_steps >= 0:
        steps, how = _steps_per_epoch(trainer)
        if steps is None:
            unknown = f"max_steps={max_steps} with {how}"
        else:
            first_step -= math.ceil(trained / max(1, int(trainer.accumulate_grad_batches)))
            by_steps = start + math.ceil(max(0, max_steps - first_step) / steps)
            if epochs is None or by_steps < epochs:
                epochs, length = by_steps, f"max_steps={max_steps} ({steps} optimizer steps per epoch: {how})"
                step_limited = steps
    elif epochs is None:
        unknown = "max_time only" if _timer(trainer) is not None else "max_epochs=-1 and no max_steps"
    warnings: list[str] = []
    if unknown is not None and readiness.latest is not None:
        bound = "" if epochs is None else f"; it counts from max_epochs={epochs}, which max_steps may cut short"
        warnings.append(
            f"Readiness.latest={readiness.latest} needs the run's length in epochs, not known before training "
            f"({unknown}){bound}: the switch may then come only when the layers' spectra settle, and the model "
            f"may end dense. Set max_epochs to the run's length (the latest switch counts from it), or pass "
            "readiness=Readiness(latest=None) to switch only when settled"
        )
    if epochs is None:
        return SwitchPlan(None, None, None, tuple(warnings))
    validates = _validation_epochs(trainer)
    last_useful = _search(validates, epochs - 2, start - 1, -1)  # a run whose next epoch still trains
    if last_useful is None:
        warnings.append(_cannot_switch(trainer, validates, start, epochs, length, step_limited, first_step))
        return SwitchPlan(epochs, readiness.latest_epoch(epochs), None, tuple(warnings))
    latest = readiness.latest_epoch(epochs)
    decide_at = None
    if latest is not None:
        decide_at = _search(validates, max(start, latest - 1), epochs - 1, 1)
        decide_at = last_useful if decide_at is None else decide_at  # moved to the last run that can apply it
    return SwitchPlan(epochs, latest, decide_at, tuple(warnings))


def _cannot_switch(
    trainer: Any,
    validates: Callable[[int], bool],
    start: int,
    epochs: int,
    length: str,
    steps: Optional[int],
    first_step: int,
) -> str:
    """The warning for a run where no validation run is followed by an epoch that trains, with what
    to change: validate earlier, or train long enough that an epoch follows the first validation run."""
    runs = [e for e in range(start, epochs) if validates(e)][:8]
    first = _search(validates, start, start + 100_000, 1)
    every = trainer.check_val_every_n_epoch
    how = f"check_val_every_n_epoch={every}"
    if every is None:
        how = f"val_check_interval={trainer.val_check_interval}"
    seen = f"validation runs in epoch(s) {runs}" if runs else "no validation run"
    span = f"epoch {start}" if epochs - 1 <= start else f"epochs {start}..{epochs - 1}"
    longer = ""
    if first is not None:
        need = first + 2
        limit = f"max_epochs >= {need}" if steps is None else f"max_steps >= {(need - start) * steps + first_step}"
        longer = f", or train at least {need} epochs ({limit})"
    return (
        f"it cannot switch in this run: the run trains {span} ({length}) with {seen} "
        f"({how}), and a switch decided at a validation run applies from the next epoch, which must still train: "
        f"the model ends dense. Validate before the last epoch (a lower {how.split('=')[0]}){longer}"
    )


def _steps_per_epoch(trainer: Any) -> tuple[Optional[int], str]:
    """(optimizer steps per epoch, how they were counted); None where training alone can tell."""
    batches = trainer.num_training_batches
    if not trainer.lightning_module.automatic_optimization:
        return None, "manual optimization (training_step decides how often the optimizers step)"
    if not isinstance(batches, int) and not (isinstance(batches, float) and math.isfinite(batches)):
        return None, "a training loader without a length"
    if any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks):
        return None, "a GradientAccumulationScheduler (the accumulation changes by epoch)"
    batches, accumulate = int(batches), max(1, int(trainer.accumulate_grad_batches))
    if batches <= 0:
        return None, "no training batches"
    how = f"{batches} batches" + (f", accumulate_grad_batches={accumulate}" if accumulate > 1 else "")
    return math.ceil(batches / accumulate), how


def _validation_epochs(trainer: Any) -> Callable[[int], bool]:
    """Whether a validation run happens during (or at the end of) an epoch, as Lightning's training
    loop decides: every ``check_val_every_n_epoch``-th epoch (at ``val_check_interval`` batches,
    which Lightning keeps within the epoch, or at its end); with ``check_val_every_n_epoch=None``
    every ``val_check_batch`` batches counted across epochs. A time-based interval cannot be
    planned: each allowed epoch counts as validating."""
    every, batches, interval = trainer.check_val_every_n_epoch, trainer.num_training_batches, trainer.val_check_batch
    if every is not None:
        return lambda epoch: (epoch + 1) % every == 0
    if isinstance(interval, int) and isinstance(batches, int) and interval > 0:
        return lambda epoch: (epoch + 1) * batches // interval > epoch * batches // interval
    return lambda epoch: True


def _search(validates: Callable[[int], bool], first: int, stop: int, step: int) -> Optional[int]:
    """The first epoch from ``first`` towards ``stop`` (excluded) with a validation run (None: none).
    Validation is periodic, so the walk ends within one period of ``first``."""
    period_bound = 100_000  # far beyond any period Lightning's settings make
    for n, epoch in enumerate(range(first, stop, step)):
        if validates(epoch):
            return epoch
        if n >= period_bound:
            return None
    return None


def _timer(trainer: Any) -> Optional[Timer]:
    """The Trainer's time limit (``max_time`` or a ``Timer`` callback with a duration), if any."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, Timer) and cb.time_remaining() is not None), None)


def _agreed(trainer: Any, values: dict[str, float]) -> dict[str, float]:
    """The mean of ``values`` over the DDP ranks (one all-reduce, layers in name order)."""
    world = trainer.world_size
    if world <= 1:
        return values
    names = sorted(values)
    t = torch.tensor([values[n] for n in names], dtype=torch.float64, device=trainer.strategy.root_device)
    t = trainer.strategy.reduce(t, reduce_op="sum") / world
    return {n: float(v) for n, v in zip(names, t.cpu().tolist(), strict=True)}


__all__ = ["AutoSchedule", "Readiness", "SwitchPlan", "read_any_schedule", "switch_plan"]
