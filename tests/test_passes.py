"""Statistics in several passes under ``max_statistics_bytes`` (issue 23 item 3): the plan fits the
budget, the bound is what the collector measures, the factors are those of one pass, and a layer
alone over the budget is refused naming it."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn

from factorize_plugin import LowRankFactorization, Statistics, Targets, factorize_model
from factorize_plugin.surgery.statistics.collector import ActivationCollector
from factorize_plugin.surgery.statistics.passes import plan_passes, statistics_bound
from lightning_helpers import (
    TARGETS,
    TINY,
    WIDE_TARGETS,
    TinyNet,
    WideNet,
    composed,
    max_abs_diff,
    state_dict_cpu,
    structure,
)  # fmt: skip


class Attention(nn.Module):
    """q/k/v read one input (a shared accumulator where they land in one pass), o reads another;
    the MLP's down projection has fewer outputs than inputs (projected statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 48)
        self.q, self.k, self.v = nn.Linear(48, 48), nn.Linear(48, 48), nn.Linear(48, 48)
        self.o = nn.Linear(48, 48)
        self.up = nn.Linear(48, 96)
        self.down = nn.Linear(96, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        a = torch.tanh(self.o(torch.tanh(self.q(h)) * torch.sigmoid(self.k(h)) + self.v(h)))
        return self.down(torch.relu(self.up(a)))


def _batches(n=6, rows=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 12, generator=g) for _ in range(n)]


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_plan_fits_the_budget_in_model_order():
    model = Attention()
    layers = _layers(model)
    bounds = {n: statistics_bound(m, "auto", holdout=False) for n, m in layers.items()}
    budget = 2 * max(bounds.values())
    groups = plan_passes(layers, budget, holdout=False)
    assert [n for g in groups for n in g] == list(layers)  # every layer once, in model order
    assert 1 < len(groups) < len(layers)
    for i, g in enumerate(groups):
        assert sum(bounds[n] for n in g) <= budget
        if i + 1 < len(groups):  # a group is closed only when the next layer would not fit
            assert sum(bounds[n] for n in g) + bounds[groups[i + 1][0]] > budget
    assert plan_passes(layers, None) == [list(layers)]
    assert plan_passes(layers, sum(bounds.values()), holdout=False) == [list(layers)]
    # held-out halves (one process): 3 accumulators per layer at most, so more passes
    assert len(plan_passes(layers, budget, holdout=True)) > len(groups)
    # a layer alone over the budget: named, with its bytes
    biggest = max(bounds, key=bounds.get)
    with pytest.raises(ValueError, match=rf"layer '{biggest}' alone \({bounds[biggest]} bytes"):
        plan_passes(layers, bounds[biggest] - 1, holdout=False)


@pytest.mark.parametrize("holdout", [True, False])
def test_bound_is_what_the_collector_measures(holdout):
    """For one layer the bound is exact: input statistics (a 16 -> 48 layer: D x D) and projected
    ones (64 -> 16: M x M plus W's float32 snapshot), with held-out halves and their union (few rows)."""
    torch.manual_seed(0)
    for layer in (nn.Linear(16, 48), nn.Linear(64, 16)):
        col = ActivationCollector({"l": layer}, max_samples=None, space="auto", holdout=holdout)
        with torch.no_grad(), col:
            layer(torch.randn(40, layer.in_features))
        col.stats  # the solve's read: the held-out halves' union is built
        assert col.statistics_bytes == statistics_bound(layer, "auto", holdout)
    pair_bound = statistics_bound(nn.Linear(64, 16), "auto", holdout, factorized=True)
    assert pair_bound - statistics_bound(nn.Linear(64, 16), "auto", holdout) == 64 * 16 * 4  # float64 W


@pytest.mark.parametrize("sample_fraction", [1.0, "auto"])
def test_factorize_model_in_passes_gives_the_one_pass_factors(sample_fraction):
    base = Attention().double()
    batches = [b.double() for b in _batches()]
    one, several = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(rank=0.5, targets=Targets(min_params=0, min_features=0), speed_guard=False)
    r1 = factorize_model(one, batches, statistics=Statistics(sample_fraction=sample_fraction), **kw)
    bounds = [statistics_bound(m, "auto", holdout=True) for m in _layers(base).values()]
    budget = 2 * max(bounds)
    statistics = Statistics(sample_fraction=sample_fraction, max_bytes=budget)
    r2 = factorize_model(several, iter(batches), statistics=statistics, **kw)  # a one-shot iterator too
    assert r1.statistics_passes == 1 and r2.statistics_passes > 2
    assert r2.statistics_bytes <= budget < r1.statistics_bytes  # measured from the accumulators
    assert [(r.name, r.new_rank, r.samples) for r in r1] == [(r.name, r.new_rank, r.samples) for r in r2]
    for a, b in zip(r1, r2):
        assert b.nmse == pytest.approx(a.nmse, rel=1e-9, abs=1e-15)
    names = list(_layers(base))
    w1, w2 = composed(one, names), composed(several, names)
    for n in names:
        assert float((w1[n] - w2[n]).norm()) <= 1e-9 * float(w1[n].norm()), n


