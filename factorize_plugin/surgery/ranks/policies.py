"""Rank policies: given every chosen layer's exact error curve, pick the new ranks.

A policy returns, per layer, the new rank or None (leave the layer as it is). Ranks never go up:
a rank not below the layer's current rank means no change, and a rank that would not save
multiply-adds over the dense layer leaves a dense layer dense. Policies are plain dataclasses,
so they can be passed from Python and written in YAML (``class_path`` / ``init_args``).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Mapping, Optional, Union, cast

import torch

from ...core.solver import resolve_rank
from ...layers.adapters import LayerView
from ..settings import check_choice, check_flag, check_max_nmse, check_param_budget, check_whole
from .allocation import allocate
from .candidates import COST_METRICS, LayerCandidate, admissible, current_cost, dense_cost
from .sensitivity import BudgetPlan, OutputProbe, plan_budget

RankLike = Union[int, float]


class RankPolicy:
    """Base class: ``choose`` maps each layer's candidate to its new rank (None: unchanged).
    ``probe``, where given, lets a policy judge choices on the network's output."""

    def choose(
        self, layers: Mapping[str, LayerCandidate], probe: Optional[OutputProbe] = None
    ) -> dict[str, Optional[int]]:
        raise NotImplementedError

    @property
    def uses_probe(self) -> bool:
        """Whether ``choose`` makes use of a probe (callers skip building one otherwise)."""
        return False

    @property
    def uses_rank_caps(self) -> bool:
        """Whether ``choose`` respects ``LayerCandidate.rank_cap`` (a speed guard then measures the
        caps before choosing, so that a budget is spent only on ranks the guard allows)."""
        return False

    def order_key(self) -> tuple[str, float]:
        """(kind, value) where, within one kind, a larger value compresses at least as much: a
        schedule's milestones of one kind must not decrease."""
        raise NotImplementedError

    def planned_rank(self, view: LayerView) -> Optional[int]:
        """The rank this policy would give a dense layer of ``view``'s shape, where the shape alone
        tells (None where it takes the statistics: an NMSE bound). ``schedule="auto"`` reads it
        before any statistics exist."""
        return None


