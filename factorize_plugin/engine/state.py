"""The engine's checkpointed state as plain data, with a version and its migrations.

Lightning (and a careful plain loop) loads checkpoints with torch's safe ``weights_only``
unpickler: the state may hold only
numbers, strings, bools, None, lists, tuples and dicts. ``plain`` turns what the engine records
into that (a rank policy into its ``policy_spec``); ``migrate_state`` brings a state written by an
earlier release up to ``STATE_VERSION``.

Versions:
    0 (no ``version`` key): ``done``, ``ranks``, ``history``, ``param_groups``, ``targets``; a
      history ``value`` was the schedule value itself (a number, or a policy object, which made
      the checkpoint unloadable under safe loading).
    1: the same fields plus ``version``; every history ``value`` is a number or a policy spec.
    2: plus ``auto``: the watching state of ``schedule="auto"`` (``AutoSchedule.state_dict``: the
      last stable ranks, settled runs in a row, the decided switch epoch), None for a hand-written
      schedule; ``history`` may hold ``"event": "watch"`` entries. A version-1 state gets
      ``auto=None`` (a resumed ``schedule="auto"`` run then starts watching afresh).
    3: plus ``interval``: what the keys of ``done`` (and of the schedule) count, ``"epoch"`` or
      ``"step"`` (``trainer.global_step``); an older state gets ``"epoch"``, the only one then.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..surgery.ranks.policies import RankPolicy
from ..surgery.ranks.policy_spec import PLAIN_SCALARS, policy_spec
from ..surgery.swap.optim import param_group_names, restore_param_group_order

STATE_VERSION = 3


def plain(obj: Any, where: str = "state") -> Any:
    """``obj`` as plain data (new containers throughout: a deep copy). Policies become their spec,
    NumPy / 0-d tensor numbers Python numbers; anything else is a TypeError naming ``where``."""
    if type(obj) in PLAIN_SCALARS:  # exact types: numpy.float64 is a float subclass the safe unpickler refuses
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, RankPolicy):
        return policy_spec(obj)
    if isinstance(obj, Mapping):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, torch.Tensor) and obj.ndim == 0:
        return obj.item()
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    raise TypeError(
        f"LowRankFactorization: {where} holds a {type(obj).__name__}, which a checkpoint loaded with torch's safe "
        "weights_only unpickler cannot hold; record numbers, strings, lists or dicts"
    )


def migrate_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state of any earlier version as one of ``STATE_VERSION`` (ValueError for a newer one)."""
    version = state.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(
            f"LowRankFactorization: the checkpoint's callback state has version {version!r}, not an int >= 0"
        )
    if version > STATE_VERSION:
        raise ValueError(
            f"LowRankFactorization: the checkpoint's callback state has version {version}, newer than this release "
            f"reads ({STATE_VERSION}): upgrade factorize_plugin to resume from it"
        )
    state = dict(state)
    if version == 0:  # history values could be policy objects; every other field was plain already
        state = {"done": [], "ranks": {}, "history": [], "param_groups": None, "targets": None, **state}
        state["history"] = plain(list(state["history"]), "history")
    if version <= 1:  # no auto schedule before version 2
        state["auto"] = None
    if version <= 2:  # milestones counted epochs only before version 3
        state["interval"] = "epoch"
    state["version"] = STATE_VERSION
    return state


def check_same_interval(interval: str, state: Mapping[str, Any]) -> None:
    """Refuses (before training) to resume milestones done in one unit with a schedule in another:
    a checkpoint's ``done`` of epochs read as steps (or the reverse) would skip or repeat them."""
    saved = state.get("interval", "epoch")
    if saved != interval and state.get("done"):
        raise ValueError(
            f"LowRankFactorization: the checkpoint's milestones {list(state['done'])} count {saved}s, this callback's "
            f"schedule counts {interval}s (interval={interval!r}): resume with interval={saved!r}, the setting of the "
            "run that wrote the checkpoint"
        )


def param_groups_by_name(
    optimizers: Optional[Sequence[torch.optim.Optimizer]], model: Optional[nn.Module]
) -> Optional[list[list[list[str]]]]:
    """The parameter names of each param group of each optimizer (None outside training)."""
    if optimizers is None or model is None:
        return None
    return [param_group_names(opt, model) for opt in optimizers]


def restore_optimizer_order(
    optimizers: Sequence[torch.optim.Optimizer], saved: list[list[list[str]]], model: nn.Module
) -> None:
    """The optimizers were built on the rebuilt model: put its parameters back in the ``saved`` order
    (``param_groups_by_name``) so that the optimizer state (loaded next) lands on the right tensors."""
    named = dict(model.named_parameters())
    if len(saved) != len(optimizers):
        raise RuntimeError(
            f"the checkpoint holds {len(saved)} optimizer(s), the run built "
            f"{len(optimizers)}: cannot restore the optimizer state onto the factorized parameters"
        )
    for opt, groups in zip(optimizers, saved, strict=True):
        restore_param_group_order(opt, groups, named)


__all__ = [
    "STATE_VERSION",
    "check_same_interval",
    "migrate_state",
    "param_groups_by_name",
    "plain",
    "restore_optimizer_order",
]