def test_factorize_model_refuses_a_budget_below_one_layer():
    model = Attention()
    bounds = {n: statistics_bound(m, "auto", holdout=True) for n, m in _layers(model).items()}
    name = max(bounds, key=bounds.get)  # (the first of the largest)
    need = bounds[name]
    with pytest.raises(ValueError, match=rf"max_bytes={need - 1}\) .* layer '{name}' alone \({need} bytes"):
        factorize_model(model, _batches(1), rank=0.5, targets=Targets(min_params=0), speed_guard=False, statistics=Statistics(max_bytes=need - 1))
    for bad in (0, -5, 1.5, "1GB", True):
        with pytest.raises(ValueError, match="max_bytes must be"):
            factorize_model(model, _batches(1), rank=0.5, statistics=Statistics(max_bytes=bad))
        with pytest.raises(ValueError, match="max_bytes must be"):
            LowRankFactorization({1: 0.5}, statistics=Statistics(max_bytes=bad))


def _fit(budget, max_epochs=2):
    pl.seed_everything(0)
    model = WideNet()
    cb = LowRankFactorization(
        {1: 0.25}, **dict(TINY, targets=WIDE_TARGETS), statistics=Statistics(sample_fraction=1.0, max_bytes=budget))
    snap = {}

    class Snap(pl.Callback):  # the factors right after the swap, before any training on them
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                snap.update(composed(pl_module, WIDE_TARGETS))

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=[cb, Snap()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    trainer.fit(model)
    return model, cb, snap


def test_callback_in_passes_gives_the_one_pass_factors():
    """Two layers, a budget fitting one (held-out halves included): the first pass rides on the
    validation run, the second reruns the validation batches; the factors, the training after
    them (the RNG untouched by the extra pass) and the history match one pass."""
    budget = statistics_bound(WideNet().classifier[0], "auto", True, factorized=True)
    one_model, one, snap1 = _fit(None)
    several_model, several, snap2 = _fit(budget)
    h1, h2 = one.history[0], several.history[0]
    assert h1["statistics_passes"] == 1 and h2["statistics_passes"] == 2
    assert h2["statistics_bytes"] <= budget < h1["statistics_bytes"]
    assert h1["statistics"] == h2["statistics"] == "validation"
    assert h1["ranks"] == h2["ranks"] == dict.fromkeys(WIDE_TARGETS, 64) and h1["samples"] == h2["samples"]
    for n in WIDE_TARGETS:
        assert float((snap1[n] - snap2[n]).norm()) <= 1e-9 * float(snap1[n].norm()), n
        assert h2["nmse"][n] == pytest.approx(h1["nmse"][n], rel=1e-9, abs=1e-15)
    assert max_abs_diff(state_dict_cpu(one_model), state_dict_cpu(several_model)) <= 1e-9


def test_callback_refuses_a_budget_below_one_layer_at_setup():
    """TinyNet's classifier.0 (256 -> 32) has projected statistics: once factorized they keep a
    float64 copy of W, which the setup check counts (no later milestone can find it over)."""
    model = TinyNet()
    need = statistics_bound(model.classifier[0], "auto", True, factorized=True)
    assert need > statistics_bound(model.classifier[0], "auto", True)
    cb = LowRankFactorization({1: 0.5}, **TINY, statistics=Statistics(max_bytes=need - 1))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match=rf"layer 'classifier.0' alone \({need} bytes once it is factorized"):
        trainer.fit(model)
    assert not cb.history and structure(model) == dict.fromkeys(TARGETS)


def test_owners_balanced_over_the_passes():
    """One layer per pass: carrying the loads over the passes spreads the layers over the
    processes (without them every pass would give its one layer to process 0)."""
    from factorize_plugin.surgery.statistics.sharding import assign_owners

    loads: list[float] = []
    owners = [assign_owners({n: 1.0}, 2, loads) for n in ("a", "b", "c", "d")]
    assert [o[n] for o, n in zip(owners, "abcd")] == [0, 1, 0, 1] and loads == [2.0, 2.0]
    assert assign_owners({"x": 1.0}, 2) == {"x": 0}


def test_a_budget_below_one_layer_is_refused_before_calibrating():
    """The plan comes from the shapes: a layer alone over the budget fails before any batch is read."""

    class NeverIterated:
        def __iter__(self):
            raise AssertionError("the calibration data was read before the budget was checked")

    with pytest.raises(ValueError, match=r"Statistics\(max_bytes=100\) is smaller than the statistics of layer"):
        factorize_model(Attention(), NeverIterated(), rank=0.5, targets=Targets(min_params=0), speed_guard=False, statistics=Statistics(max_bytes=100))
