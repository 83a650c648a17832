"""``FactorizationEngine``: when to factorize, in plain PyTorch.

The engine owns the schedule (milestones by epoch or by optimizer step), the statistics collected
during the evaluation before a milestone, the milestone itself (solve, choose ranks, time, swap, edit
the optimizers: ``surgery.refactorize``), the learning-rate re-warm after a swap, the speed
decision, and their checkpointed state. It talks to the training loop only through a ``Host``
(``engine/host.py``). The Lightning callback is one driver (``integration/callback.py``); a
hand-written loop is another (``examples/plain_loop.py``):

    engine = FactorizationEngine({0: 0.5, 2: 0.25}, speed_guard=False)
    host = PlainHost(model, [optimizer], val_batches, steps_per_epoch=len(train_loader))
    engine.setup(model, host)
    for epoch in range(epochs):
        engine.start_epoch(host, model, epoch)          # applies the milestone due now, if any
        for batch in train_loader:
            ...                                          # forward, backward, optimizer.step()
            engine.end_batch()
        with engine.observing(host, model, epoch + 1):  # the evaluation before the next milestone
            evaluate(model, val_batches)
    state = engine.state_dict(host, model)               # plain data, beside the model's state dict
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Union, cast

import torch.nn as nn

from ..surgery import settings
from ..surgery.arguments import default, with_argument_help
from ..surgery.calling import InputFn
from ..surgery.pipeline import Selection, finish, leave_out_silent, prepare
from ..surgery.ranks.policies import RankPolicy
from ..surgery.specs import Patterns, Statistics, Targets, statistics_from, targets_from
from ..surgery.statistics.collector import ActivationCollector
from ..surgery.statistics.passes import PassResults
from ..surgery.swap.optim import left_without_state
from ..surgery.swap.refactorize import refactorize
from ..surgery.timing.speed import SpeedGuard, resolve_guard
from .host import Host
from .milestone import (
    log_milestone,
    milestone_entry,
    new_collector,
    output_measures,
    plan,
    record_costs,
    solve_in_passes,
)
from .rewarm import LRRewarm
from .schedule import INTERVALS, Interval, Mode, ScheduleValue, describe, read_schedule
from .speed import TrainingInputWatch, model_scope, speed_check
from .state import (
    STATE_VERSION,
    check_same_interval,
    migrate_state,
    param_groups_by_name,
    plain,
    restore_optimizer_order,
)


@with_argument_help
class FactorizationEngine:
    """Progressive low-rank factorization driven by any training loop (see the module docstring).

    The arguments are those of ``LowRankFactorization`` with the same names, types, defaults and
    meanings (``docs/arguments.md``), less what only Lightning can do (``schedule="auto"``, whose
    latest switch is planned from the Trainer's limits, and ``name``). ``schedule`` may be empty (a
    driver that adds milestones as it goes: ``add_milestone``).
    """

    STATE_VERSION = STATE_VERSION

    def __init__(
        self,
        schedule: Optional[Mapping[Any, ScheduleValue]] = None,
        *,
        mode: Mode = "rank",
        interval: Interval = "epoch",
        targets: Union[Patterns, Targets] = None,
        statistics: Optional[Statistics] = None,
        budget_batches: int = default("budget_batches", "training"),
        input_fn: Optional[Callable[[Any], Any]] = None,
        regularization: float = 0.0,
        verbose: bool = True,
        speed_guard: Union[bool, Literal["auto"], SpeedGuard] = "auto",
        output_batches: int = 2,
        rewarm_steps: Union[int, str] = "auto",
    ) -> None:
        self.interval: Interval = settings.check_choice("interval", interval, INTERVALS)  # type: ignore[assignment]
        self.mode = mode
        self.schedule: dict[int, ScheduleValue] = {}
        self.policies: dict[int, RankPolicy] = {}
        if schedule:
            self.schedule, self.policies = read_schedule(schedule, mode, unit=self.interval)
        self.output_batches = settings.check_whole("output_batches", output_batches, 0)
        self.speed_setting = speed_guard
        self.speed_guard: Optional[SpeedGuard] = resolve_guard(speed_guard, "train", scope="model")
        self.targets = targets_from("FactorizationEngine", targets)
        self.statistics = statistics_from("FactorizationEngine", statistics, "training")
        self.budget_batches = settings.check_whole("budget_batches", budget_batches, 0)
        self.input_fn: Optional[InputFn] = settings.check_callable("input_fn", input_fn)
        self.regularization = settings.check_regularization(regularization)
        self.verbose = settings.check_flag("verbose", verbose)
        # state (checkpointed)
        self.done: list[int] = []
        self.ranks: dict[str, Optional[int]] = {}
        self.history: list[dict[str, Any]] = []
        self.restored_groups: Optional[list[list[list[str]]]] = None
        self.rewarm = LRRewarm(settings.check_rewarm_steps(rewarm_steps))  # the ramp after a swap
        # transient
        self.selection = Selection({})  # which layers (by name) and which were left out, with why
        self.watch = TrainingInputWatch()  # the speed guard's training batch / inputs, before a milestone
        self.measured_output_batches = self.output_batches  # 0 where the driver cannot measure the output
        self._collector: Optional[ActivationCollector] = None
        self._collected_for: Optional[int] = None  # the position whose milestone it collected for
        self._collected_at_step: Optional[int] = None  # the host's global_step when that evaluation ended

    target_names = property(lambda self: list(self.selection.layers))

    # -------------------------------------------------------------- before training
    def setup(
        self, model: nn.Module, host: Optional[Host] = None, sharded: bool = False, planned: Optional[Mapping] = None
    ) -> None:
        """Chooses the layers of the (dense) ``model`` (refused when none), resolves the speed guard
        (off on a sharded model) and refuses a layer over ``statistics.max_bytes``, all before
        training; a resume loads its saved structure after this. ``host``: where the advice goes
        (default: ``warnings.warn``); ``planned``: ``{label: policy}`` checked against the layers
        (default: the schedule's)."""
        self.speed_guard = resolve_guard(self.speed_setting, "train", scope="model", sharded=sharded)
        planned = {f"milestone {e}": p for e, p in self.policies.items()} if planned is None else planned
        self.selection = prepare(model, self.targets, planned)
        self.plan(host, model, factorized=True)  # a layer over statistics.max_bytes (at any milestone): refused now
        for message in self.selection.advice:
            if host is not None:
                host.warn(f"LowRankFactorization: {message}")
            else:
                warnings.warn(f"LowRankFactorization: {message}", stacklevel=2)

    def add_milestone(self, position: int, value: ScheduleValue) -> None:
        """Adds (or replaces) the milestone at ``position`` (a driver deciding as it goes)."""
        values, policies = read_schedule({**self.schedule, position: value}, self.mode, unit=self.interval)
        self.schedule, self.policies = values, policies

    # ------------------------------------------------------------------ positions
    def due(self, position: int) -> list[int]:
        """Milestones in force at ``position`` (an epoch, or a step with ``interval="step"``) that
        have not been applied yet (normally just ``position``)."""
        return [e for e in self.schedule if e <= position and e not in self.done]

    def pending(self) -> bool:
        """Whether a milestone of the schedule is still to come."""
        return any(e not in self.done for e in self.schedule)

    # ------------------------------------------------------------ the evaluation
    def begin_evaluation(self, host: Host, model: nn.Module, upcoming: int, batch_limits: list) -> bool:
        """Before an evaluation run: if a milestone is due at ``upcoming`` (the next position a
        milestone can apply at), collects the statistics of its first pass during the run. Returns
        whether it collects. A fresh collector per run: the last run before the milestone wins."""
        if not self.due(upcoming):
            return False
        self.drop_collector()
        # Projected (x @ W) statistics are exact only while W stays as it was during the run: if an
        # optimizer step follows it, the milestone sees global_step moved and collects again.
        first = self.plan(host, model)[0]
        self._collector = new_collector(host, model, self.selection, self.statistics, batch_limits, first).attach()
        self._collected_for = upcoming
        return True

    def end_evaluation(self, host: Host) -> None:
        """After the evaluation run: stops collecting (the statistics wait for the milestone)."""
        if self._collector is not None and self._collector.attached:
            self._collector.detach()
            self._collected_at_step = host.global_step

    @contextlib.contextmanager
    def observing(self, host: Host, model: nn.Module, upcoming: int) -> Iterator[None]:
        """``begin_evaluation`` / ``end_evaluation`` around a hand-written evaluation loop."""
        self.begin_evaluation(host, model, upcoming, host.evaluation_loaders()[1])
        try:
            yield
        finally:
            self.end_evaluation(host)

    # ------------------------------------------------------------------ boundaries
    def start_epoch(
        self, host: Host, model: nn.Module, epoch: int, undecided: bool = False
    ) -> Optional[dict[str, Any]]:
        """At the start of ``epoch``: applies the milestone due then (``interval="epoch"``) and
        starts watching the training inputs if the next epoch has one (or may: ``undecided``, a
        driver that adds milestones as it goes). Returns the milestone's history entry."""
        host.epoch = epoch
        if self.interval != "epoch":
            return None
        entry = self.apply_due(host, model, epoch)
        self.watch_training_inputs(host, model, upcoming=bool(self.due(epoch + 1)) or undecided)
        return entry

    def start_batch(self, host: Host, model: nn.Module, batch: Any) -> Optional[dict[str, Any]]:
        """Before a training batch (on the device). Epochs: keeps it for the whole-model speed check.
        Steps: applies a milestone due at this optimizer step before the batch trains (call it at a
        gradient-accumulation boundary)."""
        if self.interval == "epoch":
            self.watch.keep(batch)
            return None
        if not self.due(host.global_step):
            return None
        self.watch.keep(batch)  # the whole-model speed check times the batch about to train
        entry = self.apply_due(host, model, host.global_step)
        self.watch_training_inputs(host, model, upcoming=self.pending())
        return entry

    def end_batch(self) -> None:
        """After a training batch: releases the step hooks of optimizers whose ramp ended in it."""
        self.rewarm.release()

    def apply_due(self, host: Host, model: nn.Module, position: int) -> Optional[dict[str, Any]]:
        """Applies the last milestone due at ``position``, if any: solve, measure, swap, record."""
        due = self.due(position)
        if not due:
            return None
        milestone = due[-1]
        label = f"milestone {milestone} ({describe(self.schedule[milestone], self.mode)})"
        if due != [position]:
            host.warn(
                f"LowRankFactorization: milestone(s) {due} were not applied when due (a run resumed past them?); "
                f"applying {label} now, at {self.interval} {position}"
            )
        self.rewarm.stop()  # a ramp still running ends here (the speed check copies the optimizers)
        policy = self.policies[milestone]
        probing = policy.uses_probe and self.budget_batches > 0
        # distributed: each layer's statistics summed into one owner, which alone solves it; a probe runs
        # the model at trial ranks whose factors every process would need: statistics all-reduced for it
        solved, source = self._solve_in_passes(host, model, position, shard=not probing)
        layers = self.layers(model)
        budget = self.budget_batches if probing else 0
        batches, shift, probe = output_measures(
            host, model, layers, self.measured_output_batches, budget, self.input_fn
        )
        speed = speed_check(host, model, self.speed_guard, self.watch, self.target_names, solved.inputs, batches)
        reports = refactorize(
            model, layers, None, policy, optimizers=list(host.optimizers), probe=probe,
            agree=host.broadcast if host.world_size > 1 else None,
            speed=speed, sharding=solved.sharding, candidates=solved.candidates,
        )  # fmt: skip
        host.after_swap()  # every process gets here, whatever changed
        table, advice = finish(model, self.selection, reports, solved.positions, label)
        self.done.extend(due)
        self.ranks = {r.name: r.new_rank for r in reports}
        value = self.schedule[milestone]
        entry = milestone_entry(host.epoch, milestone, value, reports, source, self.selection.skipped, host.global_step)
        self.history.append(entry)
        log_milestone(host, reports, table, value, self.mode, self.verbose)
        record_costs(entry, host, solved, speed, shift, self.verbose)
        for message in advice:
            host.warn(f"LowRankFactorization: {message}")
        entry["heldout_nmse"] = {r.name: r.heldout_nmse for r in reports if r.heldout_nmse is not None}
        changed = [model.get_submodule(r.name) for r in reports if r.changed]
        fresh = left_without_state(host.optimizers, changed)
        entry["rewarm_steps"] = self.rewarm.after_swap(host, bool(changed), fresh)
        return entry

    def watch_training_inputs(self, host: Host, model: nn.Module, upcoming: bool) -> None:
        """Before an epoch that precedes a milestone (or, with steps, from the start of training and
        after each milestone while one is ``upcoming``): watches the training inputs for the speed
        guard, which then times a real training batch (per-layer scope: each layer's first training
        input from here on; whole-model scope: the epoch's first training batch, or with steps the
        batch the milestone precedes)."""
        self.watch.drop()
        if self.speed_guard is not None and upcoming:
            self.watch.start(self.layers(model), model_scope(self.speed_guard, host))

    def pause(self) -> None:
        """At the end of training (or a failure): no hook stays on the model or the optimizers; a
        re-warm ramp cut off here goes on when training resumes with this engine."""
        self.drop_collector()
        self.watch.drop()
        self.rewarm.pause()

    # ------------------------------------------------------------ state and resume
    def state_dict(self, host: Optional[Host] = None, model: Optional[nn.Module] = None) -> dict[str, Any]:
        """Plain data only (loadable with torch's safe ``weights_only`` unpickler), with a ``version``.
        ``host`` / ``model``: to record the optimizers' parameters by name (a resume's new
        optimizers are put back in that order: ``resume_optimizers``)."""
        optimizers = list(host.optimizers) if host is not None else None
        return {
            "version": STATE_VERSION,
            "done": list(self.done),
            "ranks": dict(self.ranks),
            "history": plain(self.history, "history"),
            "param_groups": param_groups_by_name(optimizers, model) if self.done else None,
            "targets": list(self.target_names),
            "auto": None,
            "rewarm": self.rewarm.state_dict(),
            "interval": self.interval,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Loads a state of any earlier version (migrated); returns it migrated."""
        state = migrate_state(state_dict)  # a state written by an earlier release, brought up to date
        check_same_interval(self.interval, state)
        self.done = list(state.get("done", []))
        self.ranks = dict(state.get("ranks", {}))
        self.history = list(state.get("history", []))
        self.restored_groups = state.get("param_groups")
        self.rewarm.load_state_dict(state.get("rewarm"))
        return state

    def resume_optimizers(self, host: Host, model: nn.Module, reorder: bool = True) -> None:
        """The optimizers as the checkpointed run left them, once the state is loaded and before the
        optimizers' own state is: parameters in the saved order (``reorder``), the re-warm going on."""
        if self.restored_groups and reorder:
            restore_optimizer_order(list(host.optimizers), self.restored_groups, model)
        self.restored_groups = None
        self.rewarm.resume(list(host.optimizers))  # a ramp checkpointed, or cut off by the last run's end, goes on

    def reset(self) -> None:
        """Forgets the milestones done (a new run on another model)."""
        self.done, self.ranks, self.history, self.restored_groups = [], {}, [], None
        self.rewarm.load_state_dict(None)
        self.drop_collector()

    # ---------------------------------------------------------------- helpers
    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: model.get_submodule(name) for name in self.target_names}

    def leave_out_silent(self, host: Host, model: nn.Module, silent: list[str], when: str) -> None:
        """Layers never called during ``when``: an error if named explicitly, else left out with a note."""
        notes = leave_out_silent(model, self.selection, self.targets, silent, when)
        if notes:
            host.warn(
                "LowRankFactorization: leaving out " + "; ".join(f"layer '{n}' ({note})" for n, note in notes.items())
            )

    def plan(self, host: Optional[Host], model: nn.Module, factorized: bool = False) -> list[list[str]]:
        return plan(host, self.layers(model), self.statistics, factorized=factorized)

    def drop_collector(self) -> None:
        if self._collector is not None:
            self._collector.detach()
        self._collector, self._collected_for, self._collected_at_step = None, None, None

    def _solve_in_passes(self, host: Host, model: nn.Module, position: int, shard: bool) -> tuple[PassResults, str]:
        """The first pass reuses the last evaluation run before ``position`` if no optimizer step
        followed it (the same decision on every process: same step), else calibrates now."""
        fresh = self._collected_for == position and self._collected_at_step == host.global_step
        groups = self.plan(host, model)
        collected = cast(ActivationCollector, self._collector)  # used only when fresh: collected for this position
        first = self._collector if fresh and list(collected.layers) == groups[0] else None
        self._collector, self._collected_for, self._collected_at_step = None, None, None
        leave_out = lambda silent: self.leave_out_silent(host, model, silent, "validation")  # noqa: E731
        return solve_in_passes(
            host, model, self.selection, self.statistics, groups, first, self.regularization, shard, leave_out
        )


__all__ = ["FactorizationEngine"]
