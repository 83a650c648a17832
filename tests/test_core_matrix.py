import pytest
import torch

from factorize_plugin import LowRankSolution, MomentAccumulator, decompose, factorize_matrix
from factorize_plugin.core.solver import nmse_of
from helpers import correlated_inputs, measured_nmse, optimal_nmse_reference


@pytest.fixture
def layer():
    torch.manual_seed(0)
    x = correlated_inputs(3000, 48, seed=1)
    w = torch.randn(48, 40, dtype=torch.float64) / 7
    b = torch.randn(40, dtype=torch.float64)
    return x, w, b


@pytest.mark.parametrize("rank", [1, 4, 12, 30])
def test_matrix_reaches_reference_optimum(layer, rank):
    x, w, b = layer
    y = x @ w + b
    sol = factorize_matrix(x, y, w, bias=b, rank=rank)
    assert sol.Wa.shape == (48, rank) and sol.Wb.shape == (rank, 40) and sol.bias.shape == (40,)
    ref = optimal_nmse_reference(x, y, rank)
    got = measured_nmse(y, x @ sol.Wa @ sol.Wb + sol.bias)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert sol.nmse == pytest.approx(got, rel=1e-9, abs=1e-12)


def test_noisy_targets_and_token_shaped_inputs():
    x = correlated_inputs(1600, 32, seed=2).reshape(20, 80, 32)  # [B, T, D] tokens
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 24, generator=g, dtype=torch.float64)
    y = x @ w + 0.3 * torch.randn(20, 80, 24, generator=g, dtype=torch.float64)
    sol = factorize_matrix(x, y, w, rank=6)
    got = measured_nmse(y, x @ sol.Wa @ sol.Wb + sol.bias)
    assert got == pytest.approx(optimal_nmse_reference(x, y, 6), rel=1e-9)
    assert sol.nmse == pytest.approx(got, rel=1e-9)


def test_nmse_curve_monotone_zero_at_full_rank(layer):
    x, w, b = layer
    stats = MomentAccumulator(48).update(x)
    curve = decompose(stats, w, b).nmse_curve
    assert curve.shape == (41,)
    assert curve[0] == pytest.approx(1.0)
    assert torch.all(curve[1:] <= curve[:-1] + 1e-12)
    assert curve[-1] == pytest.approx(0.0, abs=1e-10)
    for r in (3, 17):
        assert float(curve[r]) == pytest.approx(optimal_nmse_reference(x, x @ w + b, r), rel=1e-9)


def test_smallest_rank_meets_target(layer):
    x, w, b = layer
    dec = decompose(MomentAccumulator(48).update(x), w, b)
    r = dec.smallest_rank(0.05)
    assert dec.nmse_curve[r] <= 0.05 < dec.nmse_curve[r - 1]


def test_progressive_pair_equals_factorizing_product(layer):
    x, w, b = layer
    y = x @ w + b
    first = factorize_matrix(x, y, w, bias=b, rank=20)
    y1 = x @ first.Wa @ first.Wb + first.bias
    again = factorize_matrix(x, y1, first.Wa, first.Wb, bias=first.bias, rank=8)
    direct = factorize_matrix(x, y1, first.Wa @ first.Wb, bias=first.bias, rank=8)
    assert again.rank == direct.rank == 8
    torch.testing.assert_close(again.Wa @ again.Wb, direct.Wa @ direct.Wb, rtol=1e-8, atol=1e-10)
    assert again.nmse == pytest.approx(direct.nmse, rel=1e-8)
    assert again.nmse == pytest.approx(optimal_nmse_reference(x, y1, 8), rel=1e-8)


def test_rank_not_below_current_is_documented_no_change(layer):
    x, w, b = layer
    y = x @ w + b
    dense = factorize_matrix(x, y, w, bias=b, rank=40)
    assert dense.rank == -1 and dense.Wb is None
    torch.testing.assert_close(dense.Wa, w)
    pair = factorize_matrix(x, y, w, bias=b, rank=10)
    same = factorize_matrix(x, x @ pair.Wa @ pair.Wb + pair.bias, pair.Wa, pair.Wb, bias=pair.bias, rank=10)
    assert same.rank == -1 and same.Wa is pair.Wa and same.Wb is pair.Wb
    assert same.nmse == pytest.approx(0.0, abs=1e-10)


