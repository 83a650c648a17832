"""Reading a milestone schedule ``{epoch: value}`` (or ``{step: value}``) into rank policies (no Lightning)."""

from __future__ import annotations

import numbers
from typing import Any, Literal, Mapping, Union, cast

from ..surgery.ranks.policies import POLICY_ARGS, RankLike, RankPolicy, as_rank_like, make_policy
from ..surgery.ranks.policy_spec import policy_spec
from ..surgery.settings import check_choice

Mode = Literal["rank", "max_nmse", "param_budget"]
Interval = Literal["epoch", "step"]
INTERVALS = ("epoch", "step")
ScheduleValue = Union[int, float, RankPolicy]


def _epoch(key: Any, unit: str = "epoch") -> int:
    """A schedule key as a 0-based epoch (``unit="step"``: a ``trainer.global_step`` value): an int
    (or NumPy int), or a string / float (any NumPy float width) that is exactly one."""
    what = f"an {unit} number" if unit == "epoch" else f"a {unit} number"
    if isinstance(key, bool):
        raise ValueError(f"schedule key {key!r} is not {what}")
    if isinstance(key, str):
        try:
            key = int(key.strip())
        except ValueError:
            raise ValueError(f"schedule key {key!r} is not {what}") from None
    if isinstance(key, numbers.Real) and not isinstance(key, numbers.Integral):  # float, np.float16 ...
        key = float(key)
        if not key.is_integer():
            where = "epoch starts" if unit == "epoch" else "optimizer steps"
            raise ValueError(f"schedule key {key!r} is not a whole {unit}: milestones fall on {where} (use an int)")
        key = int(key)
    if not isinstance(key, int):
        try:
            key = int(key.__index__())
        except (AttributeError, TypeError):
            raise ValueError(f"schedule key {key!r} is not {what}") from None
    if key < 0:
        raise ValueError(f"schedule key {key}: {unit}s are 0-based and cannot be negative")
    return key


def read_schedule(
    schedule: Mapping[Any, ScheduleValue], mode: str, unit: str = "epoch"
) -> tuple[dict[int, ScheduleValue], dict[int, RankPolicy]]:
    """Checks a schedule and returns (values, policies), both sorted by key (an epoch, or with
    ``unit="step"`` a ``trainer.global_step`` value; a ``Progressive`` is such a mapping).

    A value is a ``RankPolicy`` or a scalar read by ``mode`` (``"rank"``: ``FixedRank``,
    ``"max_nmse"``: ``MaxNMSE``, ``"param_budget"``: ``ParamBudget``). Compression only grows:
    within each kind of policy (int ranks, fractional ranks, error targets, budgets) no milestone
    may compress less than the one before.
    """
    check_choice("mode", mode, POLICY_ARGS)
    if not schedule:
        raise ValueError(f"schedule is empty: give at least one milestone {{{unit}: value}}")
    values: dict[int, ScheduleValue] = {}
    for key, value in schedule.items():
        epoch = _epoch(key, unit)
        if epoch in values:
            twice = [k for k in schedule if _epoch(k, unit) == epoch]
            raise ValueError(f"schedule names {unit} {epoch} twice (keys {twice})")
        # numpy / 0-d tensor: plain (make_policy below refuses what is not a rank)
        values[epoch] = value if isinstance(value, RankPolicy) else cast(ScheduleValue, as_rank_like(value))
    values = dict(sorted(values.items()))
    policies = {e: v if isinstance(v, RankPolicy) else make_policy(**{mode: cast(Any, v)}) for e, v in values.items()}
    last: dict[str, tuple[int, float]] = {}
    for epoch, policy in policies.items():
        kind, key = policy.order_key()
        if kind in last and key < last[kind][1]:
            prev = last[kind][0]
            raise ValueError(
                f"schedule goes back up at {unit} {epoch} ({values[prev]} at {unit} {prev}, then {values[epoch]}): "
                f"compression may only grow ({kind}); sort the values so that every milestone compresses at least "
                "as much as the one before"
            )
        last[kind] = (epoch, key)
    return values, policies


def describe(value: ScheduleValue, mode: str) -> str:
    return repr(value) if isinstance(value, RankPolicy) else f"{mode}={value}"


def plain_value(value: ScheduleValue) -> Union[RankLike, dict[str, Any]]:
    """A schedule value as a history / checkpoint records it: a number as it is, a policy as its
    ``policy_spec`` (class path and fields, no run state: loadable under safe loading)."""
    return policy_spec(value) if isinstance(value, RankPolicy) else value


__all__ = ["INTERVALS", "Interval", "Mode", "RankLike", "ScheduleValue", "describe", "plain_value", "read_schedule"]
