"""What a rank policy looks at for one layer, and what a rank costs."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping, Optional, Union

import torch

from ...core.solver import LowRankDecomposition
from ...layers.adapters import LayerView

if TYPE_CHECKING:
    from ..statistics.sharding import SharedSolution

COST_METRICS = ("params", "macs")


@dataclasses.dataclass
class LayerCandidate:
    """One layer ready to be re-factorized.

    view: sizes and current rank; decomposition: the exact solution and NMSE curve at every rank;
    positions: output positions per sample (tokens, pixels), to turn per-position costs into
    multiply-adds per sample; weight: the layer's measured effect on the network's output per unit
    of NMSE (1.0 when unmeasured); samples: rows the statistics hold; output_curve: float64
    [k + 1] or None, the measured (interpolated) relative error of the network's output at each
    rank 0..k when only this layer is changed (``sensitivity.measure_sensitivity``); where set,
    the budget policy minimizes it instead of ``weight * nmse_curve``; rank_cap: the largest rank
    the speed guard allows (None: no limit, 0: none), which ``max_rank`` respects.
    """

    view: LayerView
    decomposition: Union[LowRankDecomposition, SharedSolution]  # SharedSolution: solved by another process
    positions: float = 1.0
    weight: float = 1.0
    samples: int = 0
    output_curve: Optional[torch.Tensor] = None
    heldout_curve: Optional[torch.Tensor] = None  # NMSE on held-out rows at ranks 0..k (small sets)
    rank_cap: Optional[int] = None


def admissible(view: LayerView, rank: int, cap: Optional[int] = None) -> Optional[int]:
    """``rank`` clipped to what the layer supports (min(D, M): a convolution's first factor may
    have more channels than its input) and to ``cap`` (a speed guard's limit: 0 allows none), or
    None where it means no change: not below a pair's current rank, or a pair that would not
    save multiply-adds over the dense layer."""
    if cap is not None:
        if cap < 1:
            return None
        rank = min(rank, cap)
    rank = min(rank, view.in_dim, view.out_dim)
    if view.rank is not None and rank >= view.rank:
        return None
    if view.rank is None and rank > view.max_useful_rank:
        return None
    return rank


def max_rank(c: LayerCandidate) -> int:
    """The largest rank a policy may give the layer (0: it can only stay as it is)."""
    v = c.view
    top = min(v.in_dim, v.out_dim, c.decomposition.max_rank)
    if c.rank_cap is not None:
        top = min(top, max(0, c.rank_cap))
    if v.rank is not None:
        return min(top, v.rank - 1)
    return min(top, v.max_useful_rank)


def cost(view: LayerView, rank: Optional[int], positions: float, metric: str) -> float:
    """Weights (or multiply-adds per sample) of the layer at ``rank`` (None: as it is now)."""
    p = view.params(view.rank if rank is None else rank)
    return float(p) * (positions if metric == "macs" else 1.0)


def total_cost(
    candidates: Mapping[str, LayerCandidate], ranks: Mapping[str, Optional[int]], metric: str = "params"
) -> float:
    """Total weights (or multiply-adds per sample) of the layers at ``ranks`` (None: unchanged)."""
    return sum(cost(c.view, ranks.get(n), c.positions, metric) for n, c in candidates.items())


def current_cost(candidates: Mapping[str, LayerCandidate], metric: str = "params") -> float:
    """Total cost of the layers as they are now."""
    return sum(cost(c.view, None, c.positions, metric) for c in candidates.values())


def dense_cost(candidates: Mapping[str, LayerCandidate], metric: str = "params") -> float:
    """Total cost of the layers' original dense versions (what a budget fraction is a fraction of)."""
    return sum(c.view.params(None) * (c.positions if metric == "macs" else 1.0) for c in candidates.values())
