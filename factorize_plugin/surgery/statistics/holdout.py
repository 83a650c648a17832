"""An honest error estimate for small calibration sets: two disjoint halves of a layer's rows.

A fit evaluated on the rows it was fitted to is optimistic when the rows are few for the layer's
input width (8 rows on a 64-wide layer: fitted NMSE 0.000, 0.60 on new rows). While a layer has
at most ``LIMIT_FACTOR`` x (its statistics' width) rows, ``HeldOutHalves`` streams its rows,
alternately, into two accumulators A and B *instead of* the layer's own: the layer's statistics are
then the union of A and B (``union``, a merge of O(width^2)), so the halves cost no second pass over
the rows. ``heldout_curve`` fits on A and measures on B: honest but pessimistic (a fit on half the
rows). Past the limit the halves are merged into the layer's accumulator and dropped (with n rows
and width D the optimism shrinks like D / n). The fit itself always uses all rows. Plain PyTorch.
"""

from __future__ import annotations

import copy
from typing import Mapping, Optional

import torch

from ...core.solver import LowRankDecomposition, decompose
from ...core.statistics import MomentAccumulator

Halves = tuple[MomentAccumulator, MomentAccumulator]


def _like(stats: MomentAccumulator) -> MomentAccumulator:
    like = MomentAccumulator(stats.in_features)
    like.projection = stats.projection  # the same snapshot of W (never changed in place), not another copy
    return like


class HeldOutHalves:
    """Per layer, rows 0, 2, 4, ... (A) and 1, 3, 5, ... (B) of its first rows, in place of ``stats``.

    ``stats`` (name -> accumulator) receives the rows only after ``update`` returns False; while a
    layer has halves its accumulator stays empty and ``union(name)`` holds all of its rows.
    ``streams`` (layer -> key of ``stats``, kept up to date by the caller; default: every key its
    own layer) lets layers that share one accumulator share its halves: ``pairs`` is by layer.
    """

    LIMIT_FACTOR = 64

    def __init__(self, stats: Mapping[str, MomentAccumulator], enabled: bool = True,
                 streams: Optional[Mapping[str, str]] = None) -> None:
        self.stats = stats
        self.streams = streams
        self.halves: dict[str, Halves] = {n: (_like(s), _like(s)) for n, s in stats.items()} if enabled else {}
        self._parity = dict.fromkeys(self.halves, 0)
        self._unions: dict[str, tuple[int, MomentAccumulator]] = {}

    def rows(self, name: str) -> int:
        """Rows held in the halves of layer ``name`` (0 once they are merged)."""
        halves = self.halves.get(name)
        return 0 if halves is None else halves[0].num_samples + halves[1].num_samples

    def update(self, name: str, rows: torch.Tensor) -> bool:
        """Takes ``rows`` ([n, width]) of layer ``name`` into its halves; False when the layer has
        none (any more), and the caller adds them to ``stats[name]`` itself."""
        halves = self.halves.get(name)
        if halves is None:
            return False
        p = self._parity[name]
        for half, part in zip(halves, (rows[p::2], rows[1 - p :: 2]), strict=True):
            if part.shape[0]:
                half.update(part)
        self._parity[name] = (p + rows.shape[0]) % 2
        if self.rows(name) > self.LIMIT_FACTOR * self.stats[name].in_features:
            # enough rows: the fitted NMSE is close to honest; the layer's own accumulator takes over
            self.stats[name].merge_(halves[0]).merge_(halves[1])
            del self.halves[name]
            self._unions.pop(name, None)
        return True

    def union(self, name: str) -> Optional[MomentAccumulator]:
        """A ∪ B for a layer that still has halves (None otherwise); rebuilt only when rows arrived."""
        halves = self.halves.get(name)
        if halves is None:
            return None
        rows = self.rows(name)
        cached = self._unions.get(name)
        if cached is None or cached[0] != rows:
            union = _like(self.stats[name]).merge_(halves[0]).merge_(halves[1])
            self._unions[name] = cached = (rows, union)
        return cached[1]

    def pairs(self) -> dict[str, Halves]:
        """The layers that still have both halves (a small set), by name (layer name where
        ``streams`` maps layers to shared keys)."""
        keys = self.streams if self.streams is not None else {n: n for n in self.halves}
        return {
            n: self.halves[k]
            for n, k in keys.items()
            if k in self.halves and all(h.num_samples for h in self.halves[k])
        }

    def copy(self, src: str, dst: str) -> None:
        """Gives key ``dst`` an exact copy of ``src``'s halves and parity (none if ``src`` has none),
        e.g. when layers that shared ``src`` go their own ways."""
        self._unions.pop(dst, None)
        if src in self.halves:
            self.halves[dst] = copy.deepcopy(self.halves[src])
            self._parity[dst] = self._parity[src]
        else:
            self.halves.pop(dst, None)
            self._parity.pop(dst, None)

    def nbytes(self, key: str) -> int:
        """Bytes of the allocated float64 halves of ``key`` and of their cached union."""
        union = self._unions.get(key)
        held = [*self.halves.get(key, ()), *(() if union is None else (union[1],))]
        return sum(h.nbytes() for h in held if h.allocated)


def heldout_curve(
    halves: Optional[Halves],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    regularization: float = 0.0,
    solved: Optional[LowRankDecomposition] = None,
) -> Optional[torch.Tensor]:
    """NMSE at ranks 0..k on half B of a fit on half A (float64 [k + 1]), or None without halves.
    ``solved``: the layer's decomposition on all its rows, whose weight-only work the fit on A
    reuses (``LowRankDecomposition.refit``; it then gives the weight, bias and settings)."""
    if halves is None:
        return None
    a, b = halves
    fit = decompose(a, weight, bias, regularization, fit_bias=bias is not None) if solved is None else solved.refit(a)
    return fit.nmse_on(b)
