"""Projected statistics (z = x @ W) keep W in the weight's own dtype (issue 23: the float64 copy and
the cached float32 one were half of LLaMA-7B's statistics): the factors are bit-identical to a
float64 projection, the stored W is a snapshot (not the live parameter), and statistics_bytes counts
the one copy in W's dtype."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from factorize_plugin.core.solver import decompose
from factorize_plugin.core.statistics import MomentAccumulator
from factorize_plugin.layers import weight_matrix
from factorize_plugin.surgery.statistics.collector import ActivationCollector

D, M, N = 48, 12, 300


def _same_decomposition(a, b, ranks) -> None:
    assert torch.equal(a.nmse_curve, b.nmse_curve)
    for r in ranks:
        for fa, fb in zip(a.factors(r), b.factors(r)):
            assert (fa is None and fb is None) or torch.equal(fa, fb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulator_projection_in_own_dtype_gives_identical_factors(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, M, generator=g).to(dtype)
    b = torch.randn(M, generator=g, dtype=torch.float64)
    z = (torch.randn(N, D, generator=g) + 0.5) @ w.float()
    own = MomentAccumulator(M, projection=w).update(z)
    f64 = MomentAccumulator(M, projection=w.double()).update(z)
    assert own.projection.dtype == dtype and f64.projection.dtype == torch.float64
    assert own.projection.data_ptr() != w.data_ptr()  # a snapshot, not a view
    _same_decomposition(decompose(own, w.double(), b), decompose(f64, w.double(), b), range(1, M + 1))
    _same_decomposition(
        decompose(own, w.double(), b, regularization=0.1), decompose(f64, w.double(), b, regularization=0.1), (3, 7)
    )


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_collector_keeps_one_snapshot_of_w_in_its_dtype(dtype: torch.dtype, autocast: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(D, M).to(dtype)
    x = (torch.randn(N, D) + 0.5).to(dtype)
    col = ActivationCollector({"lin": lin}, max_samples=None, space="auto", holdout=False)
    with col, torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        lin(x)
    stats = col.stats["lin"]
    assert stats.projection.dtype == dtype
    assert stats.projection.untyped_storage().data_ptr() != lin.weight.untyped_storage().data_ptr()
    assert torch.equal(stats.projection, lin.weight.detach().T)
    # one copy of W in its own dtype: no float64 copy, no cached float32 one (was 12 bytes per element)
    assert col.statistics_bytes == stats.nbytes() + D * M * lin.weight.element_size()
    assert not col._projection_copies

    w, b = weight_matrix(lin)
    as_f64 = copy.deepcopy(stats)
    as_f64.projection = stats.projection.double()  # what was stored before: the float64 copy
    _same_decomposition(decompose(stats, w, b), decompose(as_f64, w, b), range(1, M + 1))

    with torch.no_grad():
        lin.weight.add_(1.0)  # e.g. an optimizer step after the collection
    assert torch.equal(stats.projection, w.T.to(dtype).T)  # the snapshot did not follow
    w, b = weight_matrix(lin)
    with pytest.raises(ValueError, match="weights changed"):
        decompose(stats, w, b)


def test_heldout_halves_share_the_snapshot() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(D, M).to(torch.bfloat16)
    col = ActivationCollector({"lin": lin}, max_samples=None, space="auto")
    with col, torch.no_grad():
        lin(torch.randn(N, D).to(torch.bfloat16))
    snapshot = col._stats["lin"].projection
    halves = col.holdout.halves["lin"]
    assert all(h.projection is snapshot for h in halves)
    assert col.stats["lin"].projection is snapshot  # the union too
    assert col.statistics_bytes == col.holdout.nbytes("lin") + D * M * 2
