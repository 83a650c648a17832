"""``progressive(target, epochs)``: a schedule that reaches ``target`` in equal-ratio steps.

With ``n = len(epochs)`` milestones and the ratio ``q`` that reaches the target in ``n`` steps,
milestone ``k`` (1-based, in key order) keeps ``q ** k`` of the start, the last one exactly the
target. What the ratio runs over depends on the target:

* a fraction (``ParamBudget(f)``, ``FixedRank(f)`` with a float f in (0, 1), a plain float in
  (0, 1)) runs from 1 (dense) to f: ``q = f ** (1 / n)``, milestone k keeps ``f ** (k / n)``
  (``ParamBudget(0.4)`` in 3 steps: 0.737, 0.543, 0.4 of the targeted dense weights). A
  ``ParamBudget`` keeps its other fields (``metric``, ``sensitivity``, ...) at every milestone; a
  plain float stays a plain float, read by the callback's ``mode`` (a rank fraction or a budget;
  under ``mode="max_nmse"`` the values fall, which the callback refuses as a schedule going back up);
* an int rank (``FixedRank(8)`` or a plain int 8) runs from each layer's own min(in, out) = b to the
  rank, so the ratio differs per layer: the earlier milestones are ``GeometricRank(8, k, n)``
  (per layer ``round(b * (8 / b) ** (k / n))``), the last one ``FixedRank(8)``;
* ``MaxNMSE`` is refused: an NMSE bound has no uncompressed end to start from (the dense layer is
  at NMSE 0), so no equal-ratio path leads to it; write its milestones by hand.

``progressive`` returns a plain dict ``{key: value}`` for the callback's ``schedule`` (keys are
epochs, or optimizer steps with ``interval="step"``). ``Progressive`` is the same schedule as a
read-only mapping with a constructor LightningCLI can build from YAML::

    schedule:
      class_path: factorize_plugin.Progressive
      init_args:
        target: {class_path: factorize_plugin.ParamBudget, init_args: {fraction: 0.4}}
        epochs: [0, 1, 2]
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Iterable, Iterator, Mapping, Union

from .ranks.policies import FixedRank, GeometricRank, MaxNMSE, ParamBudget, RankLike, RankPolicy, as_rank_like
from .settings import check_whole

ProgressiveTarget = Union[int, float, RankPolicy]
ScheduleEntry = Union[int, float, RankPolicy]


def _keys(epochs: Iterable[int]) -> list[int]:
    """The milestone keys, sorted: distinct whole numbers >= 0, at least one."""
    if isinstance(epochs, (str, bytes, Mapping)) or not isinstance(epochs, Iterable):
        raise TypeError(f"progressive: epochs must be a list of whole numbers such as [0, 1, 2], got {epochs!r}")
    keys = [check_whole("epochs", e, 0, "milestone keys: epochs, or steps with interval='step'") for e in epochs]
    if not keys:
        raise ValueError("progressive: epochs is empty; give at least one milestone key, e.g. [0, 1, 2]")
    if len(set(keys)) != len(keys):
        raise ValueError(f"progressive: epochs {keys} name a milestone twice")
    return sorted(keys)


def _fraction_path(fraction: float, n: int) -> list[float]:
    """``fraction ** (k / n)`` for k = 1..n, the last exactly ``fraction`` (no rounding drift)."""
    return [fraction ** (k / n) for k in range(1, n)] + [fraction]


def _values(target: ProgressiveTarget, n: int) -> list[ScheduleEntry]:
    """The ``n`` schedule values on the equal-ratio path to ``target``."""
    if isinstance(target, MaxNMSE):
        raise ValueError(
            f"progressive({target!r}, ...): an NMSE bound has no uncompressed end to start from (a dense layer is "
            "at NMSE 0), so no equal-ratio path leads to it. Write its milestones by hand, e.g. "
            "{0: MaxNMSE(0.01), 2: MaxNMSE(0.03), 4: MaxNMSE(0.1)}, or give a ParamBudget / FixedRank target"
        )
    if isinstance(target, ParamBudget):
        return [dataclasses.replace(target, fraction=f) for f in _fraction_path(target.fraction, n)]
    if isinstance(target, FixedRank):
        if isinstance(target.rank, int):
            path: list[ScheduleEntry] = [GeometricRank(target.rank, k, n) for k in range(1, n)]
            return path + [FixedRank(target.rank)]
        return [FixedRank(f) for f in _fraction_path(target.rank, n)]
    if isinstance(target, RankPolicy):
        raise TypeError(
            f"progressive: no equal-ratio path is defined for {type(target).__name__}; give a ParamBudget, a "
            "FixedRank or a scalar target (or write the milestones by hand)"
        )
    value: RankLike = as_rank_like(target)  # type: ignore[assignment]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"progressive: target must be a ParamBudget, a FixedRank, an int rank or a float in (0, 1), got {target!r}"
        )
    if isinstance(value, int):
        return _values(FixedRank(value), n)  # an int is a rank whatever the callback's mode
    if not 0.0 < value < 1.0:
        raise ValueError(f"progressive: a float target is a fraction and must lie in (0, 1), got {value!r}")
    return list(_fraction_path(float(value), n))


class Progressive(Mapping[int, ScheduleEntry]):
    """The schedule reaching ``target`` in ``len(epochs)`` equal-ratio steps, one milestone at each
    key of ``epochs`` (epochs, or optimizer steps with the callback's ``interval="step"``), as a
    read-only mapping ``{key: value}`` (see the module docstring for the rule per kind of target).

    Args:
        target: what the last milestone keeps: ``ParamBudget(f)``, ``FixedRank(f)`` (a float in
            (0, 1)), ``FixedRank(r)`` (an int rank), a plain float in (0, 1) (read by the
            callback's ``mode``) or a plain int rank. ``MaxNMSE`` is refused.
        epochs: the milestone keys, distinct whole numbers >= 0 (sorted here).
    """

    def __init__(self, target: ProgressiveTarget, epochs: list[int]) -> None:
        keys = _keys(epochs)
        self.target, self.epochs = target, keys
        self._schedule: dict[int, ScheduleEntry] = dict(zip(keys, _values(target, len(keys)), strict=True))

    def __getitem__(self, key: int) -> ScheduleEntry:
        return self._schedule[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._schedule)

    def __len__(self) -> int:
        return len(self._schedule)

    def __repr__(self) -> str:
        return f"Progressive({self.target!r}, {self.epochs})"


def progressive(target: ProgressiveTarget, epochs: Iterable[int]) -> dict[int, ScheduleEntry]:
    """A plain ``{key: value}`` schedule that reaches ``target`` in ``len(epochs)`` equal-ratio
    steps, for ``LowRankFactorization(schedule=...)``.

    ``progressive(ParamBudget(0.4), [0, 1, 2])`` -> ``{0: ParamBudget(0.737), 1: ParamBudget(0.543),
    2: ParamBudget(0.4)}`` (fractions of the targeted dense weights); ``progressive(FixedRank(8),
    [0, 2, 4])`` -> ``GeometricRank(8, 1, 3)``, ``GeometricRank(8, 2, 3)``, ``FixedRank(8)`` (each
    layer from its own min(in, out)). ``MaxNMSE`` is refused (ValueError). In YAML use the class
    ``Progressive`` (``class_path: factorize_plugin.Progressive``)."""
    return dict(Progressive(target, epochs))  # type: ignore[arg-type]


__all__ = ["Progressive", "progressive"]
