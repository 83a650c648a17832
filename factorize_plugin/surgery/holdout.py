"""An honest error estimate for small calibration sets: two disjoint halves of a layer's rows.

A fit evaluated on the rows it was fitted to is optimistic when the rows are few for the layer's
input width (8 rows on a 64-wide layer: fitted NMSE 0.000, 0.60 on new rows). While a layer has
at most ``LIMIT_FACTOR`` x (its statistics' width) rows, ``HeldOutHalves`` also streams its rows,
alternately, into two more accumulators A and B; ``heldout_curve`` fits on A and measures on B.
That estimate is honest but pessimistic (a fit on half the rows); past the limit the halves are
dropped (memory and time are spent only on small sets, where the optimism matters: with n rows
and width D it shrinks like D / n). The fit itself always uses all rows. Plain PyTorch.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..core.solver import decompose
from ..core.statistics import MomentAccumulator

Halves = tuple[MomentAccumulator, MomentAccumulator]


def _like(stats: MomentAccumulator) -> MomentAccumulator:
    return MomentAccumulator(stats.in_features, projection=stats.projection)


class HeldOutHalves:
    """Per layer, rows 0, 2, 4, ... (A) and 1, 3, 5, ... (B) of its first rows, beside ``stats``."""

    LIMIT_FACTOR = 64

    def __init__(self, stats: Mapping[str, MomentAccumulator], enabled: bool = True) -> None:
        self.stats = stats
        self.halves: dict[str, Halves] = {n: (_like(s), _like(s)) for n, s in stats.items()} if enabled else {}
        self._parity = dict.fromkeys(self.halves, 0)

    def update(self, name: str, rows: torch.Tensor) -> None:
        """Called with the rows just added to ``stats[name]`` ([n, width])."""
        halves = self.halves.get(name)
        if halves is None:
            return
        stats = self.stats[name]
        if stats.num_samples > self.LIMIT_FACTOR * stats.in_features:
            del self.halves[name]  # enough rows: the fitted NMSE is close to honest
            return
        p = self._parity[name]
        for half, part in zip(halves, (rows[p::2], rows[1 - p :: 2])):
            if part.shape[0]:
                half.update(part)
        self._parity[name] = (p + rows.shape[0]) % 2

    def pairs(self) -> dict[str, Halves]:
        """The layers that still have both halves (a small set), by name."""
        return {n: h for n, h in self.halves.items() if h[0].num_samples and h[1].num_samples}


def heldout_curve(
    halves: Optional[Halves], weight: torch.Tensor, bias: Optional[torch.Tensor], regularization: float = 0.0
) -> Optional[torch.Tensor]:
    """NMSE at ranks 0..k on half B of a fit on half A (float64 [k + 1]), or None without halves."""
    if halves is None:
        return None
    a, b = halves
    return decompose(a, weight, bias, regularization).nmse_on(b)
