"""Statistics collected in several passes when those of every targeted layer would not fit a budget
(``Statistics.max_bytes``, issue 23 item 3).

``plan_passes`` splits the layers, in model order, into groups whose statistics fit the budget,
from their shapes alone (every process of a DDP job computes the same plan). ``collect_in_passes``
then, per group: runs the batches with a collector over that group only, reduces it (DDP), solves
its layers and drops the statistics before the next group. What the rank policy needs afterwards
(the solutions: NMSE curves, factors) stays; the float64 moments of one group at a time are all
that is ever held, so the peak statistics memory is that of the largest group.

Each layer's rows are the same whatever group it is collected in (the collector's sampling streams
are per accumulator), so the factors are those of one pass, given the same batches every pass.

Plain PyTorch: no Lightning.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence, cast

import torch
import torch.nn as nn

from ...layers.adapters import layer_view
from ...layers.factorized import FACTORIZED_PAIRS
from ..ranks.candidates import LayerCandidate
from ..swap.refactorize import build_candidates
from ..timing.speed import LayerInput
from .collector import ActivationCollector
from .sharding import Sharding

HELD_OUT_COPIES = 3  # two held-out halves and their cached union (holdout.HeldOutHalves), at most


def statistics_bound(module: nn.Module, space: str = "auto", holdout: bool = True, factorized: bool = False) -> int:
    """Most bytes ``ActivationCollector`` holds for the statistics of ``module`` alone (what its
    ``statistics_bytes_of`` can measure): one float64 accumulator of width K (K = M where
    ``space="auto"`` projects the inputs, a layer with M < D outputs, else K = D): 8 (K^2 + K + 1);
    3 of them with held-out halves (``holdout``: the halves A, B and their union, while the layer
    has few rows); plus, when projected, the snapshot of W [D, M] in its own dtype (float64 for a
    factorized pair's product, or for every layer with ``factorized``: the bound once the layer
    is a pair, as at a later milestone). A layer sharing its input with others is counted alone
    (sharing is confirmed only while collecting): an upper bound."""
    view = layer_view(module)
    projected = space == "auto" and view.out_dim < view.in_dim
    width = view.out_dim if projected else view.in_dim
    accumulator = 8 * (width * width + width + 1)
    total = accumulator * (HELD_OUT_COPIES if holdout else 1)
    if projected:
        if factorized or isinstance(module, FACTORIZED_PAIRS):
            itemsize = 8
        else:
            itemsize = cast(torch.Tensor, module.weight).element_size()  # a Linear's, Conv1D's or Conv2d's
        total += view.in_dim * view.out_dim * itemsize
    return total


def plan_passes(
    layers: Mapping[str, nn.Module],
    budget: Optional[int],
    space: str = "auto",
    holdout: bool = True,
    factorized: bool = False,
) -> list[list[str]]:
    """The layers (by name, in the mapping's order: the model's) in consecutive groups whose
    ``statistics_bound`` sum to at most ``budget`` bytes each, as few as that order allows (a
    group is closed when the next layer would not fit); ``None``: one group of every layer.
    Consecutive layers stay together, so layers reading the same input (q/k/v) mostly share a
    pass, and their accumulator. ``factorized``: plan with every layer's bound as a pair (a
    check that no later milestone will find a layer over the budget).

    Raises:
        ValueError: a layer alone needs more than ``budget`` (names it and its bytes).
    """
    names = list(layers)
    if budget is None or not names:
        return [names] if names else []
    bounds = {n: statistics_bound(m, space, holdout, factorized) for n, m in layers.items()}
    over = {n: b for n, b in bounds.items() if b > budget}
    if over:
        name, need = max(over.items(), key=lambda kv: kv[1])
        raise ValueError(
            f"Statistics(max_bytes={budget}) is smaller than the statistics of layer '{name}' alone ({need} bytes"
            + (" once it is factorized" if factorized else "")
            + (f"; {len(over) - 1} other layer(s) too" if len(over) > 1 else "")
            + "): raise max_bytes to at least that, or exclude the layer"
        )
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        if groups[-1] and used + bounds[name] > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += bounds[name]
    return groups


@dataclasses.dataclass
class PassResults:
    """What ``collect_in_passes`` kept: every layer's solution (``candidates``), the collectors'
    ``positions`` and first ``inputs``, rows per layer (``samples``, 0: never called), and per
    pass the peak bytes of its statistics (``peak_bytes``) and those held after the reduce
    (``held_bytes``). ``sharding``: the first pass's, with every pass's owners, solved layers
    and solve time (None without one)."""

    candidates: dict[str, LayerCandidate] = dataclasses.field(default_factory=dict)
    positions: dict[str, float] = dataclasses.field(default_factory=dict)
    inputs: dict[str, LayerInput] = dataclasses.field(default_factory=dict)
    samples: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_bytes: list[int] = dataclasses.field(default_factory=list)
    held_bytes: list[int] = dataclasses.field(default_factory=list)
    sharding: Optional[Sharding] = None

    @property
    def passes(self) -> int:
        return len(self.peak_bytes)

    def _merge_sharding(self, sharding: Optional[Sharding]) -> None:
        if sharding is None:
            return
        if self.sharding is None:
            self.sharding = sharding
            return
        self.sharding.owners.update(sharding.owners)
        self.sharding.solved += sharding.solved
        self.sharding.solve_seconds += sharding.solve_seconds
        self.sharding.solve_cpu_seconds += sharding.solve_cpu_seconds


def solve_pass(
    model: nn.Module,
    collector: ActivationCollector,
    names: Sequence[str],
    targeted: Mapping[str, nn.Module],
    leave_out_silent: Callable[[list[str]], object],
    regularization: float,
    progress: Optional[Callable[[int, int, str], None]] = None,
    sharding: Optional[Sharding] = None,
) -> dict[str, LayerCandidate]:
    """One pass's solve (the ``solve`` of ``collect_in_passes``): ``leave_out_silent`` gets the
    layers the pass never saw called (it removes them from ``targeted``, the selection's layers);
    the others of ``names`` still targeted are solved from the collector's statistics as the
    modules now under their names (an earlier milestone may have swapped them for pairs), with
    its held-out halves (none under DDP) and ``sharding``."""
    leave_out_silent([n for n, k in collector.samples().items() if k == 0])
    layers = {n: model.get_submodule(n) for n in names if n in targeted}
    return build_candidates(
        layers, collector.stats, collector.positions, regularization, progress, collector.holdout.pairs(), sharding
    )


def collect_in_passes(
    groups: Sequence[Sequence[str]],
    collect: Callable[[int, list[str]], ActivationCollector],
    solve: Callable[[ActivationCollector, list[str], Optional[Sharding]], Mapping[str, LayerCandidate]],
    reduce: Optional[Callable[[ActivationCollector], Optional[Sharding]]] = None,
) -> PassResults:
    """For each group of layer names: ``collect(i, group)`` gives a detached collector that saw the
    batches (over the group's layers only), ``reduce`` sums it over the processes (DDP; returns
    the ``Sharding`` with its owners, or None), ``solve(collector, group, sharding)`` returns the
    group's candidates; then the collector (its statistics) is dropped before the next pass."""
    out = PassResults()
    for i, group in enumerate(groups):
        collector = collect(i, list(group))
        sharding = reduce(collector) if reduce is not None else None
        out.held_bytes.append(collector.statistics_bytes_of(collector.layers))
        out.samples.update(collector.samples())
        out.candidates.update(solve(collector, list(group), sharding))
        out.peak_bytes.append(collector.statistics_bytes)  # after the solve read them (held-out unions)
        out.positions.update(collector.positions)
        for name, x in collector.inputs.items():
            out.inputs.setdefault(name, x)
        out._merge_sharding(sharding)
        del collector  # this pass's statistics go before the next pass collects
    return out


__all__ = ["PassResults", "collect_in_passes", "plan_passes", "solve_pass", "statistics_bound"]
