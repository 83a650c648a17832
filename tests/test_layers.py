"""FactorizedLinear / FactorizedConv2d: drop-in shapes, exact factors, rank changes, fold-back,
dtype/device/requires_grad, state dicts, and the matrix-view adapters."""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from factorize_plugin.layers import (
    FactorizedConv2d,
    FactorizedLinear,
    check_factorizable,
    decode_extra_state,
    input_rows,
    install_factors,
    layer_view,
    weight_matrix,
)


def _factors(d, m, r, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(d, r, generator=g, dtype=dtype),
        torch.randn(r, m, generator=g, dtype=dtype),
        torch.randn(m, generator=g, dtype=dtype),
    )


# ----------------------------------------------------------------------------- Linear
@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 3, 4)])
def test_linear_output_shape_any_leading_shape(lead):
    lin = nn.Linear(12, 7)
    layer = FactorizedLinear.from_linear(lin, *_factors(12, 7, 3))
    x = torch.randn(*lead, 12)
    assert layer(x).shape == lin(x).shape == (*lead, 7)


def test_from_linear_reproduces_factorized_matrix():
    lin = nn.Linear(12, 7).double()
    wa, wb, b = _factors(12, 7, 3)
    layer = FactorizedLinear.from_linear(lin, wa, wb, b)
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ wa @ wb + b)
    w, bias = layer.matrix()
    torch.testing.assert_close(w, wa @ wb)
    torch.testing.assert_close(bias, b)
    assert layer.rank == 3 and layer.first.weight.shape == (3, 12) and layer.second.weight.shape == (7, 3)


def test_linear_without_bias():
    lin = nn.Linear(6, 4, bias=False).double()
    wa, wb, _ = _factors(6, 4, 2)
    layer = FactorizedLinear.from_linear(lin, wa, wb, None)
    assert layer.second.bias is None
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ wa @ wb)
    dense = layer.to_dense()
    assert dense.bias is None
    torch.testing.assert_close(dense(x), layer(x))


def test_set_factors_lowers_rank_and_same_rank_copies_in_place():
    lin = nn.Linear(10, 8).double()
    layer = FactorizedLinear.from_linear(lin, *_factors(10, 8, 5))
    first_before = layer.first.weight
    wa, wb, b = _factors(10, 8, 5, seed=1)
    layer.set_factors(wa, wb, b)  # same rank: same parameter objects
    assert layer.first.weight is first_before
    wa, wb, b = _factors(10, 8, 2, seed=2)
    layer.set_factors(wa, wb, b)  # lower rank: new parameters of the new shape
    assert layer.rank == 2 and layer.first.weight is not first_before
    assert layer.first.weight.shape == (2, 10)
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ wa @ wb + b)
    assert "rank=2" in repr(layer)
    with pytest.raises(ValueError, match="rank"):
        layer.set_factors(torch.zeros(10, 0, dtype=torch.float64), torch.zeros(0, 8, dtype=torch.float64), b)


def test_linear_to_dense_round_trip():
    lin = nn.Linear(9, 6).double()
    w = lin.weight.detach().T.clone()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    layer = FactorizedLinear.from_linear(lin, u * s, vh, lin.bias.detach())  # full rank: exact
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear)
    torch.testing.assert_close(dense.weight, lin.weight)
    torch.testing.assert_close(dense.bias, lin.bias)
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    torch.testing.assert_close(dense(x), lin(x))
    torch.testing.assert_close(layer(x), lin(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_dtype_device_and_requires_grad_kept(dtype, requires_grad):
    lin = nn.Linear(8, 6, dtype=dtype).requires_grad_(requires_grad)
    layer = FactorizedLinear.from_linear(lin, *_factors(8, 6, 3))  # float64 factors are cast
    conv = nn.Conv2d(3, 5, 3, dtype=dtype).requires_grad_(requires_grad)
    pair = FactorizedConv2d.from_conv(conv, *_factors(27, 5, 2))
    for mod, like in ((layer, lin.weight), (pair, conv.weight)):
        for p in mod.parameters():
            assert p.dtype == dtype and p.device == like.device and p.requires_grad == requires_grad
    layer.set_factors(*_factors(8, 6, 2))  # a rank change keeps them too
    pair.set_factors(*_factors(27, 5, 1))
    for mod in (layer, pair, layer.to_dense(), pair.to_dense()):
        for p in mod.parameters():
            assert p.dtype == dtype and p.requires_grad == requires_grad


def test_set_factors_under_inference_mode_makes_usable_parameters():
    layer = FactorizedLinear.from_linear(nn.Linear(8, 6), *_factors(8, 6, 4))
    with torch.inference_mode():
        layer.set_factors(*_factors(8, 6, 2))
    assert not layer.first.weight.is_inference()
    layer(torch.randn(2, 8)).sum().backward()  # trainable afterwards
    assert layer.first.weight.grad is not None


def test_linear_state_dict_round_trip_and_resize_on_load():
    src = FactorizedLinear.from_linear(nn.Linear(20, 12), *_factors(20, 12, 8))
    state = src.state_dict()
    assert decode_extra_state(state["_extra_state"])["rank"] == 8
    dst = FactorizedLinear(20, 12, rank=16)
    dst.load_state_dict(state)  # rank 8 into rank 16: resized before the weights are copied
    assert dst.rank == 8 and dst.first.weight.shape == (8, 20)
    x = torch.randn(4, 20)
    torch.testing.assert_close(dst(x), src(x))
    # ... inside a parent model, through torch.save / torch.load(weights_only=True)
    model_src = nn.Sequential(nn.Linear(20, 20), src)
    model_dst = nn.Sequential(nn.Linear(20, 20), FactorizedLinear(20, 12, rank=3))
    buf = io.BytesIO()
    torch.save(model_src.state_dict(), buf)
    buf.seek(0)
    model_dst.load_state_dict(torch.load(buf, weights_only=True))
    assert model_dst[1].rank == 8
    torch.testing.assert_close(model_dst(x), model_src(x))


def test_conv_state_dict_round_trip_and_resize_on_load():
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    src = FactorizedConv2d.from_conv(conv, *_factors(36, 6, 2))
    dst = FactorizedConv2d(4, 6, 3, rank=5, padding=1, stride=2)
    dst.load_state_dict(src.state_dict())
    assert dst.rank == 2
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(dst(x), src(x))


# ----------------------------------------------------------------------------- Conv2d
CONV_OPTIONS = [
    dict(kernel_size=3),
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 5), padding=(1, 2), stride=(2, 1)),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=(2, 4), padding="same"),  # asymmetric 'same' padding
    dict(kernel_size=3, padding="valid", stride=2),
    dict(kernel_size=3, padding=2, dilation=(2, 1), padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="replicate"),
    dict(kernel_size=3, padding=(1, 2), padding_mode="circular"),
    dict(kernel_size=1, bias=False),
]


