"""The grouped arguments every door shares: ``Targets`` (which layers), ``Statistics`` (how each
layer's inputs are summarized) and ``Auto`` (``schedule="auto"``'s target and readiness).

One object per concept keeps the doors' signatures short and their meanings equal: the callback,
the engine and ``factorize_model`` take ``targets=`` (patterns, or a ``Targets``) and
``statistics=`` (a ``Statistics``); the callback's ``schedule=`` also takes an ``Auto``. Every field
is checked (and normalized) when the object is built, by the shared checkers of ``settings``. Where
the doors' defaults differ on purpose (the rows kept), a ``Statistics`` field left at ``"default"``
takes its door's (``arguments.DEFAULTS``, with why).

The flat names these replace (``exclude=``, ``min_params=``, ``max_samples=``, ...) still work for
one release: ``targets_from`` / ``statistics_from`` / ``auto_from`` fold them into the object with a
``DeprecationWarning`` (``arguments.MOVED``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from . import settings
from .arguments import DOOR_ARGUMENT, MOVED, default, moved
from .ranks.policies import RankPolicy
from .ranks.readiness import Readiness

Patterns = Optional[Union[str, list[str]]]
Door = Literal["training", "one_shot"]


def _check_fields(obj: Any, checked: dict[str, Any]) -> None:
    for name, value in checked.items():
        object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class Targets:
    """Which layers to factorize: those matching ``include`` and not ``exclude`` with at least
    ``min_params`` weights and ``min_features`` features (the same rule at every door: it depends
    on the model only).

    Args:
        include: fnmatch patterns over qualified module names (one string is one pattern); None:
            every Linear / Conv2d passing ``min_params`` and ``min_features``. Each must match a
            module, and a layer named exactly must be factorizable.
        exclude: patterns of module names to leave dense (one that matches nothing warns).
        min_params: layers with fewer weights stay dense (a pair would save nothing worth it).
        min_features: layers whose min(in, out) (C_in * k_h * k_w and C_out for a convolution) is
            smaller stay dense (by default a 10-class head is left alone).
    """

    include: Patterns = None
    exclude: Patterns = None
    min_params: int = 1024
    min_features: int = 32

    def __post_init__(self) -> None:
        _check_fields(self, {
            "include": settings.check_patterns("targets", self.include),
            "exclude": settings.check_patterns("exclude", self.exclude),
            "min_params": settings.check_min_params(self.min_params),
            "min_features": settings.check_min_features(self.min_features),
        })  # fmt: skip

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))


@dataclass(frozen=True)
class Statistics:
    """How the statistics of each targeted layer's inputs are collected.

    Args:
        max_samples: cap on the rows (tokens / output pixels) per layer (None: no cap).
            ``"default"``: the door's (training 100,000; one-shot 200,000).
        sample_fraction: share in (0, 1] of each batch's rows kept, or ``"auto"`` (keeps the
            collection near 5% of the layer's forward). ``"default"``: the door's (training
            ``"auto"``; one-shot 1.0).
        max_bytes: a budget for the float64 statistics held at once; over it, the batches are run
            once per group of layers that fits (``surgery/statistics/passes.py``). None: one pass.
        space: ``"auto"`` accumulates ``x @ W`` for layers with fewer outputs than inputs (smaller,
            and exact while the weights stay as they were during collection); ``"input"`` always
            accumulates the inputs' own moments.
    """

    max_samples: Union[int, None, Literal["default"]] = "default"
    sample_fraction: Union[float, Literal["auto", "default"]] = "default"
    max_bytes: Optional[int] = None
    space: Literal["auto", "input"] = "auto"

    def __post_init__(self) -> None:
        _check_fields(self, {
            "max_samples": self.max_samples if self.max_samples == "default"
            else settings.check_max_samples(self.max_samples),
            "sample_fraction": self.sample_fraction if self.sample_fraction == "default"
            else settings.check_sample_fraction(self.sample_fraction),
            "max_bytes": settings.check_max_statistics_bytes(self.max_bytes),
            "space": settings.check_space(self.space),
        })  # fmt: skip

    def at(self, door: Door) -> "Statistics":
        """This spec with the fields left at ``"default"`` set to ``door``'s defaults."""
        return dataclasses.replace(self, **{
            name: default(name, door) for name in ("max_samples", "sample_fraction") if getattr(self, name) == "default"
        })  # fmt: skip


