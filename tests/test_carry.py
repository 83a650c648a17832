"""The optimizer state carried onto a new pair (``surgery/swap/carry.py``), from the pair it
refactorizes or the dense layer it replaces: a first moment maps exactly as the gradient does,
second moments stay non-negative, the step count goes on, and what cannot be carried starts empty."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factorize_plugin import FactorizedConv2d, FactorizedLinear
from factorize_plugin.surgery.swap.carry import carried_pair_state
from factorize_plugin.surgery.swap.optim import replace_in_optimizer


def _in_spans(old, new, gen: torch.Generator) -> None:
    """Sets ``new``'s factors to lie in ``old``'s spans (A1 = T A0, B1 = B0 S), as a refit from the
    pair's own map does."""
    r, r1 = old.first.weight.shape[0], new.first.weight.shape[0]
    t, s = torch.randn(r1, r, generator=gen, dtype=torch.float64), torch.randn(r, r1, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        a0 = old.first.weight.double().reshape(r, -1)
        new.first.weight.copy_((t @ a0).reshape(new.first.weight.shape))
        b0 = old.second.weight.double().reshape(old.second.weight.shape[0], r)
        new.second.weight.copy_((b0 @ s).reshape(new.second.weight.shape))


def _layer_grad_state(pair, grad_w: torch.Tensor) -> dict:
    """An Adam-like state for each factor whose first moment is the factor's gradient for the
    gradient ``grad_w`` [out, in...] of the pair's map (dL/dA = B^T G, dL/dB = G A^T)."""
    r = pair.first.weight.shape[0]
    a = pair.first.weight.detach().reshape(r, -1)
    b = pair.second.weight.detach().reshape(-1, r)
    ga, gb = (b.T @ grad_w).reshape(pair.first.weight.shape), (grad_w @ a.T).reshape(pair.second.weight.shape)
    return {
        pair.first.weight: {"step": torch.tensor(5.0), "exp_avg": ga, "exp_avg_sq": ga * ga},
        pair.second.weight: {"step": torch.tensor(5.0), "exp_avg": gb, "exp_avg_sq": gb * gb},
        pair.second.bias: {"step": torch.tensor(5.0), "exp_avg": torch.ones_like(pair.second.bias),
                           "exp_avg_sq": torch.ones_like(pair.second.bias)},
    }  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(2, 12), d_out=st.integers(2, 12), r=st.integers(1, 8), drop=st.integers(0, 7),
       conv=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_a_first_moment_maps_as_the_gradient_does(d_in, d_out, r, drop, conv, seed):
    r = min(r, d_in, d_out)
    r1 = max(1, r - drop)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    old = FactorizedConv2d(d_in, d_out, 3, r, padding=1) if conv else FactorizedLinear(d_in, d_out, r)
    new = FactorizedConv2d(d_in, d_out, 3, r1, padding=1) if conv else FactorizedLinear(d_in, d_out, r1)
    _in_spans(old, new, gen)
    grad_w = torch.randn(d_out, d_in * (9 if conv else 1), generator=gen)
    state = _layer_grad_state(old, grad_w)
    carried = carried_pair_state(dict(old.named_parameters()), dict(new.named_parameters()), state)
    want = _layer_grad_state(new, grad_w)
    for p in (new.first.weight, new.second.weight):
        torch.testing.assert_close(carried[p]["exp_avg"], want[p]["exp_avg"], rtol=1e-4, atol=1e-4)
        assert carried[p]["exp_avg_sq"].shape == p.shape and (carried[p]["exp_avg_sq"] >= 0).all()
        assert float(carried[p]["step"]) == 5.0
    assert torch.equal(carried[new.second.bias]["exp_avg"], state[old.second.bias]["exp_avg"])


def test_through_the_optimizer_edit_adam_and_sgd_carry_others_start_empty():
    torch.manual_seed(0)
    x = torch.randn(16, 12)
    for make, carries in ((lambda ps: torch.optim.AdamW(ps, lr=1e-2), True),
                          (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), True),
                          (lambda ps: torch.optim.Adagrad(ps, lr=1e-2), False)):  # fmt: skip
        old, new, dense = FactorizedLinear(12, 10, 6), FactorizedLinear(12, 10, 3), torch.nn.Linear(12, 10)
        opt = make(list(old.parameters()))
        for _ in range(3):
            opt.zero_grad()
            old(x).pow(2).sum().backward()
            opt.step()
        replace_in_optimizer(opt, [(dict(old.named_parameters()), dict(new.named_parameters()))])
        assert all(p not in opt.state for p in old.parameters())
        assert all((p in opt.state) == carries for p in new.parameters()), make
        if carries and isinstance(opt, torch.optim.AdamW):
            assert all(float(opt.state[p]["step"]) == 3 for p in new.parameters())
        new(x).pow(2).sum().backward()
        opt.step()  # the carried state has the new shapes
        # a dense layer swapped for a pair: its state is carried too (W ~ B A)
        opt2 = make(list(dense.parameters()))
        dense(x).sum().backward()
        opt2.step()
        replace_in_optimizer(opt2, [(dict(dense.named_parameters()), dict(old.named_parameters()))])
        assert all((p in opt2.state) == carries for p in old.parameters())