def as_rank_like(value: object) -> object:
    """A NumPy integer or 0-d integer tensor as a Python ``int``, a NumPy float or 0-d floating
    tensor as a ``float`` (so that ranks compare, print and checkpoint as plain numbers); anything
    else unchanged (``resolve_rank`` refuses what is not a rank)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.dtype == torch.bool or value.is_complex():
            return value
        return float(value) if value.is_floating_point() else int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


@dataclasses.dataclass
class FixedRank(RankPolicy):
    """The same rank everywhere: an int, or a float in (0, 1) as a fraction of each layer's
    min(in, out) (features, or channels for a convolution). This is the model-level meaning of a
    fraction; the core API's ``factorize_matrix`` follows the reference implementation's instead."""

    rank: RankLike

    def __post_init__(self) -> None:
        # numpy.int64(16), torch.tensor(16): the int 16; resolve_rank refuses what is not a rank
        self.rank = cast(RankLike, as_rank_like(self.rank))
        resolve_rank(self.rank, 1 << 30, 1 << 30)  # validates

    def choose(self, layers, probe=None):
        return {n: admissible(c.view, self.planned_rank(c.view)) for n, c in layers.items()}

    def planned_rank(self, view: LayerView) -> int:
        return resolve_rank(self.rank, view.rank_base, view.rank_base)

    def order_key(self) -> tuple[str, float]:
        return ("int rank" if isinstance(self.rank, int) else "fractional rank", -float(self.rank))


@dataclasses.dataclass
class GeometricRank(RankPolicy):
    """Step ``step`` of ``steps`` on each layer's own equal-ratio path from its min(in, out) = b
    down to the int ``rank``: ``round(b * (rank / b) ** (step / steps))``, never below ``rank``
    (a layer with b <= ``rank`` keeps b: no change). ``progressive(FixedRank(8), ...)`` builds
    these: the earlier milestones of an int target, whose starting point differs per layer."""

    rank: int
    step: int
    steps: int

    def __post_init__(self) -> None:
        rank = as_rank_like(self.rank)
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise ValueError(f"GeometricRank.rank must be an int >= 1 (the final rank), got {rank!r}")
        self.rank = rank
        resolve_rank(self.rank, 1 << 30, 1 << 30)  # validates: >= 1
        self.steps = check_whole("steps", self.steps, 1, "milestones on the path")
        self.step = check_whole("step", self.step, 1, f"which of the {self.steps} milestones")
        if self.step > self.steps:
            raise ValueError(f"GeometricRank: step={self.step} is past steps={self.steps}")

    def choose(self, layers, probe=None):
        return {n: admissible(c.view, self.planned_rank(c.view)) for n, c in layers.items()}

    def planned_rank(self, view: LayerView) -> int:
        base = view.rank_base
        final = min(self.rank, base)
        return max(final, min(base, round(base * (final / base) ** (self.step / self.steps))))

    def order_key(self) -> tuple[str, float]:
        return (f"geometric rank to {self.rank} in {self.steps} steps", self.step / self.steps)


@dataclasses.dataclass
class MaxNMSE(RankPolicy):
    """Per layer, the smallest rank whose NMSE on the collected statistics is <= ``max_nmse``."""

    max_nmse: float

    def __post_init__(self) -> None:
        self.max_nmse = check_max_nmse(self.max_nmse)

    def choose(self, layers, probe=None):
        return {n: admissible(c.view, c.decomposition.smallest_rank(self.max_nmse)) for n, c in layers.items()}

    def order_key(self) -> tuple[str, float]:
        return ("max_nmse", float(self.max_nmse))


@dataclasses.dataclass
class ParamBudget(RankPolicy):
    """Keep ``fraction`` in (0, 1] of the targeted layers' *original dense* weights
    (``metric="params"``) or multiply-adds per sample (``metric="macs"``) in total, also when some
    layers are already factorized, spending them where they lower the network's error most.

    Without a probe (or with ``sensitivity=False``) it minimizes sum_l weight_l * nmse_l(r_l), each
    layer's exact NMSE curve. With a probe it first measures each layer's effect on the network's
    output at ``n_probes`` ranks (``sensitivity.measure_sensitivity``: about ``n_probes`` extra
    forward passes per layer and batch) and minimizes those curves; ``compare_uniform`` then also
    measures the uniform allocation at no more cost and keeps whichever moves the output less (two
    more passes). Ranks only go down and every changed layer keeps rank >= 1; if the layers are
    already within the budget nothing changes. ``last_plan`` holds the latest measured plan.
    """

    fraction: float
    metric: str = "params"
    sensitivity: bool = True
    n_probes: int = 8
    compare_uniform: bool = True

    def __post_init__(self) -> None:
        self.fraction = check_param_budget(self.fraction)
        self.metric = check_choice("metric", self.metric, COST_METRICS)
        self.sensitivity = check_flag("sensitivity", self.sensitivity)
        self.n_probes = check_whole("n_probes", self.n_probes, 1, "output measurements per layer")
        self.compare_uniform = check_flag("compare_uniform", self.compare_uniform)
        self.last_plan: Optional[BudgetPlan] = None

    @property
    def uses_probe(self) -> bool:
        return self.sensitivity

    @property
    def uses_rank_caps(self) -> bool:
        return True

    def budget(self, layers: Mapping[str, LayerCandidate]) -> float:
        return self.fraction * dense_cost(layers, self.metric)

    def planned_rank(self, view: LayerView) -> int:
        """The uniform share: the rank whose pair costs ``fraction`` of the dense layer (weights and
        multiply-adds alike: r (D + M) against D M at every position)."""
        d, m = view.in_dim, view.out_dim
        return max(1, min(view.rank_base, round(self.fraction * d * m / (d + m))))

    def allocate(self, layers: Mapping[str, LayerCandidate]) -> dict[str, Optional[int]]:
        """The allocation by the candidates' curves as they are (no measurement)."""
        return allocate(layers, self.budget(layers), self.metric)

    def choose(self, layers, probe=None):
        self.last_plan = None
        if not layers or self.budget(layers) >= current_cost(layers, self.metric) * (1 - 1e-12):
            return {n: None for n in layers}
        if probe is None or not self.sensitivity:
            return self.allocate(layers)
        self.last_plan = plan_budget(
            probe,
            layers,
            self.allocate,
            self.fraction,
            self.metric,
            verify=self.compare_uniform,
            n_probes=self.n_probes,
        )
        return dict(self.last_plan.ranks)

    def order_key(self) -> tuple[str, float]:
        return (f"param_budget ({self.metric})", -self.fraction)


POLICY_ARGS = ("rank", "max_nmse", "param_budget")


def make_policy(
    rank: Optional[RankLike] = None,
    max_nmse: Optional[float] = None,
    param_budget: Optional[float] = None,
    policy: Optional[RankPolicy] = None,
) -> RankPolicy:
    """The one policy given, as an object or by a scalar shortcut (``rank=`` -> ``FixedRank``,
    ``max_nmse=`` -> ``MaxNMSE``, ``param_budget=`` -> ``ParamBudget``); ValueError unless exactly
    one is given."""
    given = {
        k: v
        for k, v in dict(rank=rank, max_nmse=max_nmse, param_budget=param_budget, policy=policy).items()
        if v is not None
    }
    if len(given) != 1:
        raise ValueError(
            "give exactly one rank policy out of policy=, rank=, max_nmse=, param_budget= "
            f"(got {sorted(given) or 'none'})"
        )
    if policy is not None:
        if not isinstance(policy, RankPolicy):
            raise TypeError(
                f"policy must be a RankPolicy (FixedRank, MaxNMSE, ParamBudget), got {type(policy).__name__}"
            )
        return policy
    if rank is not None:
        return FixedRank(rank)
    if max_nmse is not None:
        return MaxNMSE(max_nmse)
    return ParamBudget(cast(float, param_budget))  # the one given