def test_float_rank_is_fraction_of_input_features(layer):
    # the reference's meaning: min(int(rank * D), Wa.shape[1]); D = 48 inputs, M = 40 outputs
    x, w, b = layer
    y = x @ w + b
    assert factorize_matrix(x, y, w, bias=b).rank == 12  # default 0.25 of D = 48
    assert factorize_matrix(x, y, w, bias=b, rank=0.5).rank == 24
    dense = factorize_matrix(x, y, w, bias=b, rank=0.9)  # min(43, 40) = 40 = min(D, M): dense
    assert dense.rank == -1 and dense.Wb is None and dense.Wa.shape == (48, 40)
    pair = factorize_matrix(x, y, w, bias=b, rank=10)
    y1 = x @ pair.Wa @ pair.Wb + pair.bias
    assert factorize_matrix(x, y1, pair.Wa, pair.Wb, bias=pair.bias, rank=0.1).rank == 4
    # capped by the pair's current rank 10: unchanged
    same = factorize_matrix(x, y1, pair.Wa, pair.Wb, bias=pair.bias, rank=0.5)
    assert same.rank == -1 and same.Wa is pair.Wa and same.Wb is pair.Wb
    # floats >= 1 are truncated like the reference's int()
    assert factorize_matrix(x, y, w, bias=b, rank=7.9).rank == 7


def test_reported_nmse_with_bias_matches_measurement(layer):
    # Composer subtracts the bias and then reports nmse against the shifted targets; we must not.
    x, w, _ = layer
    b = 50.0 + torch.randn(40, dtype=torch.float64)
    y = x @ w + b
    sol = factorize_matrix(x, y, w, bias=b, rank=5)
    assert sol.nmse == pytest.approx(measured_nmse(y, x @ sol.Wa @ sol.Wb + sol.bias), rel=1e-9)


def test_dtype_and_device_follow_weights(layer):
    x, w, b = layer
    y = x @ w + b
    sol = factorize_matrix(x.bfloat16(), y.bfloat16(), w.float(), bias=b.float(), rank=5)
    assert sol.Wa.dtype == sol.Wb.dtype == sol.bias.dtype == torch.float32
    # bf16 inputs still give the optimal fit on those inputs, up to float32 rounding of the
    # centered chunk products (the totals are float64)
    ref = optimal_nmse_reference(x.bfloat16(), y.bfloat16(), 5)
    assert sol.nmse == pytest.approx(ref, rel=1e-5)


def test_rank_deficient_and_constant_features():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 64, generator=g, dtype=torch.float64)  # fewer samples than features
    x[:, 5] = 3.0  # a constant feature
    w = torch.randn(64, 32, generator=g, dtype=torch.float64)
    y = x @ w
    for rank in (4, 19, 25):
        sol = factorize_matrix(x, y, w, rank=rank)
        assert all(torch.isfinite(t).all() for t in (sol.Wa, sol.Wb, sol.bias))
        got = measured_nmse(y, x @ sol.Wa @ sol.Wb + sol.bias)
        assert got == pytest.approx(optimal_nmse_reference(x, y, rank), rel=1e-7, abs=1e-10)
        assert sol.nmse == pytest.approx(got, rel=1e-7, abs=1e-10)
    # 20 centered samples span 19 dimensions: rank 19 is already exact on them
    assert factorize_matrix(x, y, w, rank=19).nmse < 1e-10


def test_ill_conditioned_inputs_stay_finite():
    x = correlated_inputs(500, 40, seed=5, decay=0.5)  # condition number ~ 2**78
    w = torch.randn(40, 40, dtype=torch.float64)
    sol = factorize_matrix(x.float(), (x @ w).float(), w.float(), rank=8)
    assert torch.isfinite(sol.Wa).all() and torch.isfinite(sol.Wb).all()
    assert 0 <= sol.nmse < 1e-3


def test_regularization_moves_toward_weight_svd(layer):
    x, w, b = layer
    stats = MomentAccumulator(48).update(x)
    wa, wb, _ = decompose(stats, w, b, regularization=1e9).factors(6)
    u, s, vh = torch.linalg.svd(w)
    svd_product = u[:, :6] @ torch.diag(s[:6]) @ vh[:6]
    torch.testing.assert_close(wa @ wb, svd_product, rtol=1e-4, atol=1e-6)
    # and it costs error on the fitted data
    assert decompose(stats, w, b, 1.0).nmse_curve[6] > decompose(stats, w, b).nmse_curve[6]


