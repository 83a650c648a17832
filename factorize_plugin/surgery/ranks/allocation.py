"""Spending a cost budget across layers: the rank allocation behind ``ParamBudget``.

``allocate`` minimizes sum_l E_l(r_l) subject to sum_l cost_l(r_l) <= budget, where E_l is the
layer's measured output-error curve if it has one (``LayerCandidate.output_curve``), else
``weight_l * nmse_l(r)``, its exact NMSE curve (one SVD gives every rank). A greedy on error
decrease per unit of cost along each layer's lower convex hull, with a heap: optimal for convex
curves, which exact NMSE curves are; a second phase fills what is left one rank at a time.
``uniform_ranks_for_budget`` is the baseline it is checked against.
"""

from __future__ import annotations

import heapq
import math
from typing import Mapping, Optional, cast

from .candidates import COST_METRICS, LayerCandidate, admissible, cost, dense_cost, max_rank, total_cost

Points = tuple[list[float], list[float], list[Optional[int]]]


def _curve_points(c: LayerCandidate, metric: str, weight: float) -> Points:
    """(costs, weighted errors, ranks) of every option of one layer, cheapest first: ranks
    1..max, then 'unchanged' (rank None, the current layer's own error, 0 for a dense layer)."""
    if c.output_curve is not None:
        curve, weight = c.output_curve.detach().cpu().double(), 1.0
    else:
        curve = c.decomposition.nmse_curve.detach().cpu().double()
    top = max_rank(c)
    values = curve.tolist()
    ranks: list[Optional[int]] = list(range(1, top + 1))
    costs = [cost(c.view, r, c.positions, metric) for r in range(1, top + 1)]
    errs = [weight * values[r] for r in range(1, top + 1)]
    now_err = 0.0 if c.view.rank is None else weight * values[min(c.view.rank, len(values) - 1)]
    ranks.append(None)
    costs.append(cost(c.view, None, c.positions, metric))
    errs.append(now_err)
    # Errors never go up with more weights kept (clip round-off), so the greedy below is sound.
    for i in range(len(errs) - 2, -1, -1):
        errs[i] = max(errs[i], errs[i + 1])
    return costs, errs, ranks


def _lower_hull(costs: list[float], errs: list[float]) -> list[int]:
    """Indices of the lower convex hull of the points (costs increasing): the steps a greedy by
    error-per-cost takes, each with a smaller ratio than the one before."""
    hull: list[int] = []
    for i in range(len(costs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (costs[b] - costs[a]) * (errs[i] - errs[a]) - (errs[b] - errs[a]) * (costs[i] - costs[a])
            if cross <= 0:  # b lies on or above the segment a -> i
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _greedy(
    points: Mapping[str, Points], pos: dict[str, int], steps: Mapping[str, list[int]], spent: float, budget: float,
    gain_only: bool,
) -> float:
    """Moves each layer along its own list of option indices ``steps`` (from where ``pos`` says),
    taking the step of best error decrease per unit of cost first while it fits in the budget
    (``gain_only``: only steps that lower the error). Updates ``pos`` in place and returns the cost
    spent. Ties go to the layer listed first."""
    at = {n: steps[n].index(pos[n]) if pos[n] in steps[n] else None for n in points}
    heap: list = []

    def push(i: int, n: str) -> None:
        k = at[n]
        if k is None or k + 1 >= len(steps[n]):
            return
        costs, errs, _ = points[n]
        a, b = steps[n][k], steps[n][k + 1]
        dc, gain = costs[b] - costs[a], errs[a] - errs[b]
        if gain > 0 or not gain_only:
            heapq.heappush(heap, (-(gain / dc if dc > 0 else math.inf), i, n))

    for i, n in enumerate(points):
        push(i, n)
    while heap:
        _, i, n = heapq.heappop(heap)
        costs = points[n][0]
        k = cast(int, at[n])  # push queues only a layer with a next step
        a, b = steps[n][k], steps[n][k + 1]
        if spent + costs[b] - costs[a] > budget * (1 + 1e-12):
            continue  # this layer's next step does not fit; a later phase may still use part of it
        spent += costs[b] - costs[a]
        at[n] = k + 1
        pos[n] = b
        push(i, n)
    return spent


def allocate(
    candidates: Mapping[str, LayerCandidate],
    budget: float,
    metric: str = "params",
    weights: Optional[Mapping[str, float]] = None,
) -> dict[str, Optional[int]]:
    """Ranks (None: unchanged) minimizing sum_l E_l(r_l) with total cost <= ``budget`` (``weights``
    overrides the candidates' ``weight``).

    Every layer starts at rank 1 (the floor, even if that alone exceeds the budget); phase 1 takes
    the steps along each layer's lower convex hull, best error decrease per unit cost first
    (optimal for convex curves); phase 2 fills leftover budget one rank at a time. Deterministic.
    """
    if metric not in COST_METRICS:
        raise ValueError(f"metric must be one of {COST_METRICS}, got {metric!r}")
    points = {}
    for n, c in candidates.items():
        w = float(c.weight if weights is None else weights.get(n, c.weight))
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"layer '{n}': its sensitivity weight must be finite and >= 0, got {w}")
        points[n] = _curve_points(c, metric, w)
    pos = {n: 0 for n in points}
    spent = sum(p[0][0] for p in points.values())
    hulls = {n: _lower_hull(p[0], p[1]) for n, p in points.items()}
    spent = _greedy(points, pos, hulls, spent, budget, gain_only=False)
    singles = {n: list(range(len(p[0]))) for n, p in points.items()}
    _greedy(points, pos, singles, spent, budget, gain_only=True)
    out: dict[str, Optional[int]] = {}
    for n, p in points.items():
        rank = p[2][pos[n]]
        out[n] = None if rank is None else admissible(candidates[n].view, rank)
    return out


def uniform_ranks(candidates: Mapping[str, LayerCandidate], share: float) -> dict[str, Optional[int]]:
    """Every layer at the same share of its own dense weights (rank = round(share * D * M / (D + M)),
    at least 1; the same rank for layers of the same shape); None where that changes nothing."""
    out: dict[str, Optional[int]] = {}
    for n, c in candidates.items():
        v = c.view
        r = max(1, int(round(share * v.params(None) / (v.in_dim + v.out_dim))))
        out[n] = admissible(v, min(r, c.decomposition.max_rank), c.rank_cap)
    return out


def uniform_ranks_for_budget(
    candidates: Mapping[str, LayerCandidate], fraction: float, metric: str = "params"
) -> dict[str, Optional[int]]:
    """Uniform ranks (``uniform_ranks``) spending as much of ``fraction`` of the layers' dense cost
    as possible without exceeding it (bisection on the share)."""
    target = fraction * dense_cost(candidates, metric)
    lo, hi = 1e-6, 1.0
    best = uniform_ranks(candidates, lo)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        ranks = uniform_ranks(candidates, mid)
        if total_cost(candidates, ranks, metric) <= target:
            lo, best = mid, ranks
        else:
            hi = mid
    return best
