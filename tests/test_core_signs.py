"""Deterministic factors: equal statistics give equal factors, not factors equal up to sign."""

import torch

from factorize_plugin import MomentAccumulator, decompose
from helpers import correlated_inputs


def test_each_output_direction_has_its_largest_entry_positive():
    x = correlated_inputs(600, 24, seed=3)
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dec = decompose(MomentAccumulator(24).update(x), w, None)
    _, wb, _ = dec.factors(12)  # wb [r, M]: the r output directions
    pivots = wb.gather(1, wb.abs().argmax(1, keepdim=True))
    assert (pivots > 0).all(), pivots.flatten()


def test_statistics_summed_in_another_order_give_the_same_factors():
    x = correlated_inputs(800, 20, seed=5)
    w = torch.randn(20, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one = MomentAccumulator(20).update(x)
    parts = MomentAccumulator(20)
    for chunk in reversed(x.split(97)):
        parts.update(chunk)
    a, b = decompose(one, w, None).factors(6), decompose(parts, w, None).factors(6)
    for fa, fb in zip(a, b):
        if fa is not None:
            torch.testing.assert_close(fa, fb, rtol=1e-6, atol=1e-8)
