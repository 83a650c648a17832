"""The whole-model speed decision (issue 20, item 1): the callback keeps a swap only where the
model's training step gains. Decisions are checked with fake clocks that still run the real step
(so the timing path itself is exercised); what the timing must leave alone is checked with a real
Trainer, bit for bit."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn

from factorize_plugin import Auto, LowRankFactorization, Readiness, SpeedGuard, Targets, factorize_model
from factorize_plugin.surgery.timing.model_speed import ModelSpeedCheck
from lightning_helpers import PAIRS, TINY, TinyNet, structure

SCHEDULE = {1: 0.5}
LAYERS = ("features.2", "classifier.0", "classifier.2")  # by multiply-adds saved at {1: 0.5}: this order


def slow_pairs_timer(cases):
    """Per-layer clock: every pair alone is twice as slow as its dense layer."""
    return [1.0 if c.rank is None else 2.0 for c in cases]


class WholeModelClock:
    """Seconds of the model's training step = 1 + the sum of ``delta[name]`` over the layers that
    are pairs now (dense at the milestone). Runs the real step ``runs`` times per call."""

    def __init__(self, delta: dict[str, float], runs: int = 1) -> None:
        self.delta, self.runs = delta, runs
        self.structures: list[dict] = []

    def __call__(self, step, model) -> float:
        for _ in range(self.runs):
            step()
        pairs = {n for n in LAYERS if isinstance(model.get_submodule(n), PAIRS)}
        self.structures.append(sorted(pairs))
        return 1.0 + sum(self.delta[n] for n in pairs)


def _fit(cb, model=None, epochs=2, callbacks=(), **trainer_kwargs):
    pl.seed_everything(0)
    model = model if model is not None else TinyNet(batch_size=32, val_batch_size=64)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, callbacks=[*callbacks[:1], cb, *callbacks[1:]], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(model)
    return trainer, model


def _cb(clock, timer=slow_pairs_timer, **guard):
    return LowRankFactorization(SCHEDULE, **dict(TINY, speed_guard=SpeedGuard(timer=timer, clock=clock, **guard)))


def test_the_default_decision_is_the_whole_models():
    assert LowRankFactorization(SCHEDULE).speed_guard.scope == "model"
    assert SpeedGuard().scope is None  # where it is used decides: the callback -> "model"
    with pytest.raises(ValueError, match="scope"):
        SpeedGuard(scope="network")


def test_keeps_a_swap_faster_as_a_whole_though_each_layer_alone_looks_slower():
    clock = WholeModelClock({n: -0.1 for n in LAYERS})  # all three: 0.7 s against 1.0 s
    trainer, model = _fit(_cb(clock))
    cb = trainer.callbacks[0]
    assert all(r is not None for r in structure(model).values())
    assert clock.structures == [[], sorted(LAYERS)]  # today's step, then every candidate at once
    h = cb.history[-1]
    assert h["speedup_model"] == pytest.approx(1 / 0.7)
    assert float(trainer.callback_metrics["factorize/speedup"]) == pytest.approx(1 / 0.7, rel=1e-6)
    assert not h["notes"]

    # the per-layer guard with the same clocks keeps every layer dense
    layer_cb = _cb(WholeModelClock({n: -0.1 for n in LAYERS}), scope="layer")
    _, dense = _fit(layer_cb)
    assert all(r is None for r in structure(dense).values())
    assert "speedup_model" not in layer_cb.history[-1]


def test_drops_the_candidates_that_save_least_until_the_whole_model_is_fast_enough():
    # the biggest saver alone: 0.7 s (1.43x); with the next: 0.9 s (1.11x); all: 1.1 s
    clock = WholeModelClock({"features.2": -0.3, "classifier.0": 0.2, "classifier.2": 0.2})
    trainer, model = _fit(_cb(clock))
    cb = trainer.callbacks[0]
    s = structure(model)
    assert s["features.2"] is not None and s["classifier.0"] is None and s["classifier.2"] is None
    # today's, all three, then a bisection over how many to keep (by multiply-adds saved)
    assert clock.structures == [[], sorted(LAYERS), ["features.2"], ["classifier.0", "features.2"]]
    h = cb.history[-1]
    assert h["speedup_model"] == pytest.approx(1 / 0.7)
    assert [t["layers"] for t in h["speed_trials"]] == [3, 1, 2]
    for n in ("classifier.0", "classifier.2"):
        assert h["notes"][n].startswith("kept dense: the model's training step measured") and "needs 1.15x" in h["notes"][n]
    assert "features.2" not in h["notes"]


def test_rolls_back_every_candidate_when_none_pays():
    clock = WholeModelClock({n: 0.05 for n in LAYERS})
    trainer, model = _fit(_cb(clock))
    cb = trainer.callbacks[0]
    assert all(r is None for r in structure(model).values())
    h = cb.history[-1]
    assert h["speedup_model"] == 1.0 and float(trainer.callback_metrics["factorize/speedup"]) == 1.0
    assert set(h["notes"]) >= set(LAYERS)
    assert len(clock.structures) <= 1 + 1 + 2  # today's, all, then log2(3) rounds


class BNNet(TinyNet):
    """TinyNet with BatchNorm (running stats, num_batches_tracked) and Dropout (the RNG)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        torch.manual_seed(1)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(256, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))


