"""The speed guard (issue 14): decisions checked with a deterministic fake timer; the real timer
only for what does not depend on the machine's speed (it runs, leaves the RNG and the model alone)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn

from factorize_plugin import (
    FactorizedLinear,
    LowRankFactorization,
    ParamBudget,
    SpeedGuard,
    Targets,
    factorize_model,
    format_reports,
)
from factorize_plugin.layers.adapters import layer_view
from factorize_plugin.surgery.ranks.allocation import allocate
from factorize_plugin.surgery.ranks.candidates import LayerCandidate, admissible, max_rank
from factorize_plugin.surgery.timing.speed import LayerInput, TimingCase, sampler
from lightning_helpers import TINY, TinyNet, structure

OVERHEAD = 40_000  # fixed cost per layer call in the fake timer's units: small layers lose


class FakeTimer:
    """Seconds = multiply-adds per step + a fixed overhead per module called (a pair calls two):
    deterministic, and like a CPU where small layers are launch-bound. Records every call."""

    def __init__(self) -> None:
        self.calls: list[list[TimingCase]] = []

    def __call__(self, cases):
        self.calls.append(list(cases))
        return [self.seconds(c) for c in cases]

    def seconds(self, c: TimingCase) -> float:
        macs = c.view.params(c.rank) * c.inputs.rows(c.view)
        return (macs + OVERHEAD * (1 if c.rank is None else 2)) * 1e-9

    def cases(self) -> list[TimingCase]:
        return [c for call in self.calls for c in call]


class SlowConvTimer(FakeTimer):
    """As FakeTimer, but a convolution's pair takes twice the dense convolution's time."""

    def seconds(self, c: TimingCase) -> float:
        if c.view.geometry is not None and c.rank is not None:
            return 2 * super().seconds(c.dense)
        return super().seconds(c)


def fake_ratio(d: int, m: int, rank: int, rows: int) -> float:
    return (d * m * rows + OVERHEAD) / (rank * (d + m) * rows + 2 * OVERHEAD)


def _mlp(widths=(16, 16, 256, 256)) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def _calib(d: int, rows: int = 16, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(rows, d, generator=g) for _ in range(n)]


def test_narrow_layers_stay_dense_wide_ones_are_factorized_with_a_note():
    timer = FakeTimer()
    model = _mlp((16, 16, 16, 256, 256))
    reports = factorize_model(model, _calib(16), rank=0.25, speed_guard=SpeedGuard(mode="inference", timer=timer), targets=Targets(min_params=0, min_features=0))
    by = {r.name: r for r in reports}
    assert fake_ratio(16, 16, 4, 16) < 1.15 < fake_ratio(256, 256, 64, 16)  # the premise
    for name in ("0", "2", "4"):  # 16x16 (x2) and 16x256 at rank 4: the pair is slower
        assert isinstance(model.get_submodule(name), nn.Linear) and not by[name].changed
        assert by[name].note.startswith("kept dense: rank 4 measured") and "cpu/float32 at 16 rows, forward" in by[name].note
        assert by[name].speedup == pytest.approx(fake_ratio(*by[name].shape, 4, 16))
    assert isinstance(model.get_submodule("6"), FactorizedLinear) and by["6"].new_rank == 64 and not by["6"].note
    assert by["6"].speedup == pytest.approx(fake_ratio(256, 256, 64, 16))
    assert "the changed layers measured" in format_reports(reports)
    # one batched measurement; each distinct (shape, rank) timed once, dense and pair
    assert len(timer.calls) == 1
    keys = [(c.view.in_dim, c.view.out_dim, c.rank) for c in timer.cases()]
    assert sorted(keys, key=str) == sorted([(16, 16, None), (16, 16, 4), (16, 256, None), (16, 256, 4), (256, 256, None), (256, 256, 64)], key=str)
    assert all(c.mode == "inference" and c.optimizer is None for c in timer.cases())


def test_margin_keeps_layers_near_break_even_dense():
    ratio = fake_ratio(64, 64, 16, 64)
    model = _mlp((64, 64))
    below = factorize_model(model, _calib(64, rows=64), rank=16, speed_guard=SpeedGuard(margin=ratio * 1.01, timer=FakeTimer()), targets=Targets(min_params=0, min_features=0))
    assert not below[0].changed and "needs" in below[0].note
    above = factorize_model(model, _calib(64, rows=64), rank=16, speed_guard=SpeedGuard(margin=ratio * 0.99, timer=FakeTimer()), targets=Targets(min_params=0, min_features=0))
    assert above[0].new_rank == 16


def test_cache_is_reused_across_calls_and_guard_off_never_times():
    guard, timer = SpeedGuard(timer=FakeTimer()), None
    timer = guard.timer
    factorize_model(_mlp(), _calib(16), rank=0.25, speed_guard=guard, targets=Targets(min_params=0, min_features=0))
    n = len(timer.cases())
    factorize_model(_mlp(), _calib(16), rank=0.25, speed_guard=guard, targets=Targets(min_params=0, min_features=0))  # same shapes, ranks, rows: cached
    assert len(timer.cases()) == n
    factorize_model(_mlp(), _calib(16, rows=32), rank=0.25, speed_guard=guard, targets=Targets(min_params=0, min_features=0))  # other rows: measured again
    assert len(timer.cases()) > n

    off = _mlp((16, 16))
    reports = factorize_model(off, _calib(16), rank=4, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert reports[0].new_rank == 4 and reports[0].speedup is None  # slower by the fake timer, but no guard


def test_param_budget_spends_only_on_ranks_the_guard_allows():
    """A 16-wide layer the guard never allows and a 256-wide one allowed only up to a cap below what
    the budget alone would give it: the allocation stays within the cap and leaves the narrow layer
    dense, saying why."""
    widths, budget = (256, 256, 16, 16), ParamBudget(0.9, sensitivity=False)
    timer = FakeTimer()
    reports = factorize_model(_mlp(widths), _calib(256, rows=128), budget, speed_guard=SpeedGuard(timer=timer), targets=Targets(min_params=0, min_features=0))
    free = factorize_model(_mlp(widths), _calib(256, rows=128), budget, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    by = {r.name: r for r in reports}
    assert not by["4"].changed and by["4"].note.startswith("kept dense: rank 1 measured")
    for r in reports:  # every rank given is one the guard allows
        if r.changed:
            assert fake_ratio(*r.shape, r.new_rank, 128) >= 1.15, r
    allowed = max(r for r in range(1, 128) if fake_ratio(256, 256, r, 128) >= 1.15)
    assert free[0].new_rank > allowed  # the cap binds ...
    assert 7 * allowed // 8 <= by["0"].new_rank <= allowed  # ... and bisection finds it within 1/8
    assert len(timer.calls) <= 10  # one batched call per bisection round, plus the final check


def test_rank_caps_in_allocation_and_admissible():
    layer = nn.Linear(64, 64)
    from factorize_plugin.core.solver import decompose
    from factorize_plugin.core.statistics import MomentAccumulator

    acc = MomentAccumulator(64)
    acc.update(torch.randn(256, 64, dtype=torch.float64))
    dec = decompose(acc, layer.weight.detach().double().T, None)
    view = layer_view(layer)
    c = LayerCandidate(view, dec, rank_cap=5)
    assert max_rank(c) == 5 and admissible(view, 20, cap=5) == 5 and admissible(view, 20, cap=0) is None
    free = LayerCandidate(view, dec)
    half = 0.5 * view.params(None)  # rank 16 of a 64x64 layer
    assert allocate({"a": free}, budget=half)["a"] == 16
    assert allocate({"a": c}, budget=half)["a"] == 5
    assert allocate({"a": LayerCandidate(view, dec, rank_cap=0)}, budget=0.1 * view.params(None))["a"] is None


def test_callback_times_training_rows_and_optimizer_and_logs_speedup():
    """The per-layer scope (the callback's default is the whole model's step, tests/test_model_speed.py).
    Milestone 0: validation inputs (64 rows) at the training batch size (32); milestone 1: the
    recorded first training batch; train mode with the model's own optimizer (Adam)."""
    timer = SlowConvTimer()
    pl.seed_everything(0)
    model = TinyNet(batch_size=32, val_batch_size=64)
    kwargs = dict(TINY, speed_guard=SpeedGuard(timer=timer, scope="layer"))
    cb = LowRankFactorization({0: 0.5, 1: 0.25}, **kwargs)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model)
    assert len(timer.calls) == 2  # one batched measurement per milestone
    for call in timer.calls:
        assert {c.inputs.shape[0] for c in call} == {32}
        assert all(c.mode == "train" and c.optimizer is not None and c.optimizer.cls is torch.optim.Adam for c in call)
    assert all(c.inputs.requires_grad for c in timer.calls[1] if c.view.in_dim != 72)  # recorded, not assumed
    # the conv's pair is slower by the fake timer: kept dense, said so
    assert structure(model)["features.2"] is None
    assert cb.history[0]["notes"]["features.2"].startswith("kept dense: rank 4 measured")
    assert set(cb.history[1]["speedup"]) == {"features.2", "classifier.0", "classifier.2"}
    speed = float(trainer.callback_metrics["factorize/speedup"])
    changed = [n for n in ("classifier.0", "classifier.2") if structure(model)[n] is not None]
    assert changed and speed >= 1.15  # every changed layer passed the margin; logged beside macs_kept
    assert "factorize/macs_kept" in trainer.callback_metrics


