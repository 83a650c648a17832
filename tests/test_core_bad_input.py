"""Bad input to the core API: a clear error naming the argument and what is expected, never a
silent wrong answer; integer-like ranks are accepted wherever a rank is."""

import numpy as np
import pytest
import torch

from factorize_plugin.core import MomentAccumulator, decompose, factorize_conv2d, factorize_matrix, resolve_rank


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    w = torch.randn(12, 10, generator=g, dtype=torch.float64)
    b = torch.randn(10, generator=g, dtype=torch.float64)
    return x, w, b


@pytest.fixture
def conv():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 7, 7, generator=g)
    return x, torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, generator=g)


def _with(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[min(3, t.numel() - 1)] = value
    return t


def test_integer_weight_is_refused(layer):
    x, w, b = layer
    wi = (w * 3).round().long()
    with pytest.raises(TypeError, match=r"Wa must be a floating-point tensor .*torch\.int64.*Wa\.float\(\)"):
        factorize_matrix(x, x @ wi.double(), wi, rank=3)
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        factorize_matrix(x, x @ w, w, bias=b.round().int(), rank=3)
    with pytest.raises(TypeError, match="Wb must be a floating-point"):
        factorize_matrix(x, x @ w, w[:, :4], torch.ones(4, 10, dtype=torch.int32), rank=3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["Wa", "Wb", "bias"])
def test_non_finite_matrix_weights_are_named(layer, value, which):
    x, w, b = layer
    wa, wb = w[:, :5].clone(), torch.randn(5, 10, dtype=torch.float64)
    args = dict(Wa=wa, Wb=wb, bias=b)
    args[which] = _with(args[which], value)
    y = x @ w + b
    with pytest.raises(ValueError, match=rf"^{which} contains NaN or inf values \(1 of \d+ entries\)"):
        factorize_matrix(x, y, rank=2, **args)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["Wa", "Wb", "biasA", "biasB"])
def test_non_finite_conv_weights_are_named(conv, value, which):
    x, _, _ = conv
    args = dict(Wa=torch.randn(3, 4, 3, 3), Wb=torch.randn(6, 3, 1, 1), biasA=torch.randn(3), biasB=torch.randn(6))
    args[which] = _with(args[which], value)
    with pytest.raises(ValueError, match=rf"^{which} contains NaN or inf values"):
        factorize_conv2d(x, rank=2, padding=1, **args)


def test_non_finite_dense_conv_weight_is_named(conv):
    x, w, b = conv
    with pytest.raises(ValueError, match="^Wa contains NaN"):
        factorize_conv2d(x, _with(w, float("nan")), biasA=b, rank=2)
    with pytest.raises(ValueError, match="^biasA contains NaN"):
        factorize_conv2d(x, w, biasA=_with(b, float("inf")), rank=2)


def test_decompose_names_non_finite_weight_and_bias(layer):
    x, w, b = layer
    stats = MomentAccumulator(12).update(x)
    with pytest.raises(ValueError, match="^weight contains NaN or inf"):
        decompose(stats, _with(w, float("nan")), b)
    with pytest.raises(ValueError, match="^bias contains NaN or inf"):
        decompose(stats, w, _with(b, float("inf")))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "0.1", None])
def test_bad_regularization_is_refused(layer, bad):
    x, w, b = layer
    with pytest.raises(ValueError, match="regularization must be a finite float >= 0"):
        decompose(MomentAccumulator(12).update(x), w, b, regularization=bad)


def test_regularization_accepts_numbers(layer):
    x, w, b = layer
    stats = MomentAccumulator(12).update(x)
    ref = decompose(stats, w, b, regularization=0.5).nmse_curve
    for value in (np.float32(0.5), torch.tensor(0.5), 1 / 2):
        torch.testing.assert_close(decompose(stats, w, b, regularization=value).nmse_curve, ref)


@pytest.mark.parametrize("chunk_size", [-5, 0, 2.5, True])
def test_bad_chunk_size_is_refused(chunk_size):
    with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1 \(the number of rows merged"):
        MomentAccumulator(4, chunk_size=chunk_size)


@pytest.mark.parametrize("kwargs", [dict(in_features=0), dict(in_features=2.0), dict(in_features=3, out_features=0)])
def test_bad_feature_sizes_are_refused(kwargs):
    with pytest.raises(ValueError, match="features must be an int >= 1"):
        MomentAccumulator(**kwargs)


def test_chunk_size_keeps_every_row():
    x = torch.randn(50, 3, dtype=torch.float64)
    acc = MomentAccumulator(3, chunk_size=np.int64(7)).update(x)
    assert acc.num_samples == 50
    torch.testing.assert_close(acc.mean_x, x.mean(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(padding=-1), r"padding must be >= 0 .*got -1"),
        (dict(padding=(1, -2)), r"padding must be >= 0"),
        (dict(stride=0), r"stride must be >= 1"),
        (dict(dilation=(1, 0)), r"dilation must be >= 1"),
        (dict(padding=1.5), r"padding must be an int or a pair of ints"),
    ],
)
def test_bad_conv_geometry_is_refused(conv, kwargs, match):
    x, w, b = conv
    with pytest.raises(ValueError, match=match):
        factorize_conv2d(x, w, biasA=b, rank=2, **kwargs)


