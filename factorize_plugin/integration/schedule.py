"""Reading a milestone schedule ``{epoch: value}`` into rank policies (no Lightning)."""

from __future__ import annotations

import numbers
from typing import Any, Literal, Mapping, Union

from ..surgery.policies import POLICY_ARGS, RankLike, RankPolicy, as_rank_like, make_policy
from ..surgery.policy_spec import policy_spec
from ..surgery.settings import check_choice

Mode = Literal["rank", "max_nmse", "param_budget"]
ScheduleValue = Union[int, float, RankPolicy]


def _epoch(key: Any) -> int:
    """A schedule key as a 0-based epoch: an int (or NumPy int), or a string / float (any NumPy
    float width) that is exactly one."""
    if isinstance(key, bool):
        raise ValueError(f"schedule key {key!r} is not an epoch number")
    if isinstance(key, str):
        try:
            key = int(key.strip())
        except ValueError:
            raise ValueError(f"schedule key {key!r} is not an epoch number") from None
    if isinstance(key, numbers.Real) and not isinstance(key, numbers.Integral):  # float, np.float16 ...
        key = float(key)
        if not key.is_integer():
            raise ValueError(f"schedule key {key!r} is not a whole epoch: milestones fall on epoch starts (use an int)")
        key = int(key)
    if not isinstance(key, int):
        try:
            key = int(key.__index__())
        except (AttributeError, TypeError):
            raise ValueError(f"schedule key {key!r} is not an epoch number") from None
    if key < 0:
        raise ValueError(f"schedule key {key}: epochs are 0-based and cannot be negative")
    return key


def read_schedule(
    schedule: Mapping[Any, ScheduleValue], mode: str
) -> tuple[dict[int, ScheduleValue], dict[int, RankPolicy]]:
    """Checks a schedule and returns (values, policies), both sorted by epoch.

    A value is a ``RankPolicy`` or a scalar read by ``mode`` (``"rank"``: ``FixedRank``,
    ``"max_nmse"``: ``MaxNMSE``, ``"param_budget"``: ``ParamBudget``). Compression only grows:
    within each kind of policy (int ranks, fractional ranks, error targets, budgets) no milestone
    may compress less than the one before.
    """
    check_choice("mode", mode, POLICY_ARGS)
    if not schedule:
        raise ValueError("schedule is empty: give at least one milestone {epoch: value}")
    values: dict[int, ScheduleValue] = {}
    for key, value in schedule.items():
        epoch = _epoch(key)
        if epoch in values:
            raise ValueError(f"schedule names epoch {epoch} twice (keys {[k for k in schedule if _epoch(k) == epoch]})")
        values[epoch] = value if isinstance(value, RankPolicy) else as_rank_like(value)  # numpy / 0-d tensor: plain
    values = dict(sorted(values.items()))
    policies = {e: v if isinstance(v, RankPolicy) else make_policy(**{mode: v}) for e, v in values.items()}
    last: dict[str, tuple[int, float]] = {}
    for epoch, policy in policies.items():
        kind, key = policy.order_key()
        if kind in last and key < last[kind][1]:
            prev = last[kind][0]
            raise ValueError(
                f"schedule goes back up at epoch {epoch} ({values[prev]} at epoch {prev}, then {values[epoch]}): "
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


__all__ = ["Mode", "RankLike", "ScheduleValue", "describe", "plain_value", "read_schedule"]