class Snapshot(pl.Callback):
    """Placed around the factorization callback: everything the timing must not change, at the
    milestone's epoch start, before and after it; one parameter gets a gradient, the others None."""

    def __init__(self, before: bool, store: dict) -> None:
        self.before, self.store = before, store

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != 1:
            return
        opt = trainer.optimizers[0]
        if self.before:
            p = pl_module.features[0].weight
            p.grad = torch.full_like(p, 0.25)
            self.store["grad"] = p.grad
        self.store["before" if self.before else "after"] = {
            "state": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "opt": copy.deepcopy(opt.state_dict()),
            "rng": torch.random.get_rng_state(),
            "grads": {n: p.grad for n, p in pl_module.named_parameters()},
            "training": [m.training for m in pl_module.modules()],
        }
        if not self.before:
            pl_module.features[0].weight.grad = None


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_timing_leaves_weights_optimizer_buffers_rng_and_grads_bit_identical(precision):
    store: dict = {}
    autocast_seen: list[bool] = []
    layers = ("features.3", "classifier.0", "classifier.3")
    structures: list[list[str]] = []

    def clock(step, model):  # the real clock's loop, a few steps; the verdict: slower (nothing swapped)
        for _ in range(4):
            step()
        pairs = [n for n in layers if isinstance(model.get_submodule(n), PAIRS)]
        structures.append(pairs)
        return 1.0 + 0.05 * len(pairs)

    model = BNNet(batch_size=32, val_batch_size=64)
    model.training_step = _recording_autocast(model, autocast_seen)
    cb = LowRankFactorization(SCHEDULE, **dict(TINY, speed_guard=SpeedGuard(clock=clock)))
    _fit(cb, model, callbacks=(Snapshot(True, store), Snapshot(False, store)), precision=precision)
    before, after = store["before"], store["after"]
    assert len(structures) >= 2 and any(structures)  # candidates were installed and stepped
    assert True in autocast_seen if precision == "bf16-mixed" else True not in autocast_seen
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    assert "features.1.num_batches_tracked" in before["state"]
    assert torch.equal(before["rng"], after["rng"])
    assert before["training"] == after["training"]
    assert after["grads"]["features.0.weight"] is store["grad"] and float(store["grad"].sum()) == 0.25 * 72
    assert all(g is None for n, g in after["grads"].items() if n != "features.0.weight")
    assert before["opt"]["param_groups"] == after["opt"]["param_groups"]
    assert before["opt"]["state"].keys() == after["opt"]["state"].keys()
    for i, st in before["opt"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["opt"]["state"][i][k]), (i, k)


def _recording_autocast(model, seen):
    real = model.training_step

    def training_step(batch, batch_idx):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(batch, batch_idx)

    return training_step


def test_factorize_model_refuses_the_model_scope():
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="scope='model'"):
        factorize_model(model, [torch.randn(16, 64)], rank=8, speed_guard=SpeedGuard(scope="model"), targets=Targets(min_params=0, min_features=0))


def test_model_speed_check_without_candidates_times_nothing():
    calls = []
    check = ModelSpeedCheck(nn.Linear(2, 2), forward=lambda: None, clock=lambda s, m: calls.append(1) or 1.0)
    ranks, verdicts = check.check({}, {}, {"a": None})
    assert ranks == {"a": None} and verdicts == {} and calls == [] and check.result is None


def test_the_real_clock_decides_and_reports():
    """No fake: the default clock times TinyNet's real step (the verdict depends on this machine)."""
    cb = LowRankFactorization(SCHEDULE, **dict(TINY, speed_guard=SpeedGuard(repeats=2, min_time=0.0)))
    trainer, model = _fit(cb)
    h = cb.history[-1]
    assert h["speed_trials"] and all(t["seconds"] > 0 and t["speedup"] > 0 for t in h["speed_trials"])
    kept = [n for n, r in structure(model).items() if r is not None]
    assert h["speedup_model"] == (1.0 if not kept else next(t["speedup"] for t in h["speed_trials"] if t["layers"] == len(kept)))
    assert h["speedup_model"] >= 1.15 or not kept
    assert float(trainer.callback_metrics["factorize/speedup"]) == pytest.approx(h["speedup_model"])