def test_conv_geometry_accepts_numpy_ints(conv):
    x, w, b = conv
    a = factorize_conv2d(x, w, biasA=b, rank=2, padding=np.int64(1), stride=(np.int32(1), 2))
    c = factorize_conv2d(x, w, biasA=b, rank=2, padding=1, stride=(1, 2))
    torch.testing.assert_close(a.Wa, c.Wa)


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(Y=None), r"Y must be a torch\.Tensor \(the original layer's outputs on X.*got NoneType"),
        (dict(X=None), r"X must be a torch\.Tensor"),
        (dict(Wa=None), r"Wa must be a torch\.Tensor"),
        (dict(Y=[[1.0] * 10] * 200), r"Y must be a torch\.Tensor .*got list"),
        (dict(bias=np.zeros(10)), r"bias must be a torch\.Tensor"),
    ],
)
def test_missing_or_non_tensor_arguments_say_what_is_expected(layer, args, match):
    x, w, b = layer
    call = dict(X=x, Y=x @ w, Wa=w, rank=2) | args
    with pytest.raises(TypeError, match=match):
        factorize_matrix(**call)


def test_conv_non_tensor_arguments(conv):
    x, w, b = conv
    with pytest.raises(TypeError, match=r"X must be a torch\.Tensor \(the inputs \[N, C_in, H, W\]\)"):
        factorize_conv2d(None, w)
    with pytest.raises(TypeError, match="biasA must be a torch.Tensor"):
        factorize_conv2d(x, w, biasA=[0.0] * 6)
    with pytest.raises(TypeError, match="Wa must be a floating-point"):
        factorize_conv2d(x, w.long())


INTEGER_LIKE = [np.int64(3), np.int32(3), np.uint8(3), torch.tensor(3), torch.tensor([3]), torch.tensor(3, dtype=torch.int32)]


@pytest.mark.parametrize("rank", INTEGER_LIKE, ids=repr)
def test_integer_like_ranks_are_accepted(layer, conv, rank):
    x, w, b = layer
    y = x @ w + b
    sol = factorize_matrix(x, y, w, bias=b, rank=rank)
    plain = factorize_matrix(x, y, w, bias=b, rank=3)
    assert type(sol.rank) is int and sol.rank == 3
    torch.testing.assert_close(sol.Wa @ sol.Wb, plain.Wa @ plain.Wb)
    xc, wc, bc = conv
    sol = factorize_conv2d(xc, wc, biasA=bc, rank=rank, padding=1)
    assert type(sol.rank) is int and sol.rank == 3 and sol.Wa.shape == (3, 4, 3, 3)
    assert resolve_rank(rank, 10, 12) == 3


@pytest.mark.parametrize("rank", [np.float64(0.25), np.float32(0.25), torch.tensor(0.25)], ids=repr)
def test_float_like_ranks_are_accepted(layer, rank):
    x, w, b = layer
    assert factorize_matrix(x, x @ w + b, w, bias=b, rank=rank).rank == 3  # int(0.25 * 12)
    assert resolve_rank(rank, 10, 12) == 2  # the model-level meaning: 0.25 of min(10, 12)


@pytest.mark.parametrize("rank", [torch.tensor(True), np.bool_(True), torch.tensor([2, 3]), torch.tensor(2 + 0j)], ids=repr)
def test_non_number_ranks_are_refused(layer, rank):
    x, w, b = layer
    with pytest.raises(ValueError, match="rank must be"):
        factorize_matrix(x, x @ w, w, rank=rank)
    with pytest.raises(ValueError, match="rank must be"):
        resolve_rank(rank, 10, 12)


def test_integer_data_is_used_exactly(layer):
    """Integer inputs (e.g. pixel values) are data, not weights: used as float64."""
    x, w, b = layer
    xi = (x * 10).round().long()
    y = xi.double() @ w + b
    a = factorize_matrix(xi, y, w, bias=b, rank=4)
    c = factorize_matrix(xi.double(), y, w, bias=b, rank=4)
    torch.testing.assert_close(a.Wa @ a.Wb, c.Wa @ c.Wb)
    images = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    sol = factorize_conv2d(images, torch.randn(5, 3, 3, 3), rank=2)
    assert sol.rank == 2 and torch.isfinite(sol.Wa).all()
