"""The global budget policy and the measurements that make it judge by the network's output.

``ParamBudget(fraction)`` keeps ``fraction`` of the targeted layers' weights (or multiply-adds) in
total and spends them where they lower the *network's* error most: it minimizes

    sum_l  E_l(r_l)    subject to    sum_l cost_l(r_l) <= fraction * sum_l cost_l(now)

where E_l(r) is the layer's effect on the model's output at rank r. Without measurements E_l is
``weight_l * nmse_l(r)``, each layer's exact NMSE curve (one SVD gives every rank) times
``LayerCandidate.weight``; with them it is ``LayerCandidate.output_curve``.

Why measure: per-layer NMSEs are not comparable across layers, nor proportional to what they do
to the output. On the pretrained MNIST CNN the relative output error caused by one layer grows
like its NMSE to a power well above 1 (small errors are damped by the ReLUs and poolings that
follow, large ones are not), by a factor that differs between layers by more than 10x; on a
transformer, allocations minimizing or equalizing unweighted NMSEs lost to a plain uniform rank.
So ``measure_sensitivity`` swaps, one layer at a time, its exact approximation at a few probe
ranks (geometric from 1 to the largest allowed) into the model, measures the relative squared
error of the final output on calibration batches, and interpolates those points into a curve
over every rank, using the exact NMSE curve as the abscissa (piecewise linear in log-log).
The allocation assumes the layers' effects add up; ``plan_budget`` then checks the allocation
against the uniform one (every layer keeping the same share of its weights) on the whole model's
output and keeps the better, so the budget policy is never worse than uniform on the calibration
data.

The allocation itself (``allocate``) is a greedy on error decrease per unit of cost along each
layer's lower convex hull, with a heap: optimal for convex curves, which exact NMSE curves are.

Everything here is plain PyTorch (no Lightning).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import heapq
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .layers.adapters import LayerView, install_factors
from .policies import LayerCandidate, RankPolicy, _admissible

METRICS = ("params", "macs")


# ----------------------------------------------------------------------------- costs and curves
def _max_rank(c: LayerCandidate) -> int:
    """The largest rank the policy may give the layer (0: it can only stay as it is)."""
    v = c.view
    top = min(v.in_dim, v.out_dim, c.decomposition.max_rank)
    if v.rank is not None:
        return min(top, v.rank - 1)
    return min(top, v.max_useful_rank)


def _cost(view: LayerView, rank: Optional[int], positions: float, metric: str) -> float:
    """Weights (or multiply-adds per sample) of the layer at ``rank`` (None: as it is now)."""
    p = view.params(view.rank if rank is None else rank)
    return float(p) * (positions if metric == "macs" else 1.0)


def _curve_points(
    c: LayerCandidate, metric: str, weight: float
) -> tuple[list[float], list[float], list[Optional[int]]]:
    """(costs, weighted errors, ranks) of every option of one layer, cheapest first: ranks
    1..max, then 'unchanged' (rank None, the current layer's own error, 0 for a dense layer)."""
    if c.output_curve is not None:
        curve, weight = c.output_curve.detach().cpu().double(), 1.0
    else:
        curve = c.decomposition.nmse_curve.detach().cpu().double()
    top = _max_rank(c)
    values = curve.tolist()
    ranks: list[Optional[int]] = list(range(1, top + 1))
    costs = [_cost(c.view, r, c.positions, metric) for r in range(1, top + 1)]
    errs = [weight * values[r] for r in range(1, top + 1)]
    now_err = 0.0 if c.view.rank is None else weight * values[min(c.view.rank, len(values) - 1)]
    ranks.append(None)
    costs.append(_cost(c.view, None, c.positions, metric))
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
            # b lies on or above the segment a -> i: drop it.
            cross = (costs[b] - costs[a]) * (errs[i] - errs[a]) - (errs[b] - errs[a]) * (costs[i] - costs[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(
    candidates: Mapping[str, LayerCandidate],
    budget: float,
    metric: str = "params",
    weights: Optional[Mapping[str, float]] = None,
) -> dict[str, Optional[int]]:
    """Ranks (None: unchanged) minimizing sum_l E_l(r_l) with total cost <= ``budget``, where E_l is
    the layer's ``output_curve`` if measured, else ``weight_l * nmse_l`` (``weights`` overrides the
    candidates' ``weight``).

    Every layer starts at rank 1 (the floor, even if that alone exceeds the budget), then a heap
    takes the steps of best error decrease per unit cost along each layer's lower convex hull
    (optimal for convex curves, which exact NMSE curves are); leftover budget is then filled one
    rank at a time. Deterministic: ties go to the layer listed first.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    names = list(candidates)
    points = {}
    for n in names:
        c = candidates[n]
        w = float(c.weight if weights is None else weights.get(n, c.weight))
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"layer '{n}': its sensitivity weight must be finite and >= 0, got {w}")
        points[n] = _curve_points(c, metric, w)
    pos = {n: 0 for n in names}  # index into the layer's options (0: rank 1, or 'unchanged')
    spent = sum(points[n][0][0] for n in names)
    hulls = {n: _lower_hull(points[n][0], points[n][1]) for n in names}
    hull_at = {n: 0 for n in names}

    def push(heap: list, i: int, n: str) -> None:
        h = hulls[n]
        k = hull_at[n]
        if k + 1 < len(h):
            costs, errs, _ = points[n]
            a, b = h[k], h[k + 1]
            dc = costs[b] - costs[a]
            gain = errs[a] - errs[b]
            ratio = gain / dc if dc > 0 else math.inf
            heapq.heappush(heap, (-ratio, i, n))

    heap: list = []
    for i, n in enumerate(names):
        push(heap, i, n)
    while heap:
        _, i, n = heapq.heappop(heap)
        costs = points[n][0]
        a, b = hulls[n][hull_at[n]], hulls[n][hull_at[n] + 1]
        step = costs[b] - costs[a]
        if spent + step > budget * (1 + 1e-12):
            continue  # this layer's next hull step does not fit; the fill below may still use it
        spent += step
        hull_at[n] += 1
        pos[n] = b
        push(heap, i, n)

    # Fill: single rank steps (inside hull segments that did not fit), best gain per cost first.
    heap = []

    def push_single(i: int, n: str) -> None:
        costs, errs, _ = points[n]
        k = pos[n]
        if k + 1 < len(costs):
            dc = costs[k + 1] - costs[k]
            gain = errs[k] - errs[k + 1]
            if gain > 0:
                heapq.heappush(heap, (-(gain / dc if dc > 0 else math.inf), i, n))

    for i, n in enumerate(names):
        push_single(i, n)
    while heap:
        _, i, n = heapq.heappop(heap)
        costs = points[n][0]
        k = pos[n]
        step = costs[k + 1] - costs[k]
        if spent + step > budget * (1 + 1e-12):
            continue
        spent += step
        pos[n] = k + 1
        push_single(i, n)

    out: dict[str, Optional[int]] = {}
    for n in names:
        rank = points[n][2][pos[n]]
        out[n] = None if rank is None else _admissible(candidates[n].view, rank)
    return out


def total_cost(
    candidates: Mapping[str, LayerCandidate], ranks: Mapping[str, Optional[int]], metric: str = "params"
) -> float:
    """Total weights (or multiply-adds per sample) of the layers at ``ranks`` (None: unchanged)."""
    return sum(_cost(c.view, ranks.get(n), c.positions, metric) for n, c in candidates.items())


def current_cost(candidates: Mapping[str, LayerCandidate], metric: str = "params") -> float:
    return sum(_cost(c.view, None, c.positions, metric) for c in candidates.values())


def _check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(
            "param_budget (the fraction of the targeted layers' parameters to keep) must lie in (0, 1], "
            f"got {fraction!r}"
        )
    return float(fraction)


@dataclasses.dataclass
class ParamBudget(RankPolicy):
    """Keep ``fraction`` in (0, 1] of the targeted layers' weights (``metric="params"``) or
    multiply-adds per sample (``metric="macs"``, using ``LayerCandidate.positions``) in total,
    allocating ranks to minimize sum_l weight_l * nmse_l(r_l).

    The error of a layer is its ``LayerCandidate.output_curve`` where measured
    (``measure_sensitivity``; ``factorize_model`` and ``plan_budget`` do it), else
    ``LayerCandidate.weight * nmse_curve`` (weight 1.0 unless set: plain NMSEs). Ranks
    only go down, a dense layer only becomes a pair where that saves multiply-adds, and every
    changed layer keeps rank >= 1. The budget counts the targeted layers as they are now (a
    progressive call keeps ``fraction`` of the current, already-factorized sizes). If rank 1
    everywhere already exceeds the budget, every layer gets rank 1 (the smallest possible).
    """

    fraction: float
    metric: str = "params"

    def __post_init__(self) -> None:
        self.fraction = _check_fraction(self.fraction)
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")

    def budget(self, layers: Mapping[str, LayerCandidate]) -> float:
        return self.fraction * current_cost(layers, self.metric)

    def choose(self, layers: Mapping[str, LayerCandidate]) -> dict[str, Optional[int]]:
        if not layers:
            return {}
        return allocate(layers, self.budget(layers), self.metric)


# ----------------------------------------------------------------------------- uniform baseline
def uniform_ranks(
    candidates: Mapping[str, LayerCandidate], fraction: float, metric: str = "params"
) -> dict[str, Optional[int]]:
    """The uniform allocation: every layer keeps the same share ``fraction`` of its own weights
    (rank = round(fraction * current params / (D + M)), at least 1; the same rank for layers of the
    same shape), ``None`` where that saves nothing. The baseline the budget policy is measured
    against, and where ``measure_sensitivity`` probes. ``metric`` is accepted for symmetry: per
    layer, a share of weights is the same share of multiply-adds."""
    _check_fraction(fraction)
    out: dict[str, Optional[int]] = {}
    for n, c in candidates.items():
        v = c.view
        r = max(1, int(round(fraction * v.current_params / (v.in_dim + v.out_dim))))
        out[n] = _admissible(v, min(r, c.decomposition.max_rank))
    return out


def _search_fraction(candidates: Mapping[str, LayerCandidate], target: float, metric: str) -> dict[str, Optional[int]]:
    """Uniform ranks whose total cost is the largest not above ``target`` (bisection on the share)."""
    lo, hi = 1e-6, 1.0
    best = uniform_ranks(candidates, lo, metric)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        ranks = uniform_ranks(candidates, mid, metric)
        if total_cost(candidates, ranks, metric) <= target:
            lo, best = mid, ranks
        else:
            hi = mid
    return best


def uniform_ranks_for_budget(
    candidates: Mapping[str, LayerCandidate], fraction: float, metric: str = "params"
) -> dict[str, Optional[int]]:
    """Uniform ranks (see ``uniform_ranks``) spending as much of ``fraction`` of the current total
    cost as possible without exceeding it (ignoring layers that cannot shrink)."""
    _check_fraction(fraction)
    return _search_fraction(candidates, fraction * current_cost(candidates, metric), metric)


# ----------------------------------------------------------------------------- running the model
def call_model(model: nn.Module, batch: Any) -> Any:
    """The calling convention of ``factorize_model``: a tuple/list batch is ``model(*batch)``, a
    dict ``model(**batch)``, anything else ``model(batch)``."""
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor to judge a model's output by: the output itself, ``.logits`` / ``["logits"]``,
    else the first tensor of a tuple, list or dict (recursively)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        items: Iterable = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        items = ()
    for item in items:
        with contextlib.suppress(TypeError):
            return output_tensor(item)
    raise TypeError(
        f"cannot find a tensor in the model's output ({type(out).__name__}); "
        "pass output_fn= to say which tensor to judge"
    )


class _OutputError:
    """Streams sum ||y_hat - y||^2 and sum ||y - mean y||^2 (per-feature means over samples) and
    the per-sample cosine between y_hat and y, in float64."""

    def __init__(self) -> None:
        self.err = 0.0
        self.s = None
        self.ss = 0.0
        self.n = 0
        self.cos_sum = 0.0

    def add(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        ref = ref.detach().double().reshape(-1, ref.shape[-1] if ref.ndim else 1)
        out = out.detach().double().reshape(ref.shape)
        self.err += float((out - ref).square().sum())
        s = ref.sum(0)
        self.s = s if self.s is None else self.s + s
        self.ss += float(ref.square().sum())
        self.n += ref.shape[0]
        self.cos_sum += float(torch.nn.functional.cosine_similarity(out, ref, dim=-1, eps=1e-12).sum())

    @property
    def relative(self) -> float:
        if self.n == 0:
            return float("nan")
        denom = self.ss - float(self.s.square().sum()) / self.n
        return self.err / denom if denom > 0 else (0.0 if self.err == 0 else math.inf)

    @property
    def cosine(self) -> float:
        return self.cos_sum / self.n if self.n else float("nan")


@dataclasses.dataclass
class OutputError:
    """How far a model's output moved from the reference: ``relative`` = sum (y_hat - y)^2 /
    sum (y - mean y)^2 over the output tensor's last dimension, ``cosine`` = mean per-sample cosine."""

    relative: float
    cosine: float


@contextlib.contextmanager
def _replaced_outputs(layers: Mapping[str, nn.Module], substitutes: Mapping[str, nn.Module]):
    """Within the block, each layer named in ``substitutes`` returns its substitute's output."""
    handles = []
    try:
        for name, sub in substitutes.items():
            handles.append(layers[name].register_forward_hook(lambda m, args, out, sub=sub: sub(*args)))
        yield
    finally:
        for h in handles:
            h.remove()


def _substitute(module: nn.Module, candidate: LayerCandidate, rank: int) -> nn.Module:
    """A throwaway module computing ``module``'s rank-``rank`` approximation (``module`` untouched)."""
    wa, wb, bias = candidate.decomposition.factors(rank)
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return install_factors(module, wa, wb, bias)
    clone = copy.deepcopy(module)
    return install_factors(clone, wa, wb, bias)


def _batches(batches: Iterable, max_batches: Optional[int]):
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        yield b


@torch.no_grad()
def measure_output_errors(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    candidates: Mapping[str, LayerCandidate],
    allocations: Mapping[str, Mapping[str, Optional[int]]],
    batches: Iterable,
    *,
    forward: Callable[[nn.Module, Any], Any] = call_model,
    output_fn: Callable[[Any], torch.Tensor] = output_tensor,
    max_batches: Optional[int] = None,
) -> dict[str, OutputError]:
    """Output error, against the model as it is, of the model with each allocation applied
    ({label: {layer: rank or None}}), on ``batches``. One reference pass per batch plus one per
    allocation; the model is not modified."""
    subs = {
        label: {n: _substitute(layers[n], candidates[n], r) for n, r in ranks.items() if r is not None}
        for label, ranks in allocations.items()
    }
    accs = {label: _OutputError() for label in allocations}
    for batch in _batches(batches, max_batches):
        ref = output_fn(forward(model, batch))
        for label, sub in subs.items():
            with _replaced_outputs(layers, sub):
                accs[label].add(ref, output_fn(forward(model, batch)))
    if allocations and next(iter(accs.values())).n == 0:
        raise ValueError("no calibration batches to measure the output error on")
    return {label: OutputError(a.relative, a.cosine) for label, a in accs.items()}


def probe_ranks(candidates: Mapping[str, LayerCandidate], n_probes: int = 8) -> dict[str, list[int]]:
    """Where ``measure_sensitivity`` probes each layer: about ``n_probes`` ranks spaced
    geometrically from 1 to the largest rank the layer may take (empty for a layer that cannot
    shrink)."""
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    out: dict[str, list[int]] = {}
    for n, c in candidates.items():
        top = _max_rank(c)
        if top < 1:
            out[n] = []
            continue
        if n_probes == 1 or top == 1:
            out[n] = [max(1, top // 2)]
            continue
        grid = {max(1, min(top, int(round(top ** (i / (n_probes - 1)))))) for i in range(n_probes)}
        out[n] = sorted(grid)
    return out


def interpolate_output_curve(nmse_curve: torch.Tensor, measured: Mapping[int, float]) -> torch.Tensor:
    """A layer's output-error curve at every rank 0..k from a few measured ranks: piecewise linear
    in log(output error) against log(NMSE) between measured ranks (the effect of a layer's error on
    the output is far from proportional to its NMSE: small errors are damped by what follows,
    large ones are not), proportional to the NMSE beyond them, 0 where the NMSE is 0, and never
    increasing with the rank."""
    curve = nmse_curve.detach().cpu().double()
    tiny = 1e-300
    pts = sorted((float(curve[r]), max(float(e), 0.0)) for r, e in measured.items() if float(curve[r]) > 0)
    out = torch.zeros_like(curve)
    if not pts:
        return out
    px = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    py = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    pos = curve > 0
    x = curve[pos]
    val = py[0] * x / px[0]  # below the smallest measured NMSE (and with a single point): proportional
    if len(pts) > 1:
        lx, ly = px.log(), py.clamp_min(tiny).log()
        lxr = x.log()
        j = torch.searchsorted(lx, lxr).clamp(1, len(pts) - 1)
        t = (lxr - lx[j - 1]) / (lx[j] - lx[j - 1]).clamp_min(tiny)
        inside = torch.exp(ly[j - 1] + t * (ly[j] - ly[j - 1]))
        val = torch.where(lxr <= lx[0], val, torch.where(lxr >= lx[-1], py[-1] * x / px[-1], inside))
    out[pos] = val
    # Non-increasing with the rank.
    return torch.flip(torch.cummax(torch.flip(out, [0]), 0).values, [0])


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    candidates: Mapping[str, LayerCandidate],
    batches: Iterable,
    *,
    probes: Optional[Mapping[str, Sequence[int]]] = None,
    n_probes: int = 8,
    forward: Callable[[nn.Module, Any], Any] = call_model,
    output_fn: Callable[[Any], torch.Tensor] = output_tensor,
    max_batches: Optional[int] = None,
    set_curves: bool = True,
) -> dict[str, dict[int, float]]:
    """Each layer's measured effect on the model's final output.

    For every layer alone and every probe rank (default ``probe_ranks(candidates, n_probes)``), the
    layer's output is replaced by its exact rank-r approximation and the relative squared error of
    the model's output (``output_fn``, default the logits) against the unmodified model is measured
    on ``batches``. Costs (number of layers + sum of probes) forward passes per batch; the model is
    not modified, and only one layer's probe factors are held at a time.

    Returns {layer: {rank: relative output error}}. With ``set_curves``, each candidate gets
    ``output_curve`` (``interpolate_output_curve``), which ``ParamBudget`` then minimizes in sum,
    and ``weight`` = output error per unit of NMSE at its middle probe (for reports).
    """
    probes = {n: list(r) for n, r in (probe_ranks(candidates, n_probes) if probes is None else probes).items()}
    result: dict[str, dict[int, float]] = {n: {} for n in candidates}
    for n, ranks in probes.items():
        if not ranks:
            continue
        # One layer at a time, so that only its probes' factors are held at once.
        subs = {r: _substitute(layers[n], candidates[n], r) for r in ranks}
        accs = {r: _OutputError() for r in ranks}
        for batch in _batches(batches, max_batches):
            ref = output_fn(forward(model, batch))
            for r, sub in subs.items():
                with _replaced_outputs(layers, {n: sub}):
                    accs[r].add(ref, output_fn(forward(model, batch)))
        for r, acc in accs.items():
            if acc.n == 0:
                raise ValueError("no calibration batches to measure the sensitivity on")
            rel = acc.relative
            result[n][r] = rel if math.isfinite(rel) else float("inf")
    if set_curves:
        for n, measured in result.items():
            if not measured:
                continue
            c = candidates[n]
            if not all(math.isfinite(v) for v in measured.values()):
                raise ValueError(f"layer '{n}': the model's output is not finite when this layer is approximated")
            c.output_curve = interpolate_output_curve(c.decomposition.nmse_curve, measured)
            mid = sorted(measured)[len(measured) // 2]
            nmse = float(c.decomposition.nmse_curve[mid])
            c.weight = measured[mid] / nmse if nmse > 0 else 0.0
    return result


@dataclasses.dataclass
class BudgetPlan:
    """What ``plan_budget`` chose: ``ranks`` per layer (None: unchanged), which allocation won
    (``"budget"`` or ``"uniform"``), and each allocation's measured output error on the batches
    (empty when not verified)."""

    ranks: dict[str, Optional[int]]
    chosen: str
    errors: dict[str, OutputError]
    allocations: dict[str, dict[str, Optional[int]]]


def plan_budget(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    candidates: Mapping[str, LayerCandidate],
    batches: Iterable,
    policy: ParamBudget,
    *,
    measure: bool = True,
    verify: bool = True,
    n_probes: int = 8,
    forward: Callable[[nn.Module, Any], Any] = call_model,
    output_fn: Callable[[Any], torch.Tensor] = output_tensor,
    max_batches: Optional[int] = None,
) -> BudgetPlan:
    """The budget allocation judged on the network's output.

    1. ``measure``: each layer's output-error curve (``measure_sensitivity``), which the policy
       then minimizes in sum (otherwise the candidates' ``weight * nmse`` as they are).
    2. ``verify``: the allocation and the uniform one at no more cost
       (``uniform_ranks_for_budget``) are both measured on ``batches`` (the model's whole output,
       all layers changed at once) and the one with the smaller relative output error is kept, so
       the result is never worse than uniform on the calibration data.

    ``batches`` is iterated once per step (it must be re-iterable: a list or a DataLoader).
    """
    if measure:
        measure_sensitivity(
            model, layers, candidates, batches, n_probes=n_probes, forward=forward, output_fn=output_fn,
            max_batches=max_batches,
        )  # fmt: skip
    ranks = policy.choose(candidates)
    allocations = {"budget": dict(ranks)}
    if not verify:
        return BudgetPlan(dict(ranks), "budget", {}, allocations)
    allocations["uniform"] = uniform_ranks_for_budget(candidates, policy.fraction, policy.metric)
    errors = measure_output_errors(
        model, layers, candidates, allocations, batches, forward=forward, output_fn=output_fn, max_batches=max_batches
    )
    chosen = "uniform" if errors["uniform"].relative < errors["budget"].relative else "budget"
    return BudgetPlan(dict(allocations[chosen]), chosen, errors, allocations)