def test_the_step_runs_on_the_epochs_first_training_batch_else_a_validation_batch():
    """Milestone 0: no training batch yet, a validation batch (64 rows); milestone 1: the first
    training batch of epoch 0 (32 rows), the same tensor the training loop got."""
    seen: list[int] = []
    model = TinyNet(batch_size=32, val_batch_size=64)
    real = model.training_step
    batches: list = []

    last: list = []

    def training_step(batch, batch_idx):
        seen.append(batch[0].shape[0])
        last[:] = [batch[0]]
        return real(batch, batch_idx)

    class FirstBatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 0 and batch_idx == 0:
                batches.append(batch[0].clone())

    model.training_step = training_step
    sizes: dict[int, set] = {}

    def clock(step, model):
        seen.clear()
        step()
        sizes.setdefault(model.trainer.current_epoch, set()).update(seen)
        if model.trainer.current_epoch == 1:
            assert torch.equal(last[0], batches[0])
        return 1.0

    cb = LowRankFactorization({0: 0.5, 1: 0.25}, **dict(TINY, speed_guard=SpeedGuard(clock=clock)))
    _fit(cb, model, callbacks=(FirstBatch(),))
    assert sizes == {0: {64}, 1: {32}}
    assert cb._train_batch is None  # released after the milestone


def test_auto_times_a_training_batch_not_a_validation_batch():
    """schedule="auto" decides at the end of an epoch whether the next one is a milestone: the
    speed guard keeps every watched epoch's first training batch (32 rows), so the step it times is
    a real training step, not one on a validation batch (64 rows: 2x the cost on this model, 16x on
    the LM benchmark)."""
    seen: list[int] = []
    model = TinyNet(batch_size=32, val_batch_size=64)
    real = model.training_step

    def training_step(batch, batch_idx):
        seen.append(batch[0].shape[0])
        return real(batch, batch_idx)

    model.training_step = training_step
    sizes: set = set()

    def clock(step, model):
        seen.clear()
        step()
        sizes.update(seen)
        return 1.0

    guard = SpeedGuard(clock=clock)
    cb = LowRankFactorization(Auto(target=0.5, readiness=Readiness(latest=0.5)), **dict(TINY, speed_guard=guard))
    _fit(cb, model)
    assert cb.done == [1] and sizes == {32}


def test_verbose_prints_the_whole_model_decision(caplog):
    import logging

    caplog.set_level(logging.INFO)
    clock = WholeModelClock({"features.2": -0.3, "classifier.0": 0.2, "classifier.2": 0.2})
    cb = LowRankFactorization(SCHEDULE, **dict(TINY, verbose=True, speed_guard=SpeedGuard(timer=slow_pairs_timer, clock=clock)))
    _fit(cb)
    text = caplog.text
    assert "the model's training step (forward + backward + optimizer step) took 1e+03 ms" in text
    assert "3 of 3: 0.91x, 1 of 3: 1.43x, 2 of 3: 1.11x (needs 1.15x); applied 1 of 3, 1.43x today's speed" in text


def test_a_failing_timing_raises_and_leaves_the_model_as_it_was():
    def clock(step, model):
        if any(isinstance(m, PAIRS) for m in model.modules()):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        step()
        return 1.0

    pl.seed_everything(0)
    model = TinyNet(batch_size=32, val_batch_size=64)
    cb = LowRankFactorization(SCHEDULE, **dict(TINY, speed_guard=SpeedGuard(clock=clock)))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(RuntimeError, match="whole-model speed check failed .*out of memory.*scope='layer'"):
        trainer.fit(model)
    assert all(r is None for r in structure(model).values())
    assert {id(p) for p in model.parameters()} == {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}


def test_a_param_budget_is_spent_freely_then_the_whole_model_decides():
    from factorize_plugin import ParamBudget

    clock = WholeModelClock({n: -0.2 for n in LAYERS})
    timer_calls: list = []
    cb = LowRankFactorization(
        {1: ParamBudget(0.5, sensitivity=False)},
        **dict(TINY, speed_guard=SpeedGuard(timer=lambda cases: timer_calls.append(cases) or [1.0] * len(cases), clock=clock)),
    )  # fmt: skip
    _, model = _fit(cb)
    assert timer_calls == []  # no per-layer caps in the whole-model scope
    changed = [n for n, r in structure(model).items() if r is not None]
    assert changed and cb.history[-1]["speedup_model"] == pytest.approx(1 / (1 - 0.2 * len(changed)))