@dataclass(frozen=True)
class Auto:
    """``schedule=Auto(...)``: one switch to ``target`` once the layers' stable ranks settle
    (``schedule="auto"`` is ``Auto()``); the callback only (it plans the latest switch from the
    Trainer's limits).

    Args:
        target: the policy the switch applies (a ``RankPolicy``, or a scalar read by ``mode``);
            None: ``ParamBudget(0.5, metric="macs", sensitivity=False)`` (half the multiply-adds,
            allocated by the layers' NMSE alone: the output probe at the switch cost about 2.9x a
            whole dense run on the LM trade-off benchmark).
        readiness: when to switch (None: ``Readiness()``).
    """

    target: Optional[Union[RankPolicy, float, int]] = None
    readiness: Optional[Readiness] = None

    def __post_init__(self) -> None:
        if self.readiness is not None and not isinstance(self.readiness, Readiness):
            raise TypeError(
                f"readiness must be a factorize_plugin.Readiness (or None for the defaults), got "
                f"{type(self.readiness).__name__}"
            )


def _given(old: dict[str, Any], spec: Any) -> dict[str, Any]:
    """The old flat arguments set to something other than their old default, the field's default in
    ``spec`` (those that can change what the door does)."""
    return {k: v for k, v in old.items() if not _same(v, getattr(spec, MOVED[k][1]))}


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def targets_from(where: str, targets: Union[Patterns, Targets], **old: Any) -> Targets:
    """The ``Targets`` of a door's ``targets=`` and its old flat arguments (``exclude``,
    ``min_params``, ``min_features``: ``DeprecationWarning`` when set)."""
    given = _given(old, Targets())
    if isinstance(targets, Targets):
        _refuse_beside(where, given)
        return targets
    moved(where, given)
    return Targets(targets, **given)


def statistics_from(where: str, statistics: Optional[Statistics], door: Door, **old: Any) -> Statistics:
    """The ``Statistics`` (resolved at ``door``) of a door's ``statistics=`` and its old flat
    arguments (``max_samples``, ``sample_fraction``, ``max_statistics_bytes``, ``space``)."""
    given = _given(old, Statistics().at(door))
    if statistics is not None:
        if not isinstance(statistics, Statistics):
            raise TypeError(
                f"{where}: statistics must be a factorize_plugin.Statistics, got {type(statistics).__name__}"
            )
        _refuse_beside(where, given)
        return statistics.at(door)
    moved(where, given)
    return Statistics(**{MOVED[k][1]: v for k, v in given.items()}).at(door)


def auto_from(where: str, schedule: Any, target: Any, readiness: Any) -> Any:
    """``schedule`` with ``"auto"`` and its old ``target=`` / ``readiness=`` as an ``Auto``."""
    given = {k: v for k, v in (("target", target), ("readiness", readiness)) if v is not None}
    if isinstance(schedule, Auto):
        _refuse_beside(where, given)
        return schedule
    if isinstance(schedule, str) and schedule.strip().lower() == "auto":
        moved(where, given)
        return Auto(**given)
    if given:
        raise ValueError(
            f"{' and '.join(given)} only apply to schedule='auto'; with a hand-written schedule {{epoch: value}} "
            "the values are the targets: drop " + " and ".join(f"{n}=" for n in given)
        )
    return schedule


def _refuse_beside(where: str, given: dict[str, Any]) -> None:
    """Old flat arguments passed beside the object that now holds them: refused."""
    if given:
        cls = MOVED[next(iter(given))][0]
        fields = ", ".join(f"{MOVED[k][1]}=" for k in given)
        raise ValueError(f"{where}: {', '.join(f'{k}=' for k in given)} beside {DOOR_ARGUMENT[cls]}={cls}(...): pass "
                         f"{fields} inside {cls}(...) only")


__all__ = ["Auto", "Statistics", "Targets", "auto_from", "statistics_from", "targets_from"]
