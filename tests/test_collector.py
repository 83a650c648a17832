"""ActivationCollector: exact float64 statistics, sample cap, no_grad / inference_mode / autocast,
detaching, and refusing empty statistics."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from factorize_plugin.layers import FactorizedLinear
from factorize_plugin.surgery.statistics.collector import ActivationCollector


def _moments(rows: torch.Tensor):
    rows = rows.double()
    mean = rows.mean(0)
    centered = rows - mean
    return rows.shape[0], mean, centered.T @ centered


def _check(stats, rows, seen_dtype=None):
    """The collected moments equal a direct float64 computation: to float64 round-off for float64
    inputs; lower-precision inputs are centered and multiplied in float32 (the totals stay
    float64), so to float32 round-off of the spread, whatever the offset."""
    n, mean, cxx = _moments(rows)
    assert stats.num_samples == n
    assert stats.cxx.dtype == torch.float64 and stats.mean_x.dtype == torch.float64
    exact = (seen_dtype or rows.dtype) == torch.float64
    spread = float((rows.double() - mean).abs().max())
    torch.testing.assert_close(stats.mean_x, mean, rtol=1e-10, atol=(1e-10 if exact else 1e-6) * spread)
    rtol = 1e-9 if exact else 1e-5
    torch.testing.assert_close(stats.cxx, cxx, rtol=rtol, atol=rtol * float(cxx.abs().max()))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.fc = nn.Linear(6, 5)
        self.unused = nn.Linear(5, 5)

    def forward(self, img, seq):
        return self.conv(img), self.fc(seq)


def _inputs(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 7, 6, generator=g) + 1.5, torch.randn(n, 4, 6, generator=g) - 3.0


def test_stats_equal_direct_float64_computation():
    net = _Net()
    col = ActivationCollector({"conv": net.conv, "fc": net.fc}, max_samples=None)
    imgs, seqs = [], []
    with torch.no_grad(), col:
        for seed in range(3):
            img, seq = _inputs(seed)
            net(img, seq)
            imgs.append(img)
            seqs.append(seq)
    img, seq = torch.cat(imgs), torch.cat(seqs)
    # Linear: every token of [B, T, D] is a row.
    _check(col.stats["fc"], seq.reshape(-1, 6))
    # Conv2d: the patches the convolution multiplies, built here with F.unfold directly.
    patches = F.unfold(img.double(), 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
    _check(col.stats["conv"], patches, seen_dtype=img.dtype)
    out_h, out_w = 4, 3
    assert col.positions["conv"] == out_h * out_w and col.positions["fc"] == 4
    assert col.calls == {"conv": 3, "fc": 3}


def test_float64_inputs_are_exact_to_float64_round_off():
    lin = nn.Linear(6, 5).double()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 7, 6, generator=g, dtype=torch.float64) * 0.01 + 1e3 for _ in range(4)]
    with ActivationCollector({"lin": lin}, max_samples=None) as col:
        for x in xs:
            lin(x)
    _check(col.stats["lin"], torch.cat(xs).reshape(-1, 6))  # rtol 1e-9 despite the 1e5 offset/spread ratio


def test_sample_cap_is_respected():
    net = _Net()
    col = ActivationCollector({"fc": net.fc, "conv": net.conv}, max_samples=20)
    with torch.no_grad(), col:
        img, seq = _inputs(n=2)  # 8 tokens, 24 conv positions per batch
        for _ in range(4):
            net(img, seq)
    assert col.samples() == {"fc": 20, "conv": 20}
    assert col.calls["fc"] == 3  # the hook stops working once the cap is reached
    # A cap that falls on a batch boundary keeps exactly the first batches.
    col16 = ActivationCollector({"fc": net.fc}, max_samples=16)
    with torch.no_grad(), col16:
        for _ in range(3):
            net(img, seq)
    _check(col16.stats["fc"], torch.cat([seq, seq]).reshape(-1, 6))
    with pytest.raises(ValueError, match="max_samples"):
        ActivationCollector({"fc": net.fc}, max_samples=0)


def test_memory_is_independent_of_the_number_of_samples():
    net = _Net()
    col = ActivationCollector({"fc": net.fc}, max_samples=None)
    with col:
        net(*_inputs(n=2))
        before = col.stats["fc"].nbytes()
        for _ in range(5):
            net(*_inputs(n=20))
    assert col.stats["fc"].nbytes() == before == 8 * (36 + 6 + 1)


def test_inference_mode_and_bf16_autocast():
    net = _Net()
    img, seq = _inputs()
    with torch.inference_mode(), ActivationCollector({"fc": net.fc}, max_samples=None) as col:
        net(img, seq)
    _check(col.stats["fc"], seq.reshape(-1, 6))
    assert not col.stats["fc"].cxx.is_inference()

    seq_big = seq * 100 + 1000  # a large offset: bf16 accumulation would lose it entirely
    with torch.autocast("cpu", dtype=torch.bfloat16), ActivationCollector({"fc": net.fc}, max_samples=None) as col2:
        out = net.fc(seq_big)
    assert out.dtype == torch.bfloat16  # autocast really was active around the layer
    assert col2.stats["fc"].cxx.dtype == torch.float64
    _check(col2.stats["fc"], seq_big.reshape(-1, 6))


def test_bf16_inputs_are_accumulated_in_float64():
    lin = nn.Linear(6, 3).to(torch.bfloat16)
    x = torch.randn(50, 6).to(torch.bfloat16)
    with ActivationCollector({"lin": lin}, max_samples=None) as col:
        lin(x)
    _check(col.stats["lin"], x.double(), seen_dtype=x.dtype)


def test_detach_removes_hooks():
    net = _Net()
    col = ActivationCollector({"fc": net.fc}).attach()
    col.attach()  # idempotent
    assert col.attached and len(net.fc._forward_hooks) == 1
    net(*_inputs())
    col.detach()
    assert not col.attached and len(net.fc._forward_hooks) == 0
    n = col.stats["fc"].num_samples
    net(*_inputs())
    assert col.stats["fc"].num_samples == n


def test_check_nonempty_names_the_layer_that_never_ran():
    net = _Net()
    with ActivationCollector({"fc": net.fc, "unused": net.unused}) as col:
        net(*_inputs())
    with pytest.raises(RuntimeError, match=r"\['unused'\]"):
        col.check_nonempty()
    with ActivationCollector({"fc": net.fc}) as ok:
        net(*_inputs())
    ok.check_nonempty()


def test_collects_inputs_of_a_factorized_pair():
    pair = FactorizedLinear(6, 5, rank=2)
    x = torch.randn(10, 6)
    with ActivationCollector({"pair": pair}, max_samples=None) as col:
        pair(x)
    _check(col.stats["pair"], x)


def test_sample_fraction_and_projected_space_give_the_same_solution():
    from factorize_plugin.surgery.swap.refactorize import build_candidates

    torch.manual_seed(0)
    lin = nn.Linear(24, 6).double()  # fewer outputs than inputs: space="auto" projects
    x = torch.randn(400, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64) + 1.0
    with ActivationCollector({"lin": lin}, max_samples=None) as full:
        lin(x)
    with ActivationCollector({"lin": lin}, max_samples=None, space="auto") as proj:
        lin(x)
    assert proj.stats["lin"].in_features == 6 and full.stats["lin"].in_features == 24
    a = build_candidates({"lin": lin}, full.stats)["lin"].decomposition
    b = build_candidates({"lin": lin}, proj.stats)["lin"].decomposition
    torch.testing.assert_close(a.nmse_curve, b.nmse_curve, rtol=1e-7, atol=1e-10)
    for wa, wb in zip(a.factors(3), b.factors(3)):
        torch.testing.assert_close(wa, wb, rtol=1e-6, atol=1e-9)
    with ActivationCollector({"lin": lin}, max_samples=None, sample_fraction=0.25) as part:
        lin(x)
    assert part.stats["lin"].num_samples == 100
    with pytest.raises(ValueError, match="sample_fraction"):
        ActivationCollector({"lin": lin}, sample_fraction=0)


def test_held_out_halves_take_each_row_once_and_their_union_is_the_layer_statistics():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4).double()
    xs = [torch.randn(n, 8, dtype=torch.float64) for n in (5, 8, 3)]
    col = ActivationCollector({"lin": lin}, max_samples=None)
    with col:
        for x in xs:
            lin(x)
    a, b = col.holdout.pairs()["lin"]
    assert (a.num_samples, b.num_samples) == (8, 8)  # rows alternate across calls
    assert col._stats["lin"].num_samples == 0  # the rows live in the halves only
    _check(col.stats["lin"], torch.cat(xs))
    # past HeldOutHalves.LIMIT_FACTOR x width rows the halves are folded into the layer's accumulator
    more = torch.randn(64 * 8, 8, dtype=torch.float64)
    with col:
        lin(more)
    assert "lin" not in col.holdout.pairs() and col.samples()["lin"] == 16 + 512
    _check(col.stats["lin"], torch.cat(xs + [more]))


def test_buffered_rows_are_copies_and_reach_the_statistics_at_detach():
    lin = nn.Linear(6, 3).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    seen = x.clone()
    with ActivationCollector({"lin": lin}, max_samples=None, holdout=False) as col:
        lin(x)
        x.mul_(100)  # an in-place change after the hook (as a later inplace op would do)
        assert col.samples()["lin"] == 10
    _check(col.stats["lin"], seen)


def test_expected_batches_spreads_the_minimum_rows_over_the_whole_run():
    # "auto" on a 1024-wide layer keeps WARMUP_FACTOR x 1024 rows at least; batch i is offset by i
    lin = nn.Linear(1024, 1024)
    batches = [torch.full((256, 1024), float(i)) + torch.randn(256, 1024) for i in range(20)]

    def kept_mean(expected):
        with torch.no_grad(), ActivationCollector({"lin": lin}, max_samples=None, sample_fraction="auto",
                                                  expected_batches=expected) as col:  # fmt: skip
            for x in batches:
                lin(x)
        return col.samples()["lin"], float(col.stats["lin"].mean_x.mean())

    n_front, mean_front = kept_mean(None)
    n_even, mean_even = kept_mean(20)
    floor = ActivationCollector.WARMUP_FACTOR * 1024
    assert n_front >= floor and n_even >= floor
    assert mean_front < 5.0  # the minimum all from the first 8 batches
    assert abs(mean_even - 9.5) < 0.3  # an even share of every batch


def test_projected_rows_come_from_the_layer_output_and_equal_projected_inputs():
    """space="auto" takes z = x @ W from the layer's own output less its bias (no patches, no
    product) where that output is full precision; the rows equal the projected inputs."""
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(8, 4, 3, padding=1, stride=2).double(), nn.Linear(24, 6).double()
    img, seq = torch.randn(3, 8, 9, 7, dtype=torch.float64), torch.randn(5, 2, 24, dtype=torch.float64)
    col = ActivationCollector({"conv": conv, "lin": lin}, max_samples=None, space="auto", holdout=False)
    with col:
        conv(img)
        lin(seq)
    patches = F.unfold(img, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 72)
    for name, rows, layer in (("conv", patches, conv), ("lin", seq.reshape(-1, 24), lin)):
        w = layer.weight.reshape(layer.weight.shape[0], -1).T
        _check(col.stats[name], rows @ w)
    # under autocast the output is bf16: the float32 projection of the inputs is used instead
    lin32 = nn.Linear(24, 6)
    x = torch.randn(40, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16), ActivationCollector({"lin": lin32}, max_samples=None, space="auto") as auto:
        lin32(x)
    _check(auto.stats["lin"], x.double() @ lin32.weight.double().T, seen_dtype=torch.float32)


def test_sampled_output_rows_are_the_same_positions_as_sampled_input_rows():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 4, 3, padding=1).double()
    img = torch.randn(6, 8, 10, 10, dtype=torch.float64)
    cols = {}
    for space in ("input", "auto"):
        with ActivationCollector({"conv": conv}, max_samples=None, space=space, sample_fraction=0.3, seed=5) as cols[space]:
            conv(img)
    full, proj = cols["input"].stats["conv"], cols["auto"].stats["conv"]
    w = conv.weight.reshape(4, -1).T
    assert full.num_samples == proj.num_samples == round(0.3 * 600)
    torch.testing.assert_close(proj.mean_x, full.mean_x @ w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(proj.cxx, w.T @ full.cxx @ w, rtol=1e-9, atol=1e-9)