@pytest.mark.parametrize("opts", CONV_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_conv_pair_matches_factorized_matrix_for_every_option(opts):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, **opts).double()
    view = layer_view(conv)
    wa, wb, b = _factors(view.in_dim, 8, 4)
    if conv.bias is None:
        b = None
    pair = FactorizedConv2d.from_conv(conv, wa, wb, b)
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64)
    out = pair(x)
    ref = conv(x)
    assert out.shape == ref.shape
    # The pair equals the original convolution with weight (wa @ wb) and bias b.
    with torch.no_grad():
        conv.weight.copy_((wa @ wb).T.reshape(conv.weight.shape))
        if b is not None:
            conv.bias.copy_(b)
    torch.testing.assert_close(out, conv(x))
    # The adapters see the same matrix; input_rows @ W + b is the convolution.
    w, bias = weight_matrix(pair)
    torch.testing.assert_close(w, wa @ wb)
    rows = input_rows(x, layer_view(pair))
    flat = rows @ w + (0 if bias is None else bias)
    torch.testing.assert_close(flat.reshape(2, ref.shape[2], ref.shape[3], 8).permute(0, 3, 1, 2), out)
    # fold-back
    dense = pair.to_dense()
    assert isinstance(dense, nn.Conv2d) and dense.padding_mode == conv.padding_mode
    torch.testing.assert_close(dense(x), out)
    # unbatched input works like nn.Conv2d's
    assert pair(x[0]).shape == ref[0].shape


def test_conv_to_dense_round_trip_and_lowering():
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    w, b = weight_matrix(conv)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    pair = FactorizedConv2d.from_conv(conv, u * s, vh, b)
    torch.testing.assert_close(pair.to_dense().weight, conv.weight)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(pair(x), conv(x))
    pair.set_factors((u * s)[:, :2], vh[:2], b)
    assert pair.rank == 2 and pair.first.out_channels == 2 and pair.second.in_channels == 2
    assert "rank=2" in pair.extra_repr()


# ----------------------------------------------------------------------------- adapters
def test_layer_view_sizes_and_max_useful_rank():
    v = layer_view(nn.Linear(100, 50))
    assert (v.in_dim, v.out_dim, v.rank, v.geometry) == (100, 50, None, None)
    assert v.params() == 5000 and v.params(10) == 1500
    assert v.max_useful_rank * 150 < 5000 <= (v.max_useful_rank + 1) * 150
    cv = layer_view(nn.Conv2d(8, 16, (3, 5)))
    assert (cv.in_dim, cv.out_dim, cv.rank_base) == (120, 16, 8)
    pv = layer_view(FactorizedLinear(100, 50, rank=7))
    assert pv.rank == 7 and pv.current_params == 7 * 150


def test_install_factors_dense_returns_new_pair_and_pair_is_resized_in_place():
    lin = nn.Linear(6, 5)
    new = install_factors(lin, *_factors(6, 5, 2))
    assert isinstance(new, FactorizedLinear) and new is not lin
    same = install_factors(new, *_factors(6, 5, 1))
    assert same is new and new.rank == 1
    conv = nn.Conv2d(2, 4, 3)
    assert isinstance(install_factors(conv, *_factors(18, 4, 2)), FactorizedConv2d)


def test_check_factorizable_names_the_layer():
    with pytest.raises(TypeError, match="'emb'.*Embedding"):
        check_factorizable(nn.Embedding(10, 4), "emb")
    with pytest.raises(NotImplementedError, match="'dw'.*groups=4"):
        check_factorizable(nn.Conv2d(4, 4, 3, groups=4), "dw")


def test_gradients_flow_through_pair():
    conv = nn.Conv2d(3, 6, 3, padding=1)
    pair = FactorizedConv2d.from_conv(conv, *_factors(27, 6, 2))
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    F.relu(pair(x)).sum().backward()
    assert x.grad is not None and pair.first.weight.grad is not None and pair.second.bias.grad is not None