@pytest.mark.parametrize("frozen_bias", [False, True])
def test_only_parameters_the_optimizer_holds_get_state(frozen_bias):
    old, new = FactorizedLinear(8, 8, 4), FactorizedLinear(8, 8, 2)
    new.second.bias.requires_grad_(not frozen_bias)
    opt = torch.optim.Adam(old.parameters())
    old(torch.randn(4, 8)).sum().backward()
    opt.step()
    replace_in_optimizer(opt, [(dict(old.named_parameters()), dict(new.named_parameters()))])
    assert (new.second.bias in opt.state) == (not frozen_bias)
    assert new.first.weight in opt.state and new.second.weight in opt.state


@pytest.mark.parametrize("transposed", [False, True], ids=["Linear [out, in]", "Conv1D-like [in, out]"])
def test_a_dense_layers_first_moment_maps_onto_its_pair(transposed):
    """W ~ B1 A1: a first moment equal to dL/dW becomes dL/dA1 = B1^T dL/dW and dL/dB1 = dL/dW A1^T;
    a weight stored transposed (square here, so only the fit tells the orientation) is read as such."""
    g = torch.Generator().manual_seed(1)
    d, r = 10, 9
    w = torch.randn(d, d, generator=g, dtype=torch.float64)  # the layer's map [out, in]
    u, sv, vh = torch.linalg.svd(w)
    pair = FactorizedLinear(d, d, r).double()
    with torch.no_grad():
        pair.first.weight.copy_(sv[:r, None] * vh[:r])  # A1 [r, in]
        pair.second.weight.copy_(u[:, :r])  # B1 [out, r]
    stored = torch.nn.Parameter(w.T.clone() if transposed else w.clone())
    bias = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    grad_w = torch.randn(d, d, generator=g, dtype=torch.float64)
    m = grad_w.T if transposed else grad_w
    state = {stored: {"step": torch.tensor(3.0), "exp_avg": m, "exp_avg_sq": m * m},
             bias: {"step": torch.tensor(3.0), "exp_avg": torch.ones(d, dtype=torch.float64)}}  # fmt: skip
    carried = carried_pair_state({"weight": stored, "bias": bias}, dict(pair.named_parameters()), state)
    a1, b1 = pair.first.weight.detach(), pair.second.weight.detach()
    torch.testing.assert_close(carried[pair.first.weight]["exp_avg"], b1.T @ grad_w)
    torch.testing.assert_close(carried[pair.second.weight]["exp_avg"], grad_w @ a1.T)
    assert float(carried[pair.first.weight]["step"]) == 3.0
    assert torch.equal(carried[pair.second.bias]["exp_avg"], state[bias]["exp_avg"])
