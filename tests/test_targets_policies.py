"""Choosing layers (patterns, types, sizes, bad input) and ranks (fixed, error target, global budget)."""

import itertools
import math

import pytest
import torch
import torch.nn as nn

from factorize_plugin.core import MomentAccumulator, decompose
from factorize_plugin.layers import FactorizedLinear, layer_view, weight_matrix
from factorize_plugin.surgery.ranks.allocation import allocate, uniform_ranks, uniform_ranks_for_budget
from factorize_plugin.surgery.ranks.candidates import LayerCandidate, current_cost, total_cost
from factorize_plugin.surgery.ranks.policies import FixedRank, MaxNMSE, ParamBudget, make_policy
from factorize_plugin.surgery.ranks.sensitivity import interpolate_output_curve, probe_ranks
from factorize_plugin.surgery.select.targets import select_layers
from helpers import correlated_inputs


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.stem = nn.Conv2d(3, 8, 3)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.rnn = nn.LSTM(16, 16)
        self.head = nn.Linear(16, 4)
        self.pair = FactorizedLinear(16, 16, rank=4)


# ----------------------------------------------------------------------------- targets
def test_default_selects_linear_and_ungrouped_conv_in_model_order():
    names = list(select_layers(_Model()))
    assert names == ["stem", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head", "pair"]
    # the insides of a factorized pair are not separate targets
    assert "pair.first" not in names


def test_include_and_exclude_patterns():
    m = _Model()
    assert list(select_layers(m, ["blocks.*.fc1"])) == ["blocks.0.fc1", "blocks.1.fc1"]
    assert list(select_layers(m, ["blocks.*"], exclude=["*.fc2", "*.norm"])) == ["blocks.0.fc1", "blocks.1.fc1"]
    assert list(select_layers(m, ["blocks.1.fc?", "head"])) == ["blocks.1.fc1", "blocks.1.fc2", "head"]
    assert list(select_layers(m, "head")) == ["head"]  # a single string is one pattern
    assert list(select_layers(m, exclude=["blocks.*", "pair"])) == ["stem", "head"]


def test_pattern_matching_nothing_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"'blocks\.\*\.fc3'"):
        select_layers(_Model(), ["blocks.*.fc1", "blocks.*.fc3"])


@pytest.mark.parametrize("name,kind", [("rnn", "LSTM"), ("emb", "Embedding"), ("blocks.0.norm", "LayerNorm")])
def test_unsupported_layer_named_explicitly_is_a_type_error(name, kind):
    with pytest.raises(TypeError, match=rf"'{name}'.*{kind}"):
        select_layers(_Model(), [name])


def test_grouped_conv_skipped_by_wildcards_and_refused_by_name():
    m = _Model()
    assert "dw" not in select_layers(m, ["*"])
    with pytest.raises(NotImplementedError, match="'dw'.*groups=8"):
        select_layers(m, ["dw"])


def test_min_params_and_types():
    m = _Model()
    assert list(select_layers(m, min_params=300)) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    assert "stem" not in select_layers(m, types=(nn.Linear,))
    assert list(select_layers(m, types=(nn.Conv2d,))) == ["stem", "pair"]  # pairs always count


# ----------------------------------------------------------------------------- policies
def _candidate(d, m, seed, decay=0.85, n=400, positions=1.0, weight=1.0, module=None):
    x = correlated_inputs(n, d, seed=seed, decay=decay)
    module = module or nn.Linear(d, m).double()
    stats = MomentAccumulator(d).update(x)
    w, b = weight_matrix(module)
    return LayerCandidate(layer_view(module), decompose(stats, w, b), positions=positions, weight=weight, samples=n)


@pytest.fixture(scope="module")
def cands():
    torch.manual_seed(0)
    return {
        "a": _candidate(24, 40, 0, decay=0.6),  # compressible inputs
        "b": _candidate(24, 40, 1, decay=0.97),  # nearly flat spectrum
        "c": _candidate(48, 12, 2, decay=0.8),
    }


