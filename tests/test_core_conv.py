import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from factorize_plugin import factorize_conv2d
from helpers import measured_nmse, optimal_nmse_reference

CASES = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=(3, 2), padding="same", dilation=(1, 2), padding_mode="circular"),
    dict(kernel_size=4, padding="same"),  # even kernel: asymmetric padding
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), padding_mode="replicate"),
]


def _inputs(seed=0, n=12, c=6, h=11, w=10):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    return F.avg_pool2d(F.pad(base, (1, 1, 1, 1), mode="replicate"), 3, stride=1) + 0.5  # correlated pixels


def _conv_kwargs(conv: nn.Conv2d) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode)


def _apply(sol, conv: nn.Conv2d, x):
    first = nn.Conv2d(conv.in_channels, sol.rank, conv.kernel_size, bias=False, **_conv_kwargs(conv)).double()
    first.weight.data.copy_(sol.Wa)
    second = nn.Conv2d(sol.rank, conv.out_channels, 1).double()
    second.weight.data.copy_(sol.Wb)
    second.bias.data.copy_(sol.bias)
    return second(first(x))


@pytest.mark.parametrize("spec", CASES)
def test_conv_reaches_reference_optimum(spec):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, **spec).double()
    x = _inputs()
    y = conv(x)
    rank = 3
    sol = factorize_conv2d(x, conv.weight, rank=rank, biasA=conv.bias, **_conv_kwargs(conv))
    assert sol.Wa.shape == (rank, 6, *conv.kernel_size) and sol.Wb.shape == (8, rank, 1, 1)
    y_hat = _apply(sol, conv, x)
    assert y_hat.shape == y.shape
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
    # reference: from the real outputs, with the real inputs unfolded independently via the conv's Jacobian
    patches_ref = _patches_by_probe(conv, x)
    ref = optimal_nmse_reference(patches_ref, flat(y), rank)
    got = measured_nmse(flat(y), flat(y_hat))
    assert got == pytest.approx(ref, rel=1e-8, abs=1e-12)
    assert sol.nmse == pytest.approx(got, rel=1e-8, abs=1e-12)


def _patches_by_probe(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The conv's input patches found by probing it with one-hot kernels (no unfold/pad logic)."""
    c, (kh, kw) = conv.in_channels, conv.kernel_size
    probe = nn.Conv2d(c, c * kh * kw, conv.kernel_size, bias=False, **_conv_kwargs(conv)).double()
    with torch.no_grad():
        probe.weight.zero_()
        for i in range(c * kh * kw):
            probe.weight.view(c * kh * kw, -1)[i, i] = 1.0
        out = probe(x)
    return out.permute(0, 2, 3, 1).reshape(-1, c * kh * kw)


def test_conv_progressive_pair_equals_product():
    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    x = _inputs(1)
    first = factorize_conv2d(x, conv.weight, rank=5, biasA=conv.bias, padding=1)
    a_bias = torch.randn(5, dtype=torch.float64)  # a bias on the first factor is folded in too
    again = factorize_conv2d(x, first.Wa, first.Wb, rank=2, biasA=a_bias, biasB=first.bias, padding=1)
    w_prod = torch.einsum("orij,rckl->ockl", first.Wb, first.Wa)
    b_prod = first.Wb[:, :, 0, 0] @ a_bias + first.bias
    direct = factorize_conv2d(x, w_prod, rank=2, biasA=b_prod, padding=1)
    assert again.rank == direct.rank == 2
    torch.testing.assert_close(
        torch.einsum("orij,rckl->ockl", again.Wb, again.Wa), torch.einsum("orij,rckl->ockl", direct.Wb, direct.Wa)
    )
    torch.testing.assert_close(again.bias, direct.bias)
    assert again.nmse == pytest.approx(direct.nmse, rel=1e-8)
    unchanged = factorize_conv2d(x, first.Wa, first.Wb, rank=5, biasB=first.bias, padding=1)
    assert unchanged.rank == -1 and unchanged.Wa is first.Wa


def test_conv_dtype_and_fraction_rank():
    # a fraction of D = C_in * k_h * k_w (the reference's meaning), capped by C_out
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = _inputs(2, c=8).float()
    sol = factorize_conv2d(x, conv.weight, biasA=conv.bias, padding=1)
    # min(int(0.25 * 72), 16) = 16 = min(D, C_out): the default gives the dense kernel here
    assert sol.rank == -1 and sol.Wb is None and sol.Wa.shape == (16, 8, 3, 3) and sol.Wa.dtype == torch.float32
    assert sol.bias.shape == (16,) and sol.nmse < 1e-6
    sol = factorize_conv2d(x, conv.weight, biasA=conv.bias, padding=1, rank=0.1)  # int(7.2) = 7
    assert sol.rank == 7 and sol.Wa.shape == (7, 8, 3, 3) and sol.Wb.shape == (16, 7, 1, 1)
    one = nn.Conv2d(8, 16, 1)
    assert factorize_conv2d(x, one.weight, biasA=one.bias).rank == 2  # 0.25 * 8


def test_conv_bad_input():
    conv = nn.Conv2d(6, 8, 3)
    x = _inputs().float()
    with pytest.raises(RuntimeError, match="biasB"):
        factorize_conv2d(x, conv.weight, biasB=torch.zeros(8))
    with pytest.raises(NotImplementedError, match="groups"):
        factorize_conv2d(x, torch.randn(8, 3, 3, 3), groups=2)
    with pytest.raises(ValueError, match="C_in"):
        factorize_conv2d(x[:, :5], conv.weight)
    with pytest.raises(ValueError, match="empty"):
        factorize_conv2d(x[:0], conv.weight)
    with pytest.raises(TypeError, match="unknown"):
        factorize_conv2d(x, conv.weight, paddin=1)
    with pytest.raises(ValueError, match=">= 0"):
        factorize_conv2d(x, conv.weight, rank=-1)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        factorize_conv2d(bad, conv.weight)
