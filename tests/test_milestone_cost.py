"""The faster solve (issue 20, item 2) gives the original solver's optimum: at the GPU GPT's layer
shapes the NMSE curves agree to 1e-6 relative at the ranks a schedule uses; where the data reach
fewer directions than the layer has inputs (a LayerNorm's output) and where W W^T is singular (a
pair's product) the curve is the installed factors' measured error and the exact optimum; the
held-out refit equals a fresh fit on the half; and the benchmark that times both runs (--dry-run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from factorize_plugin.core.solver import _triangular_matmul, decompose
from factorize_plugin.core.statistics import MomentAccumulator
from factorize_plugin.surgery.statistics.holdout import heldout_curve
from helpers import correlated_inputs, measured_nmse, optimal_nmse_reference

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_milestone_cost.py"
sys.path.insert(0, str(BENCH.parent.parent))
from benchmarks.bench_milestone_cost import PreviousFit  # noqa: E402


def _stats(d: int, w: torch.Tensor, projected: bool, rows: int = 6144) -> MomentAccumulator:
    g = torch.Generator().manual_seed(d)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)  # a decaying spectrum, as activations have
    x = torch.randn(rows, d, generator=g) @ mix + 0.3
    if projected:
        return MomentAccumulator(w.shape[1], projection=w).update(x @ w)
    return MomentAccumulator(d).update(x)


@pytest.mark.slow
@pytest.mark.parametrize("d, m, bias", [(1024, 3072, True), (1024, 1024, False), (1024, 4096, False), (4096, 1024, True)])
def test_gpt_shapes_reach_the_previous_optimum(d: int, m: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m)
    w = torch.randn(d, m, generator=g) / d**0.5
    b = torch.randn(m, generator=g) if bias else None
    stats = _stats(d, w, projected=m < d)  # what the collector keeps ("auto" space)
    current = decompose(stats, w, b, fit_bias=bias)
    previous = PreviousFit(stats, w, b)
    k = min(d, m)
    for rank in (k // 8, k // 4, k // 2):
        assert current.nmse_curve[rank].item() == pytest.approx(previous.nmse_curve[rank].item(), rel=1e-6)
        wa, wb, _ = current.factors(rank)
        wp, vp, _ = previous.factors(rank)
        assert float((wa @ wb - wp @ vp).norm() / (wp @ vp).norm()) < 1e-6  # the same factors


def _layernorm_like(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows that sum to zero (a LayerNorm's output before its affine map), from fewer sources than
    features: their covariance is singular, so it has no Cholesky factor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d // 2, generator=g, dtype=torch.float64) @ torch.randn(d // 2, d, generator=g, dtype=torch.float64)
    return x - x.mean(1, keepdim=True) + 0.5


def _check_exact(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], ranks: range) -> None:
    dec = decompose(MomentAccumulator(x.shape[1]).update(x), w, b, fit_bias=b is not None)
    previous = PreviousFit(MomentAccumulator(x.shape[1]).update(x), w, b)
    y = x @ w + (0.0 if b is None else b)
    for rank in ranks:
        wa, wb, bias = dec.factors(rank)
        measured = measured_nmse(y, x @ wa @ wb + (0.0 if bias is None else bias))
        assert dec.nmse_curve[rank].item() == pytest.approx(measured, rel=1e-7, abs=1e-12)
        assert dec.nmse_curve[rank].item() == pytest.approx(previous.nmse_curve[rank].item(), rel=1e-7, abs=1e-12)
        if b is not None:
            assert measured == pytest.approx(optimal_nmse_reference(x, y, rank), rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_more_outputs_than_inputs_with_a_singular_covariance(bias: bool) -> None:
    d, m = 24, 64
    x = _layernorm_like(500, d, seed=1)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(d, m, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64) if bias else None
    assert int(torch.linalg.cholesky_ex(MomentAccumulator(d).update(x).cxx)[1]) != 0  # C itself has no Cholesky
    dec = decompose(MomentAccumulator(d).update(x), w, b, fit_bias=bias)
    assert dec._kind == "input"  # from the Cholesky factor of W W^T
    _check_exact(x, w, b, range(1, d + 1))


def test_rank_deficient_weight_falls_back_and_stays_exact() -> None:
    d, m = 20, 48
    g = torch.Generator().manual_seed(3)
    w = torch.randn(d, 6, generator=g, dtype=torch.float64) @ torch.randn(6, m, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    x = correlated_inputs(400, d, seed=4)
    assert decompose(MomentAccumulator(d).update(x), w, b)._kind == "eager"  # W W^T is singular
    _check_exact(x, w, b, range(1, 7))


@pytest.mark.parametrize("m", [8, 300])  # the smaller side is M / D (300 > 256: the blocked triangular products)
def test_only_the_installed_columns_are_formed_and_they_match_the_whole_basis(m: int) -> None:
    d = 16 if m < 16 else 256
    x = correlated_inputs(2000, d, seed=5)
    w = torch.randn(d, m, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    dec = decompose(MomentAccumulator(d).update(x), w, None, fit_bias=False)
    rank = min(d, m) // 3
    wa, wb, _ = dec.factors(rank)  # before V and G are formed whole
    g, v = dec.G[:, :rank], dec.V[:, :rank]
    norms = g.norm(dim=0).sqrt()
    torch.testing.assert_close(wa, g / norms, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(wb, norms[:, None] * v.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dec.V.T @ dec.V, torch.eye(min(d, m), dtype=torch.float64), rtol=0, atol=1e-9)


def test_triangular_products_equal_the_full_ones() -> None:
    g = torch.Generator().manual_seed(7)
    t = torch.randn(300, 300, generator=g, dtype=torch.float64)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_triangular_matmul(t.triu(), x), t.triu() @ x)
    torch.testing.assert_close(_triangular_matmul(t.tril(), x, lower=True), t.tril() @ x)


@pytest.mark.parametrize("d, m, projected", [(16, 40, False), (24, 10, False), (24, 10, True)])
def test_heldout_refit_equals_a_fresh_fit_on_the_half(d: int, m: int, projected: bool) -> None:
    g = torch.Generator().manual_seed(d + m)
    w = torch.randn(d, m, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    x = correlated_inputs(600, d, seed=8)

    def acc(rows: torch.Tensor) -> MomentAccumulator:
        return MomentAccumulator(m, projection=w).update(rows @ w) if projected else MomentAccumulator(d).update(rows)

    halves = (acc(x[::2]), acc(x[1::2]))
    solved = decompose(acc(x), w, b)
    reused = heldout_curve(halves, w, b, solved=solved)
    fresh = heldout_curve(halves, w, b)
    torch.testing.assert_close(reused, fresh, rtol=1e-8, atol=1e-12)
    if projected:
        with pytest.raises(ValueError, match="another map"):
            solved.refit(MomentAccumulator(m, projection=w + 1).update(x @ (w + 1)))
    else:
        with pytest.raises(ValueError, match="projected exactly"):
            solved.refit(MomentAccumulator(m, projection=w).update(x @ w))


def test_benchmark_dry_run(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "milestone_cost_dry_run.json").read_text())
    assert len(result["per_layer"]["current"]) == 8  # 4 projections x 2 blocks
    assert result["config"]["solve_devices"] == ["cpu"]  # the solves ran where the statistics are
    assert result["max_relative_nmse_difference"] < 1e-6
    assert result["config"]["heldout_layers"] and result["heldout_values_compared"] > 0  # held-out solves timed