def test_held_out_curve_matches_measurement(layer):
    x, w, b = layer
    fit, held = x[:200], x[200:]
    dec = decompose(MomentAccumulator(48).update(fit), w, b, regularization=0.1)
    curve = dec.nmse_on(MomentAccumulator(48).update(held))
    y = held @ w + b
    for r in (2, 9):
        wa, wb, bias = dec.factors(r)
        assert float(curve[r]) == pytest.approx(measured_nmse(y, held @ wa @ wb + bias), rel=1e-8)
    assert nmse_of(MomentAccumulator(48).update(held), w, b) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(rank=-3), ValueError, ">= 0"),
        (dict(rank=-0.5), ValueError, ">= 0"),
        (dict(rank=float("nan")), ValueError, "finite"),
        (dict(rank=float("inf")), ValueError, "finite"),
        (dict(rank=True), ValueError, "boolean"),
        (dict(rank="4"), ValueError, "int or a float"),
        (dict(rank=torch.tensor([2, 3])), ValueError, "one-element"),
        (dict(n_iters=-1), ValueError, "n_iters"),
    ],
)
def test_bad_rank_and_iters(layer, kwargs, err, match):
    x, w, b = layer
    with pytest.raises(err, match=match):
        factorize_matrix(x, x @ w, w, **kwargs)


def test_rank_zero_is_the_mean_as_in_the_reference(layer):
    x, w, b = layer
    y = x @ w + b
    for rank in (0, 0.0, 0.01):  # 0.01 * 48 rounds to 0
        sol = factorize_matrix(x, y, w, bias=b, rank=rank)
        assert sol.rank == 0 and sol.Wa.shape == (48, 0) and sol.Wb.shape == (0, 40)
        torch.testing.assert_close(sol.bias, y.mean(0))
        assert sol.nmse == pytest.approx(1.0, rel=1e-9)


def test_bad_shapes_and_values(layer):
    x, w, b = layer
    y = x @ w
    with pytest.raises(ValueError, match="leading"):
        factorize_matrix(x, y[:-1], w)
    with pytest.raises(ValueError, match="Wa must be"):
        factorize_matrix(x, y, w.T)
    with pytest.raises(ValueError, match="Wb must be"):
        factorize_matrix(x, y, w[:, :10], torch.randn(9, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias"):
        factorize_matrix(x, y, w, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        factorize_matrix(x[:0], y[:0], w)
    bad = x.clone()
    bad[7, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        factorize_matrix(bad, y, w)
    bad[7, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        factorize_matrix(bad, y, w)


def test_solution_defaults_match_contract():
    s = LowRankSolution()
    assert (s.Wa, s.Wb, s.bias, s.rank, s.nmse) == (None, None, None, -1, 0)


@pytest.mark.parametrize("regularization", [0.0, 0.3])
def test_projected_statistics_give_the_same_solution(layer, regularization):
    x, w, b = layer  # D=48 inputs, M=40 outputs: the projected statistics are 40 x 40
    plain = decompose(MomentAccumulator(48).update(x), w, b, regularization)
    projected = decompose(MomentAccumulator(40, projection=w).update(x @ w), w, b, regularization)
    torch.testing.assert_close(plain.nmse_curve, projected.nmse_curve, rtol=1e-9, atol=1e-12)
    for r in (3, 25):
        (a1, b1, c1), (a2, b2, c2) = plain.factors(r), projected.factors(r)
        torch.testing.assert_close(a1 @ b1, a2 @ b2, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(c1, c2, rtol=1e-8, atol=1e-10)
    held = x[:300]
    torch.testing.assert_close(
        plain.nmse_on(MomentAccumulator(48).update(held)),
        projected.nmse_on(MomentAccumulator(40, projection=w).update(held @ w)),
        rtol=1e-8, atol=1e-12,
    )  # fmt: skip
    with pytest.raises(ValueError, match="changed"):
        decompose(MomentAccumulator(40, projection=w).update(x @ w), w * 1.01, b)
