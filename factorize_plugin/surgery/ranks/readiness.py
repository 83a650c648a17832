"""The readiness signal of ``schedule="auto"``: each layer's stable rank, how much it moved, and how it
compares with the rank the target plans for the layer.

Plain PyTorch (no Lightning): reads only the layers' weights, never activations, so watching costs
a few matrix-vector products per layer (``core.stable_rank``), not a pass over data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Optional

import torch
import torch.nn as nn

from ...core.stable_rank import stable_rank
from ...layers import weight_matrix
from ...layers.adapters import layer_view
from ..settings import check_whole, is_real, refuse


@dataclasses.dataclass
class Readiness:
    """When ``schedule="auto"`` switches to low rank (every field has a default that works).

    Args:
        tolerance: in (0, 1). A layer is *settled* at a validation run when its stable rank
            ``||W||_F^2 / ||W||_2^2`` moved by at most this fraction since the previous validation
            run, ``|s(t) - s(t-1)| / s(t-1) <= tolerance`` (or is within ``room``); the model is
            settled when every targeted layer is.
        patience: how many settled validation runs in a row make the model ready (>= 1).
        latest: in (0, 1], or None. Switch at the latest at epoch ``ceil(latest * max_epochs)``
            (at most the last epoch), settled or not (the speed-up is the point, and a late switch
            earns little of it); None: never without the signal (no switch if it never settles).
            ``max_epochs`` is the run's length in epochs: ``max_steps`` counts where it ends the
            run first. The switch is decided at the first validation run at or after the end of the
            epoch before; where ``check_val_every_n_epoch`` leaves none whose next epoch still
            trains, at the last one that can still apply it (``integration/auto_schedule.py``).
        iterations: power-iteration steps per layer and validation run for ``||W||_2``, in
            [1, ``MAX_ITERATIONS``] (1000: the estimate has long converged by then, and each step
            costs a matrix-vector product per layer at every validation run).
        room: in (0, 1], or None. A layer whose stable rank is at most ``room`` times the rank the
            target will give it (``RankPolicy.planned_rank``) counts as settled however much it
            moved: its weight's energy lies in far fewer directions than it will keep, so its drift
            does not bind the kept rank. Such a model can be ready at the first validation run.
            None: every layer must settle. A target whose ranks take the statistics (``MaxNMSE``)
            plans no rank: its layers must settle.
    """

    MAX_ITERATIONS: ClassVar[int] = 1000

    tolerance: float = 0.1
    patience: int = 1
    latest: Optional[float] = 0.75
    iterations: int = 20
    room: Optional[float] = 0.25

    def __post_init__(self) -> None:
        t = self.tolerance
        if not (is_real(t) and 0.0 < float(t) < 1.0):  # NaN fails too
            raise refuse(
                "Readiness.tolerance", t, "a number in (0, 1)",
                "the largest relative change of a layer's stable rank between validation runs that counts as settled",
            )  # fmt: skip
        self.tolerance = float(t)
        self.patience = check_whole("Readiness.patience", self.patience, 1, "settled validation runs in a row")
        self.latest = _optional_share(
            "Readiness.latest", self.latest,
            "the share of max_epochs after which the switch happens even if the signal has not settled",
        )  # fmt: skip
        self.iterations = _iterations(self.iterations, self.MAX_ITERATIONS)
        self.room = _optional_share(
            "Readiness.room", self.room, "the share of its planned rank under which a layer counts as settled"
        )

    def latest_epoch(self, max_epochs: Optional[int]) -> Optional[int]:
        """The epoch from which the model runs at low rank at the latest (None: no such bound), for
        a run of ``max_epochs`` epochs (the run's length, whichever Trainer limit sets it; None or
        negative: not known). Where the validation runs fall is the caller's (``switch_plan``)."""
        if self.latest is None or max_epochs is None or max_epochs < 0:
            return None
        return max(1, min(math.ceil(self.latest * max_epochs - 1e-9), max_epochs - 1))


def _optional_share(name: str, value: Any, meaning: str) -> Optional[float]:
    """None, or a number in (0, 1] as a float."""
    if value is None:
        return None
    if not (is_real(value) and 0.0 < float(value) <= 1.0):
        raise refuse(name, value, "None or a number in (0, 1]", meaning)
    return float(value)


def _iterations(value: Any, maximum: int) -> int:
    """A whole number in [1, ``maximum``] (an int, a NumPy int or a whole float) as an int."""
    rule = f"a whole number in [1, {maximum}]"
    meaning = "power-iteration steps per layer and validation run; the estimate converges in far fewer"
    try:
        steps = check_whole("Readiness.iterations", value, 1)
    except ValueError:
        raise refuse("Readiness.iterations", value, rule, meaning) from None
    if steps > maximum:
        raise refuse("Readiness.iterations", value, rule, meaning)
    return steps


def stable_ranks(layers: Mapping[str, nn.Module], iterations: int) -> dict[str, float]:
    """Each layer's stable rank (its matrix view W [D, M]; a factorized pair's composed map), in
    the order of ``layers``."""
    with torch.no_grad():
        return {name: stable_rank(weight_matrix(m, own_dtype=True)[0], iterations) for name, m in layers.items()}


def largest_change(now: Mapping[str, float], before: Optional[Mapping[str, float]]) -> Optional[float]:
    """``max_l |now_l - before_l| / before_l`` over the layers both hold (None without ``before``;
    inf where a layer's previous value was 0 and it moved)."""
    if not before:
        return None
    changes = [_relative_change(value, before[name]) for name, value in now.items() if name in before]
    return max(changes) if changes else None


def _relative_change(value: float, prev: float) -> float:
    """``|value - prev| / prev`` (inf where ``prev`` is 0 and the value moved)."""
    return abs(value - prev) / prev if prev > 0 else (0.0 if value == prev else math.inf)


def layer_states(
    now: Mapping[str, float],
    before: Optional[Mapping[str, float]],
    kept: Mapping[str, Optional[int]],
    readiness: Readiness,
) -> dict[str, str]:
    """Per layer: ``"within_room"`` (stable rank <= ``room`` x its planned rank ``kept``),
    ``"settled"`` (moved by at most ``tolerance`` since ``before``) or ``"moving"``."""
    states = {}
    for name, value in now.items():
        rank, prev = kept.get(name), (before or {}).get(name)
        if readiness.room is not None and rank is not None and value <= readiness.room * rank:
            states[name] = "within_room"
        elif prev is not None and _relative_change(value, prev) <= readiness.tolerance:
            states[name] = "settled"
        else:
            states[name] = "moving"
    return states


def planned_ranks(layers: Mapping[str, nn.Module], target: Any) -> dict[str, Optional[int]]:
    """The rank ``target`` (a ``RankPolicy``) plans for each layer from its shape (None: unknown)."""
    return {name: target.planned_rank(layer_view(m)) for name, m in layers.items()}


def readiness_spec(readiness: Readiness) -> dict[str, Any]:
    """The settings as plain data (for the history and the checkpoint)."""
    return dataclasses.asdict(readiness)


__all__ = ["Readiness", "largest_change", "layer_states", "planned_ranks", "readiness_spec", "stable_ranks"]
