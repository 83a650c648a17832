"""Measuring what a layer's approximation does to the *network's* output.

Per-layer NMSEs are not comparable across layers, nor proportional to what they do to the output:
on the pretrained MNIST CNN (``benchmarks/bench_pretrained_mnist.py``) the relative output error
caused by one layer grows like its NMSE to a power well above 1 (small errors are damped by the
ReLUs and poolings that follow, large ones are not), by a factor that differs between layers by
more than 10x. So ``measure_sensitivity`` swaps, one layer at a time, its exact approximation at
a few probe ranks (geometric from 1 to the largest allowed) into the model, measures the relative
squared error of the final output on a few batches, and interpolates those points into a curve
over every rank (piecewise linear in log-log against the exact NMSE curve). ``plan_budget`` then
allocates by those curves (``allocation.allocate``, which assumes the layers' effects add up) and
checks the result against the uniform allocation on the whole model's output, keeping the better.

Everything here runs the model without changing it (forward hooks substitute a layer's output)
and is plain PyTorch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, cast

import torch
import torch.nn as nn

from ...layers.adapters import new_pair
from ..calling import InputFn, call_model, output_tensor
from ..fastpath import fastpath_off
from .allocation import uniform_ranks_for_budget
from .candidates import LayerCandidate, max_rank


@dataclasses.dataclass
class OutputProbe:
    """How to run the model to judge its output: ``model`` with its targeted ``layers`` (by name),
    the ``batches`` to run (re-iterable; at most ``max_batches`` of them), how a batch becomes the
    model's input (``input_fn``, see ``calling``), the tensor the output is judged by
    (``output_fn``), and a context every forward runs in (e.g. Lightning's precision context)."""

    model: nn.Module
    layers: Mapping[str, nn.Module]
    batches: Iterable
    input_fn: Optional[InputFn] = None
    output_fn: Callable[[Any], torch.Tensor] = output_tensor
    max_batches: Optional[int] = None
    context: Callable[[], Any] = contextlib.nullcontext

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield b

    def output(self, batch: Any) -> torch.Tensor:
        with self.context():
            return self.output_fn(call_model(self.model, batch, self.input_fn))


class OutputErrorSum:
    """Streams sum ||y_hat - y||^2 and sum ||y - mean y||^2 (per-feature means over all rows of the
    output's last dimension) and the per-row cosine between y_hat and y, in float64."""

    def __init__(self) -> None:
        self.err = 0.0
        self.s: Optional[torch.Tensor] = None
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
        denom = self.ss - float(cast(torch.Tensor, self.s).square().sum()) / self.n  # n > 0: update set s
        return self.err / denom if denom > 0 else (0.0 if self.err == 0 else math.inf)

    @property
    def cosine(self) -> float:
        return self.cos_sum / self.n if self.n else float("nan")


@dataclasses.dataclass
class OutputError:
    """How far a model's output moved from the reference: ``relative`` = sum (y_hat - y)^2 /
    sum (y - mean y)^2 over the output tensor's last dimension, ``cosine`` = mean per-row cosine."""

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
    """A throwaway plain module computing ``module``'s rank-``rank`` approximation (``module``
    untouched; an FSDP2 unit's substitute is not sharded: the probe needs no gradients)."""
    return new_pair(module, *candidate.decomposition.factors(rank))


def _measure(probe: OutputProbe, variants: Mapping[Any, Mapping[str, nn.Module]]) -> dict[Any, OutputErrorSum]:
    """For each variant ({layer: substitute}), the output error against the unmodified model (both
    run with torch's transformer fast path off: a hooked layer cannot take it, see ``fastpath``)."""
    sums = {key: OutputErrorSum() for key in variants}
    with fastpath_off():
        for batch in probe:
            ref = probe.output(batch)
            for key, subs in variants.items():
                with _replaced_outputs(probe.layers, subs):
                    sums[key].add(ref, probe.output(batch))
    if variants and next(iter(sums.values())).n == 0:
        raise ValueError("no batches to measure the model's output on")
    return sums


@torch.no_grad()
def measure_output_errors(
    probe: OutputProbe,
    candidates: Mapping[str, LayerCandidate],
    allocations: Mapping[str, Mapping[str, Optional[int]]],
) -> dict[str, OutputError]:
    """Output error, against the model as it is, of the model with each allocation applied
    ({label: {layer: rank or None}}). One reference pass per batch plus one per allocation."""
    variants = {
        label: {n: _substitute(probe.layers[n], candidates[n], r) for n, r in ranks.items() if r is not None}
        for label, ranks in allocations.items()
    }
    return {label: OutputError(s.relative, s.cosine) for label, s in _measure(probe, variants).items()}


def probe_ranks(candidates: Mapping[str, LayerCandidate], n_probes: int = 8) -> dict[str, list[int]]:
    """Where ``measure_sensitivity`` probes each layer: about ``n_probes`` ranks spaced
    geometrically from 1 to the largest rank the layer may take (empty for a layer that cannot shrink)."""
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    out: dict[str, list[int]] = {}
    for n, c in candidates.items():
        top = max_rank(c)
        if top < 1:
            out[n] = []
        elif n_probes == 1 or top == 1:
            out[n] = [max(1, top // 2)]
        else:
            out[n] = sorted({max(1, min(top, int(round(top ** (i / (n_probes - 1)))))) for i in range(n_probes)})
    return out


def interpolate_output_curve(nmse_curve: torch.Tensor, measured: Mapping[int, float]) -> torch.Tensor:
    """A layer's output-error curve at every rank 0..k from a few measured ranks: piecewise linear
    in log(output error) against log(NMSE) between measured ranks, proportional to the NMSE beyond
    them, 0 where the NMSE is 0, and never increasing with the rank."""
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
    return torch.flip(torch.cummax(torch.flip(out, [0]), 0).values, [0])


@torch.no_grad()
def measure_sensitivity(
    probe: OutputProbe,
    candidates: Mapping[str, LayerCandidate],
    *,
    probes: Optional[Mapping[str, Sequence[int]]] = None,
    n_probes: int = 8,
    set_curves: bool = True,
) -> dict[str, dict[int, float]]:
    """Each layer's measured effect on the model's final output.

    For every layer alone and every probe rank (default ``probe_ranks(candidates, n_probes)``), the
    layer's output is replaced by its exact rank-r approximation and the relative squared error of
    the model's output against the unmodified model is measured on the probe's batches. Costs
    (number of layers + sum of probes) forward passes per batch; only one layer's probe factors are
    held at a time.

    Returns {layer: {rank: relative output error}}. With ``set_curves`` each candidate gets
    ``output_curve`` (``interpolate_output_curve``) and ``weight`` = output error per unit of NMSE
    at its middle probe (for reports).
    """
    ranks_of = probes if probes is not None else probe_ranks(candidates, n_probes)
    result: dict[str, dict[int, float]] = {n: {} for n in candidates}
    for n, ranks in ranks_of.items():
        if not ranks:
            continue
        variants = {r: {n: _substitute(probe.layers[n], candidates[n], r)} for r in ranks}
        for r, s in _measure(probe, variants).items():
            result[n][r] = s.relative if math.isfinite(s.relative) else float("inf")
    if set_curves:
        for n, measured in result.items():
            if not measured:
                continue
            if not all(math.isfinite(v) for v in measured.values()):
                raise ValueError(f"layer '{n}': the model's output is not finite when this layer is approximated")
            c = candidates[n]
            c.output_curve = interpolate_output_curve(c.decomposition.nmse_curve, measured)
            mid = sorted(measured)[len(measured) // 2]
            nmse = float(c.decomposition.nmse_curve[mid])
            c.weight = measured[mid] / nmse if nmse > 0 else 0.0
    return result


@dataclasses.dataclass
class BudgetPlan:
    """What ``plan_budget`` chose: ``ranks`` per layer (None: unchanged), which allocation won
    (``"budget"`` or ``"uniform"``), each allocation, and their measured output errors (empty
    when not verified)."""

    ranks: dict[str, Optional[int]]
    chosen: str
    errors: dict[str, OutputError]
    allocations: dict[str, dict[str, Optional[int]]]


def plan_budget(
    probe: OutputProbe,
    candidates: Mapping[str, LayerCandidate],
    choose: Callable[[Mapping[str, LayerCandidate]], dict[str, Optional[int]]],
    fraction: float,
    metric: str = "params",
    *,
    measure: bool = True,
    verify: bool = True,
    n_probes: int = 8,
) -> BudgetPlan:
    """A budget allocation judged on the network's output.

    1. ``measure``: each layer's output-error curve (``measure_sensitivity``), which ``choose``
       (the budget allocation) then minimizes in sum.
    2. ``verify``: that allocation and the uniform one at no more cost (``fraction`` of the dense
       cost) are both measured on the whole model's output, all layers changed at once; the one with
       the smaller relative output error is kept, so the result is never worse than uniform on the
       probe's batches.
    """
    if measure:
        measure_sensitivity(probe, candidates, n_probes=n_probes)
    ranks = choose(candidates)
    allocations = {"budget": dict(ranks)}
    if not verify:
        return BudgetPlan(dict(ranks), "budget", {}, allocations)
    allocations["uniform"] = uniform_ranks_for_budget(candidates, fraction, metric)
    errors = measure_output_errors(probe, candidates, allocations)
    chosen = "uniform" if errors["uniform"].relative < errors["budget"].relative else "budget"
    return BudgetPlan(dict(allocations[chosen]), chosen, errors, allocations)