def test_real_timer_leaves_rng_and_nothing_else_touched():
    view = layer_view(nn.Linear(8, 4))
    inputs = LayerInput((5, 8), torch.float32, "cpu", requires_grad=True)
    opt = None
    cases = [TimingCase(view, None, inputs, "train", optimizer=opt), TimingCase(view, 2, inputs, "train"),
             TimingCase(view, 2, inputs, "inference")]  # fmt: skip
    state = torch.random.get_rng_state()
    secs = [sampler(c, min_time=1e-4)() for c in cases]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(secs) == 3 and all(math.isfinite(s) and s > 0 for s in secs)


def test_real_guard_runs_on_a_model_with_adam_and_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32))
    batches = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    guard = SpeedGuard(mode="train", repeats=2, min_time=1e-4)
    reports = factorize_model(model, batches, rank=2, speed_guard=guard, targets=Targets(min_params=0, min_features=0))
    assert all(r.speedup is not None and r.speedup > 0 for r in reports)
    assert all(r.changed or r.note.startswith("kept dense") for r in reports)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(margin=0), "margin"), (dict(margin=float("nan")), "margin"), (dict(mode="fast"), "mode"), (dict(repeats=0), "repeats"),
     (dict(scope="layers"), "scope")],
)
def test_bad_guard_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpeedGuard(**kwargs)


def test_bad_speed_guard_value_and_bad_timer_are_refused():
    with pytest.raises(TypeError, match="speed_guard must be 'auto', True, False or a SpeedGuard"):
        factorize_model(_mlp(), _calib(16), rank=2, speed_guard="on", targets=Targets(min_params=0, min_features=0))
    with pytest.raises(TypeError, match="speed_guard"):
        LowRankFactorization({1: 0.5}, speed_guard=1.5)
    model = _mlp()
    with pytest.raises(ValueError, match="timer returned 0.0 seconds"):
        factorize_model(model, _calib(16), rank=2, speed_guard=SpeedGuard(timer=lambda cases: [0.0] * len(cases)), targets=Targets(min_params=0, min_features=0))
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.ReLU))  # unchanged