def test_fixed_rank_int_fraction_and_clipping(cands):
    assert FixedRank(5).choose(cands) == {"a": 5, "b": 5, "c": 5}
    assert FixedRank(0.25).choose(cands) == {"a": 6, "b": 6, "c": 3}  # of min(in, out)
    # a rank that would not save multiply-adds leaves a dense layer dense
    assert FixedRank(10).choose(cands)["c"] is None and layer_view(nn.Linear(48, 12)).max_useful_rank == 9
    for bad in (0, -1, 1.0, 1.5, True, "3"):
        with pytest.raises(ValueError):
            FixedRank(bad)


def test_fixed_rank_conv_may_exceed_input_channels():
    conv = nn.Conv2d(3, 64, 3).double()
    stats = MomentAccumulator(27).update(correlated_inputs(300, 27, seed=3))
    w, b = weight_matrix(conv)
    c = {"conv": LayerCandidate(layer_view(conv), decompose(stats, w, b))}
    assert FixedRank(12).choose(c) == {"conv": 12}  # the pair's first conv maps 3 -> 12 channels
    assert FixedRank(0.5).choose(c) == {"conv": 1}  # a fraction is of min(C_in, C_out) = 3


def test_ranks_only_go_down_for_factorized_layers():
    pair = FactorizedLinear(24, 40, rank=6).double()
    c = {"p": _candidate(24, 40, 4, module=pair)}
    assert FixedRank(8).choose(c) == {"p": None}
    assert FixedRank(6).choose(c) == {"p": None}
    assert FixedRank(3).choose(c) == {"p": 3}
    assert ParamBudget(0.5).choose(c) == {"p": None}  # 0.5 of the dense 960 weights: the pair (384) fits already
    assert ParamBudget(0.2).choose(c) == {"p": 3}  # 192 weights: rank 3 (3 * 64)
    assert ParamBudget(1.0).choose(c) == {"p": None}


def test_max_nmse_picks_smallest_rank_meeting_target(cands):
    ranks = MaxNMSE(0.05).choose(cands)
    for name, r in ranks.items():
        curve = cands[name].decomposition.nmse_curve
        if r is None:  # the rank needed does not pay off
            assert cands[name].decomposition.smallest_rank(0.05) > cands[name].view.max_useful_rank
            continue
        assert curve[r] <= 0.05 and (r == 1 or curve[r - 1] > 0.05)
    assert ranks["a"] < (ranks["b"] or 99)  # the flat spectrum needs more
    with pytest.raises(ValueError):
        MaxNMSE(1.5)


def _objective(cands, ranks):
    return sum(
        c.weight * (0.0 if ranks[n] is None else float(c.decomposition.nmse_curve[ranks[n]])) for n, c in cands.items()
    )


def _brute_force(cands, budget):
    options = {}
    for n, c in cands.items():
        top = c.view.max_useful_rank
        options[n] = list(range(1, top + 1)) + [None]
    best = (math.inf, None)
    for combo in itertools.product(*options.values()):
        ranks = dict(zip(options, combo))
        if total_cost(cands, ranks) <= budget:
            best = min(best, (_objective(cands, ranks), ranks), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4, 0.6])
def test_param_budget_respects_budget_and_is_near_optimal(cands, fraction):
    policy = ParamBudget(fraction)
    ranks = policy.choose(cands)
    budget = fraction * current_cost(cands)
    assert total_cost(cands, ranks) <= budget
    assert all(r is None or r >= 1 for r in ranks.values())
    opt, _ = _brute_force(cands, budget)
    # Greedy on convex curves with unequal step costs: within one step of the optimum.
    assert _objective(cands, ranks) <= opt * 1.05 + 1e-9


def test_param_budget_gives_more_rank_where_it_pays(cands):
    ranks = ParamBudget(0.3).choose(cands)
    assert ranks["b"] > ranks["a"]  # the flat spectrum gains more per kept weight
    heavy = {n: LayerCandidate(c.view, c.decomposition, weight=(50.0 if n == "a" else 1.0)) for n, c in cands.items()}
    heavy_ranks = ParamBudget(0.3).choose(heavy)
    assert heavy_ranks["a"] > ranks["a"]  # a layer that matters more to the output gets more
    assert total_cost(heavy, heavy_ranks) <= 0.3 * current_cost(heavy)


