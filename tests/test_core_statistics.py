import threading

import pytest
import torch

from factorize_plugin import MomentAccumulator
from helpers import correlated_inputs


def _reference(x, y):
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    return x.mean(0), xc.T @ xc, xc.T @ yc, yc.square().sum()


def test_streaming_chunks_equal_one_pass():
    x = correlated_inputs(1000, 16, seed=0)
    y = x @ torch.randn(16, 5, dtype=torch.float64)
    one = MomentAccumulator(16, 5, chunk_size=10_000).update(x, y)
    many = MomentAccumulator(16, 5, chunk_size=7)
    for part_x, part_y in zip(x.split(33), y.split(33)):
        many.update(part_x, part_y)
    merged = MomentAccumulator(16, 5)
    for part_x, part_y in zip(x.split(250), y.split(250)):
        merged.merge_(MomentAccumulator(16, 5).update(part_x, part_y))
    mean, cxx, cxy, syy = _reference(x, y)
    for acc in (one, many, merged):
        assert acc.num_samples == 1000
        torch.testing.assert_close(acc.mean_x, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(acc.cxx, cxx, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(acc.cxy, cxy, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(acc.syy, syy, rtol=1e-10, atol=1e-9)


def test_offset_float32_inputs_keep_covariance():
    # A naive float32 sum of x x^T on data with offset 1e3 and spread 1 loses the covariance.
    g = torch.Generator().manual_seed(1)
    x64 = 1000.0 + torch.randn(20_000, 8, generator=g, dtype=torch.float64)
    x32 = x64.float()
    exact = _reference(x32, x32[:, :1])[1]
    acc = MomentAccumulator(8, chunk_size=4096).update(x32)
    # centered float32 chunk products summed in float64: only float32 rounding of the spread
    assert ((acc.cxx - exact).abs().max() / exact.abs().max()) < 2e-6
    naive = (x32.T @ x32 - 20_000 * torch.outer(x32.mean(0), x32.mean(0))).double()
    assert (naive - exact).abs().max() / exact.abs().max() > 0.1  # the failure we avoid


def test_all_reduce_gives_union_statistics():
    x = correlated_inputs(900, 12, seed=2)
    y = x[:, :3] * 2 + 1
    parts = [(x[:100], y[:100]), (x[100:], y[100:])]
    accs = [MomentAccumulator(12, 3).update(px, py) for px, py in parts]
    barrier = threading.Barrier(2)
    buffers: dict = {}

    def sum_fn_for(rank):
        def sum_fn(t):
            buffers[rank] = t.clone()
            barrier.wait()
            total = buffers[0] + buffers[1]
            barrier.wait()
            t.copy_(total)
            return t

        return sum_fn

    threads = [threading.Thread(target=accs[r].all_reduce_, args=(sum_fn_for(r),)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    mean, cxx, cxy, syy = _reference(x, y)
    for acc in accs:
        assert acc.num_samples == 900
        torch.testing.assert_close(acc.mean_x, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(acc.cxx, cxx, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(acc.cxy, cxy, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(acc.syy, syy, rtol=1e-10, atol=1e-9)


def test_memory_is_independent_of_sample_count():
    acc = MomentAccumulator(32)
    before = acc.nbytes()
    for _ in range(5):
        acc.update(torch.randn(10_000, 32))
    assert acc.nbytes() == before == 8 * (32 * 32 + 32 + 1)
    assert sum(t.numel() for t in acc.state_tensors()) * 8 == before


def test_empty_and_nonfinite_statistics_are_refused():
    acc = MomentAccumulator(4)
    with pytest.raises(ValueError, match="no samples"):
        acc.check("inputs of layer fc1")
    acc.update(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        acc.check()
    with pytest.raises(ValueError, match="features"):
        MomentAccumulator(4).update(torch.zeros(3, 5))


@pytest.mark.parametrize("d", [255, 256, 300, 1030])
def test_add_gram_computes_only_the_upper_blocks_and_adds_the_full_product(d):
    from factorize_plugin.core.statistics import add_gram_

    g = torch.Generator().manual_seed(d)
    x, start = torch.randn(64, d, generator=g), torch.randn(d, d, generator=g, dtype=torch.float64)
    out = add_gram_(start.clone(), x)
    torch.testing.assert_close(out, start + (x.T @ x).double(), rtol=1e-6, atol=1e-4)
    alone = add_gram_(torch.zeros(d, d, dtype=torch.float64), x)
    assert torch.equal(alone, alone.T)  # mirrored, not recomputed


def test_wide_float32_chunks_with_an_offset_keep_float32_precision_of_the_spread():
    # D = 512 exercises the blocked product; the centering shift is a float32 mean whose
    # rounding the residual-mean correction must undo (offset 1e3, spread ~1)
    g = torch.Generator().manual_seed(3)
    x32 = (1000.0 + torch.randn(3000, 512, generator=g) @ torch.randn(512, 512, generator=g) / 23).float()
    acc = MomentAccumulator(512)
    for part in x32.split(700):
        acc.update(part)
    x = x32.double()
    mean, cxx = x.mean(0), (x - x.mean(0)).T @ (x - x.mean(0))
    spread = float((x - mean).abs().max())
    torch.testing.assert_close(acc.mean_x, mean, rtol=0, atol=1e-6 * spread)
    torch.testing.assert_close(acc.cxx, cxx, rtol=1e-5, atol=1e-5 * float(cxx.abs().max()))

