"""Issue 29, item 7: early, clear refusals or working paths.

* a batch layout the model-calling rule (``surgery/calling.py``) cannot feed to ``forward`` is
  refused before training, naming ``input_fn=`` and what to pass (not after an epoch, at the first
  milestone, with ``forward() got an unexpected keyword argument``);
* an optimizer whose step needs a closure (LBFGS) works with the whole-model speed decision, or is
  refused when ``fit`` starts, saying which guard to pass;
* ``factorize_model`` works under ``torch.inference_mode()`` (new parameters are normal tensors);
* NumPy scalars of every float width (and NumPy ints) are taken wherever a Python number is;
* ``Readiness.iterations`` is bounded.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from factorize_plugin import (
    Auto,
    FixedRank,
    LowRankFactorization,
    MaxNMSE,
    MomentAccumulator,
    ParamBudget,
    Readiness,
    SpeedGuard,
    Statistics,
    Targets,
    decompose,
    factorize_matrix,
    factorize_model,
)
from factorize_plugin.layers import FactorizedLinear
from factorize_plugin.surgery import settings
from factorize_plugin.surgery.calling import call_model
from factorize_plugin.surgery.statistics.collector import ActivationCollector
from lightning_helpers import TINY, TinyNet, structure


def trainer(callbacks, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, **kw,
    )  # fmt: skip


class Counting(pl.Callback):
    """Counts the training batches that ran to their end."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args) -> None:
        self.batches += 1