def test_param_budget_macs_metric_uses_positions(cands):
    by_pos = {
        n: LayerCandidate(c.view, c.decomposition, positions=(100.0 if n == "b" else 1.0)) for n, c in cands.items()
    }
    p = ParamBudget(0.3).choose(by_pos)
    m = ParamBudget(0.3, metric="macs").choose(by_pos)
    # Multiply-adds of "b" are 100x dearer: it takes the cut, the cheap layers stay (nearly) whole.
    assert m["b"] < p["b"] + 1 and m["a"] is None and m["c"] is None
    assert p["a"] is not None and p["c"] is not None
    assert total_cost(by_pos, m, "macs") <= 0.3 * current_cost(by_pos, "macs")
    with pytest.raises(ValueError, match="metric"):
        ParamBudget(0.3, metric="flops")


def test_param_budget_edges(cands):
    assert ParamBudget(1.0).choose(cands) == {"a": None, "b": None, "c": None}
    assert ParamBudget(1e-4).choose(cands) == {"a": 1, "b": 1, "c": 1}  # floor: rank 1 everywhere
    assert ParamBudget(0.5).choose({}) == {}


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), True, None, "0.5"])
def test_budget_outside_unit_interval_raises(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ParamBudget(bad)


def test_make_policy_exactly_one():
    assert isinstance(make_policy(rank=4), FixedRank)
    assert isinstance(make_policy(max_nmse=0.1), MaxNMSE)
    assert isinstance(make_policy(param_budget=0.3), ParamBudget)
    with pytest.raises(ValueError, match="exactly one"):
        make_policy()
    with pytest.raises(ValueError, match=r"exactly one.*max_nmse.*rank"):
        make_policy(rank=4, max_nmse=0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        make_policy(param_budget=1.5)


def test_uniform_ranks_keep_the_same_share_of_each_layer(cands):
    ranks = uniform_ranks(cands, 0.25)
    for n, r in ranks.items():
        v = cands[n].view
        assert r == max(1, round(0.25 * v.in_dim * v.out_dim / (v.in_dim + v.out_dim)))
    matched = uniform_ranks_for_budget(cands, 0.3)
    assert 0.25 * current_cost(cands) < total_cost(cands, matched) <= 0.3 * current_cost(cands)


def test_output_curve_overrides_weighted_nmse(cands):
    # A measured curve saying layer "a" hurts the output 1000x more than its NMSE suggests.
    curves = {n: LayerCandidate(c.view, c.decomposition) for n, c in cands.items()}
    curves["a"].output_curve = 1000 * cands["a"].decomposition.nmse_curve
    assert ParamBudget(0.3).choose(curves)["a"] > ParamBudget(0.3).choose(cands)["a"]
    assert allocate(cands, 0.3 * current_cost(cands)) == ParamBudget(0.3).choose(cands)


def test_interpolated_output_curve_passes_through_measurements_and_decreases(cands):
    curve = cands["b"].decomposition.nmse_curve
    measured = {1: 0.9, 3: 0.3, 8: 0.01, 16: 0.0001}
    out = interpolate_output_curve(curve, measured)
    for r, e in measured.items():
        assert float(out[r]) == pytest.approx(e, rel=1e-9)
    assert bool((out[1:-1] >= out[2:]).all())
    # between measurements, the log-log interpolation stays between the neighbours
    assert 0.01 <= float(out[5]) <= 0.3
    assert probe_ranks(cands, 4)["a"][0] == 1 and probe_ranks(cands, 4)["a"][-1] == cands["a"].view.max_useful_rank


def test_interpolated_output_curve_single_point_is_proportional(cands):
    curve = cands["c"].decomposition.nmse_curve
    out = interpolate_output_curve(curve, {4: 0.5 * float(curve[4])})
    torch.testing.assert_close(out[1:], 0.5 * curve[1:])
    assert float(out[0]) >= float(out[1])
    assert bool((interpolate_output_curve(curve, {}) == 0).all())
