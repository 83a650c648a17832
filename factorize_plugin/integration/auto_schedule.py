"""``schedule="auto"``: when to switch, decided at each validation run from the readiness signal.

The callback asks ``AutoSchedule`` at the start of every validation run of ``fit`` (never the
sanity check): the layers' stable ranks are measured (``surgery/readiness.py``, weights only),
averaged over the DDP ranks, and compared with the previous run's and with the rank the target
plans for each layer (a layer is settled when it moved by at most ``tolerance``, or when its stable
rank is within ``room`` of the rank it will keep). When the model is ready (or the
``latest`` epoch has come) the target becomes a milestone at the next epoch start, added to the
callback's schedule before its own hook decides to collect statistics in this same validation
run; the switch then goes through the ordinary milestone path. At the end of the run the decision
goes into ``history`` (``"event": "watch"``) with the signal's cost and is logged.

DDP: the weights are identical on every rank (DDP all-reduces the gradients), so every rank would
measure the same stable ranks; they are all-reduced anyway (one collective of one float per layer,
in name order) so that a last-bit difference between ranks (a nondeterministic kernel) can never
split the decision: every rank decides from the same numbers, by the same rule.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..surgery.policies import ParamBudget, RankPolicy
from ..surgery.policy_spec import policy_spec
from ..surgery.readiness import Readiness, largest_change, layer_states, planned_ranks, readiness_spec, stable_ranks
from .schedule import ScheduleValue, read_schedule


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
        latest = self.readiness.latest_epoch(trainer.max_epochs)
        reason = None
        if self.calm >= self.readiness.patience:
            reason = "settled"
        elif latest is not None and epoch + 1 >= latest:
            reason = "latest"
        last = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        if reason is not None and (last is None or epoch + 1 < last):  # never for an epoch that will not run
            self.switch_epoch = epoch + 1
            schedule[self.switch_epoch] = policies[self.switch_epoch] = self.target
        seconds = time.perf_counter() - t0
        self._pending = {
            "event": "watch", "epoch": epoch, "global_step": trainer.global_step, "stable_rank": dict(ranks),
            "stable_rank_change": change, "moving": sorted(n for n, v in states.items() if v == "moving"),
            "within_room": sorted(n for n, v in states.items() if v == "within_room"), "settled_runs": self.calm,
            "ready": reason is not None, "reason": reason, "switch_epoch": self.switch_epoch, "signal_seconds": seconds,
        }  # fmt: skip
        self._started = time.perf_counter()

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
    schedule: Union[str, Mapping[Any, ScheduleValue]],
    mode: str,
    target: Optional[ScheduleValue],
    readiness: Optional[Readiness],
) -> tuple[dict[int, ScheduleValue], dict[int, RankPolicy], Optional[AutoSchedule]]:
    """(schedule values, policies, AutoSchedule or None) of the callback's arguments: a hand-written
    ``{epoch: value}`` (``read_schedule``), or ``"auto"`` with a ``target`` (a ``RankPolicy``, or a
    scalar read by ``mode``; default ``ParamBudget(0.5, metric="macs")``) and its ``Readiness``."""
    if isinstance(schedule, str):
        if schedule.strip().lower() != "auto":
            raise ValueError(
                f"schedule={schedule!r}: a schedule is a mapping {{epoch: value}} such as {{2: 0.5, 4: 0.25}}, "
                "or 'auto' (switch when the layers' stable ranks settle, to target=...)"
            )
        if readiness is None:
            readiness = Readiness()
        elif not isinstance(readiness, Readiness):
            raise TypeError(
                f"readiness must be a factorize_plugin.Readiness (or None for the defaults), got "
                f"{type(readiness).__name__}"
            )
        # a fresh default per callback: a ParamBudget keeps its last plan
        policy = ParamBudget(0.5, metric="macs") if target is None else read_schedule({0: target}, mode)[1][0]
        return {}, {}, AutoSchedule(policy, readiness)
    given = [n for n, v in (("target", target), ("readiness", readiness)) if v is not None]
    if given:
        raise ValueError(
            f"{' and '.join(given)} only apply to schedule='auto'; with a hand-written schedule {{epoch: value}} "
            "the values are the targets: drop " + " and ".join(f"{n}=" for n in given)
        )
    values, policies = read_schedule(schedule, mode)
    return values, policies, None


def _agreed(trainer: Any, values: dict[str, float]) -> dict[str, float]:
    """The mean of ``values`` over the DDP ranks (one all-reduce, layers in name order)."""
    world = trainer.world_size
    if world <= 1:
        return values
    names = sorted(values)
    t = torch.tensor([values[n] for n in names], dtype=torch.float64, device=trainer.strategy.root_device)
    t = trainer.strategy.reduce(t, reduce_op="sum") / world
    return {n: float(v) for n, v in zip(names, t.cpu().tolist())}


__all__ = ["AutoSchedule", "Readiness", "read_any_schedule"]
