"""Rank policies: given every chosen layer's exact error curve, pick the new ranks.

A policy returns, per layer, the new rank or None (leave the layer as it is). Ranks never go up:
a rank not below the layer's current rank means no change, and a rank that would not save
multiply-adds over the dense layer leaves a dense layer dense.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Union

import torch

from .core.solver import LowRankDecomposition, resolve_rank
from .layers.adapters import LayerView

RankLike = Union[int, float]


@dataclasses.dataclass
class LayerCandidate:
    """What a policy may look at for one layer.

    view: sizes and current rank; decomposition: exact solution and NMSE curve at every rank;
    positions: output positions per sample (tokens, pixels) to turn per-position costs into
    multiply-adds per sample; weight: the layer's measured effect on the network's output per
    unit of NMSE (1.0 when unmeasured); samples: rows the statistics hold; output_curve: float64
    [k + 1] or None, the measured (interpolated) relative error of the network's output at each
    rank 0..k when only this layer is changed (``budget.measure_sensitivity``); where set, the
    budget policy uses it instead of ``weight * nmse_curve``.
    """

    view: LayerView
    decomposition: LowRankDecomposition
    positions: float = 1.0
    weight: float = 1.0
    samples: int = 0
    output_curve: Optional[torch.Tensor] = None


def _admissible(view: LayerView, rank: int) -> Optional[int]:
    """``rank`` clipped to what the layer supports (min(D, M): a convolution's first factor may
    have more channels than its input), or None where it means no change."""
    rank = min(rank, view.in_dim, view.out_dim)
    if view.rank is not None and rank >= view.rank:
        return None
    if view.rank is None and rank > view.max_useful_rank:
        return None
    return rank


class RankPolicy:
    def choose(self, layers: Mapping[str, LayerCandidate]) -> dict[str, Optional[int]]:
        raise NotImplementedError


@dataclasses.dataclass
class FixedRank(RankPolicy):
    """The same rank everywhere: an int, or a float in (0, 1) as a fraction of each layer's
    min(in, out) (features, or channels for a convolution)."""

    rank: RankLike

    def __post_init__(self) -> None:
        resolve_rank(self.rank, 1 << 30, 1 << 30)  # validates

    def choose(self, layers: Mapping[str, LayerCandidate]) -> dict[str, Optional[int]]:
        out = {}
        for name, c in layers.items():
            out[name] = _admissible(c.view, resolve_rank(self.rank, c.view.rank_base, c.view.rank_base))
        return out


@dataclasses.dataclass
class MaxNMSE(RankPolicy):
    """Per layer, the smallest rank whose NMSE on the calibration statistics is <= ``max_nmse``."""

    max_nmse: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_nmse < 1.0:
            raise ValueError(f"max_nmse must lie in [0, 1), got {self.max_nmse}")

    def choose(self, layers: Mapping[str, LayerCandidate]) -> dict[str, Optional[int]]:
        return {n: _admissible(c.view, c.decomposition.smallest_rank(self.max_nmse)) for n, c in layers.items()}


def make_policy(
    rank: Optional[RankLike] = None,
    max_nmse: Optional[float] = None,
    param_budget: Optional[float] = None,
) -> RankPolicy:
    """Builds the one policy given; raises ValueError unless exactly one is given."""
    given = {k: v for k, v in dict(rank=rank, max_nmse=max_nmse, param_budget=param_budget).items() if v is not None}
    if len(given) != 1:
        raise ValueError(
            f"give exactly one rank policy out of rank=, max_nmse=, param_budget= (got {sorted(given) or 'none'})"
        )
    if rank is not None:
        return FixedRank(rank)
    if max_nmse is not None:
        return MaxNMSE(max_nmse)
    from .budget import ParamBudget  # noqa: PLC0415 (the budget policy lives in its own module)

    return ParamBudget(param_budget)