# ------------------------------------------------------------------ batch layouts
class DictDigits(Dataset):
    """A labelled dataset's samples as ``{"x": image, "y": label}``: batches are dicts."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        x, y = self.data[i]
        return {"x": x, "y": y}


class DictNet(TinyNet):
    """TinyNet on dict batches; ``forward(x)`` takes the image only."""

    def train_dataloader(self):
        return DataLoader(DictDigits(super().train_dataloader().dataset), batch_size=32)

    def val_dataloader(self):
        return DataLoader(DictDigits(super().val_dataloader().dataset), batch_size=64)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["x"]), batch["y"]))


class KeywordNet(DictNet):
    """Its ``forward`` takes every key of the batch (the label is ignored)."""

    def forward(self, x: torch.Tensor, y=None) -> torch.Tensor:
        return super().forward(x)


@pytest.mark.parametrize("sanity_steps", [0, 2], ids=["no_sanity_check", "sanity_check"])
@pytest.mark.parametrize("schedule", [{1: 0.5}, {0: 0.5}], ids=["milestone_1", "milestone_0"])
def test_a_dict_batch_forward_cannot_take_is_refused_before_training(sanity_steps, schedule):
    counter = Counting()
    with pytest.raises(TypeError) as err:
        trainer([LowRankFactorization(schedule, **TINY), counter], max_epochs=2, num_sanity_val_steps=sanity_steps).fit(
            DictNet()
        )
    message = str(err.value)
    assert counter.batches == 0, "refused only after training batches ran"
    assert "input_fn=" in message and "'y'" in message, message
    assert "input_fn=lambda batch: batch['x']" in message, message  # what to pass
    assert "DictNet.forward" in message, message


def test_the_input_fn_the_message_shows_makes_it_work():
    net = DictNet()
    cb = LowRankFactorization({1: 0.5}, input_fn=lambda batch: batch["x"], **TINY)
    trainer([cb], max_epochs=2).fit(net)
    assert structure(net)["classifier.0"] == 16 and cb.history[-1]["output_nmse"] is not None


@pytest.mark.parametrize(
    "net,kwargs",
    [(KeywordNet, {}), (DictNet, {"output_batches": 0})],
    ids=["forward_takes_every_key", "model_never_called_by_the_callback"],
)
def test_no_refusal_where_the_model_can_be_fed_or_is_never_fed(net, kwargs):
    model = net()
    trainer([LowRankFactorization({1: 0.5}, **{**TINY, **kwargs})], max_epochs=2).fit(model)
    assert structure(model)["classifier.0"] == 16


def test_an_input_fn_whose_result_forward_cannot_take_names_input_fn():
    counter = Counting()
    cb = LowRankFactorization({1: 0.5}, input_fn=lambda batch: (batch["x"], batch["y"]), **TINY)
    with pytest.raises(TypeError, match=r"input_fn=.*returned a tuple.*2 positional") as err:
        trainer([cb, counter], max_epochs=2, num_sanity_val_steps=0).fit(DictNet())
    assert counter.batches == 0 and "too many positional arguments" in str(err.value)


def test_an_input_fn_that_raises_on_the_batch_is_refused_before_training():
    counter = Counting()
    cb = LowRankFactorization({1: 0.5}, input_fn=lambda batch: batch["image"], **TINY)
    with pytest.raises(TypeError, match=r"input_fn= you passed raised KeyError: 'image'.*keys \['x', 'y'\]"):
        trainer([cb, counter], max_epochs=2).fit(DictNet())
    assert counter.batches == 0


def test_factorize_model_and_call_model_name_input_fn_for_a_dict_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    data = [{"input": torch.randn(8, 64), "label": torch.zeros(8)} for _ in range(2)]
    with pytest.raises(TypeError, match=r"input_fn=") as err:
        call_model(model, data[0])
    assert "'input'" in str(err.value) and "Sequential.forward" in str(err.value)
    with pytest.raises(TypeError, match=r"input_fn=lambda batch: batch\['input'\]"):
        factorize_model(model, data, rank=8, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert isinstance(model[0], nn.Linear)  # unchanged
    factorize_model(model, data, rank=8, input_fn=lambda b: b["input"], speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert isinstance(model[0], FactorizedLinear)


def test_a_type_error_inside_forward_is_not_blamed_on_the_layout():
    class Broken(nn.Module):
        def forward(self, x):
            raise TypeError("a bug in forward")

    with pytest.raises(TypeError, match="^a bug in forward$"):
        call_model(Broken(), torch.zeros(2))


# ------------------------------------------------------------------ LBFGS
class LBFGSNet(TinyNet):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=2)


def _param_clock(step, model) -> float:
    """A deterministic whole-model clock: runs the step once (so it must work) and charges its
    parameters (a swap that removes weights is faster)."""
    step()
    return 1e-9 * sum(p.numel() for p in model.parameters())


def test_lbfgs_works_with_the_whole_model_speed_decision():
    """The timed step hands LBFGS a closure running forward + backward, as Lightning does."""
    net = LBFGSNet()
    cb = LowRankFactorization({1: 0.5}, **{**TINY, "speed_guard": SpeedGuard(clock=_param_clock)})
    trainer([cb], max_epochs=2, limit_train_batches=2).fit(net)
    assert structure(net)["classifier.0"] == 16 and cb.history[-1]["speed_trials"]


@pytest.mark.parametrize(
    "guard", [False, SpeedGuard(scope="layer", timer=lambda cases: [1.0] * len(cases))], ids=["off", "layer"]
)
def test_lbfgs_works_with_the_guards_the_refusal_names(guard):
    net = LBFGSNet()
    trainer(
        [LowRankFactorization({1: 0.5}, **{**TINY, "speed_guard": guard})], max_epochs=2, limit_train_batches=2
    ).fit(net)
    assert structure(net)["classifier.0"] == (16 if guard is False else None)  # equal timings: kept dense


# ------------------------------------------------------------------ inference mode
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rank=8, speed_guard=False),
        dict(param_budget=0.5, speed_guard=False),
        dict(rank=8, speed_guard=SpeedGuard(mode="train", repeats=1, min_time=1e-4)),
    ],
    ids=["rank", "measured_budget", "train_speed_guard"],
)
def test_factorize_model_works_under_inference_mode(kwargs):
    model = _mlp()
    with torch.inference_mode():
        data = [torch.randn(32, 64) for _ in range(3)]
        reports = factorize_model(model, data, targets=Targets(min_params=0, min_features=0), **kwargs)
    assert len(reports) == 2
    assert all(not torch.is_inference(t) for t in [*model.parameters(), *model.buffers()])
    assert all(p.requires_grad for p in model.parameters())
    if kwargs.get("speed_guard") is False:
        assert isinstance(model[0], FactorizedLinear)
    model(torch.randn(4, 64)).sum().backward()  # trainable afterwards
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------ NumPy scalars
FLOATS = [np.float16, np.float32, np.float64, np.longdouble]
INTS = [np.int8, np.int32, np.int64, np.uint16]


@pytest.mark.parametrize("f", FLOATS, ids=lambda t: t.__name__)
def test_numpy_floats_of_every_width_are_taken_where_a_float_is(f):
    r = Readiness(tolerance=f(0.1), latest=f(0.5), room=f(0.25))
    assert type(r.tolerance) is float and abs(r.tolerance - 0.1) < 1e-3
    assert type(r.latest) is float and type(r.room) is float
    assert type(MaxNMSE(f(0.05)).max_nmse) is float
    assert type(ParamBudget(f(0.5)).fraction) is float
    assert type(FixedRank(f(0.25)).rank) is float
    cb = LowRankFactorization(
        {f(1.0): f(0.5)}, regularization=f(0.1), statistics=Statistics(sample_fraction=f(0.5)), **TINY
    )  # a whole float key is an epoch
    assert list(cb.schedule) == [1] and type(cb.schedule[1]) is float and cb.regularization == pytest.approx(0.1, 1e-3)
    LowRankFactorization(Auto(readiness=Readiness(tolerance=f(0.2)), target=f(0.5)), **TINY)
    collector = ActivationCollector({"0": nn.Linear(8, 8)}, sample_fraction=f(0.5))
    assert collector.fractions["0"] == 0.5
    model = _mlp()
    factorize_model(
        model, [torch.randn(32, 64)], max_nmse=f(0.5), regularization=f(0.0), statistics=Statistics(sample_fraction=f(1.0)),
        speed_guard=False, targets=Targets(min_params=0, min_features=0),
    )  # fmt: skip
    x = torch.randn(64, 12)
    w = torch.randn(12, 10)
    assert factorize_matrix(x, x @ w, w, rank=f(0.5)).rank == 6
    stats = MomentAccumulator(12)
    stats.update(x)
    decompose(stats, w, regularization=f(0.1))
    assert settings.is_real(f(0.1))


@pytest.mark.parametrize("i", INTS, ids=lambda t: t.__name__)
def test_numpy_ints_are_taken_where_an_int_is(i):
    r = Readiness(patience=i(2), iterations=i(10), latest=i(1), room=i(1))
    assert (type(r.patience), type(r.iterations), type(r.latest)) == (int, int, float)
    cb = LowRankFactorization({i(1): i(8)}, targets=Targets(min_params=i(100), min_features=i(0)), budget_batches=i(2), **{
        k: v for k, v in TINY.items() if k != "targets"
    })  # fmt: skip
    assert cb.schedule == {1: 8} and type(cb.schedule[1]) is int and type(cb.min_params) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), "0.1", None, complex(0.1, 0)], ids=repr)
def test_booleans_strings_and_complex_numbers_are_not_numbers(value):
    assert not settings.is_real(value)
    with pytest.raises(ValueError, match=r"Readiness.tolerance must be a number in \(0, 1\)"):
        Readiness(tolerance=value)


# ------------------------------------------------------------------ bounds
def test_readiness_iterations_is_bounded():
    assert Readiness(iterations=Readiness.MAX_ITERATIONS).iterations == Readiness.MAX_ITERATIONS
    with pytest.raises(ValueError, match=r"Readiness.iterations must be a whole number in \[1, 1000\], got 1000000000"):
        Readiness(iterations=10**9)
    with pytest.raises(ValueError, match=r"Readiness.iterations must be a whole number in \[1, 1000\]"):
        Readiness(iterations=0)
