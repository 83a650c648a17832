"""One vocabulary and one prepare / finish path for every door (``surgery/specs.py``,
``surgery/pipeline.py``): the callback, the engine and ``factorize_model`` take the same
``Targets`` and ``Statistics``, choose the same layers and ranks on the same model and data, their
defaults differ only where ``arguments.DEFAULTS`` says why, and a bad spec fails when built."""

import copy
import dataclasses
import inspect

import lightning.pytorch as pl
import pytest
import torch

from factorize_plugin import FactorizationEngine, FixedRank, LowRankFactorization, Statistics, Targets, factorize_model
from factorize_plugin.surgery.arguments import DEFAULTS
from factorize_plugin.surgery.pipeline import prepare
from lightning_helpers import TinyNet, composed


def test_every_door_takes_the_same_objects_and_resolves_the_rows_per_door():
    for door in (LowRankFactorization.__init__, FactorizationEngine.__init__, factorize_model):
        params = inspect.signature(door).parameters
        assert params["targets"].default is None and params["statistics"].default is None
    assert LowRankFactorization({1: 0.5}).targets == FactorizationEngine().targets == Targets()
    assert (Targets().min_params, Targets().min_features) == (1024, 32)
    # rows: the training doors subsample (every milestone), one-shot keeps every row
    training, one_shot = Statistics().at("training"), Statistics().at("one_shot")
    assert (training.max_samples, training.sample_fraction) == (DEFAULTS["max_samples"].training, "auto") == (100_000, "auto")
    assert (one_shot.max_samples, one_shot.sample_fraction) == (200_000, 1.0)
    assert LowRankFactorization({1: 0.5}).statistics == FactorizationEngine().statistics == training
    # a field set by the user wins at every door; "default" is resolved by the door
    assert Statistics(max_samples=None).at("one_shot") == dataclasses.replace(one_shot, max_samples=None)


@pytest.mark.parametrize(
    "cls,field,value",
    [(Targets, "include", 3), (Targets, "exclude", [""]), (Targets, "min_params", -1), (Targets, "min_features", 2.5),
     (Statistics, "max_samples", 0), (Statistics, "sample_fraction", 2.0), (Statistics, "max_bytes", 0),
     (Statistics, "space", "output")],
)  # fmt: skip
def test_a_bad_spec_is_refused_when_built_naming_the_setting(cls, field, value):
    name = "targets" if field == "include" else field
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        cls(**{field: value})


def test_spec_normalizes_and_prepare_selects_by_it():
    targets = Targets("classifier.*", min_params=1e2, min_features=0)
    assert targets.include == ["classifier.*"] and targets.min_params == 100 and type(targets.min_params) is int
    selection = prepare(TinyNet(), targets, {"here": FixedRank(16)})
    assert list(selection.layers) == ["classifier.0", "classifier.2"]
    assert any("rank=16" in a and "classifier.2" in a for a in selection.advice)  # 32 -> 10: stays dense
    with pytest.raises(ValueError, match="no layer to factorize"):
        prepare(TinyNet(), Targets(min_params=10**9))


def test_a_flat_name_beside_its_object_is_refused():
    with pytest.raises(ValueError, match=r"min_params= beside targets=Targets\(\.\.\.\): pass min_params= inside"):
        LowRankFactorization({1: 0.5}, targets=Targets(), min_params=0)
    with pytest.raises(ValueError, match=r"max_statistics_bytes= beside statistics=Statistics.*pass max_bytes="):
        factorize_model(torch.nn.Linear(64, 64), [], rank=8, statistics=Statistics(), max_statistics_bytes=10)
    with pytest.raises(TypeError, match="statistics must be a factorize_plugin.Statistics, got dict"):
        LowRankFactorization({1: 0.5}, statistics={"max_samples": 10})


def test_the_old_flat_names_give_the_same_objects_with_a_warning():
    with pytest.warns(DeprecationWarning) as record:
        old = LowRankFactorization({1: 0.5}, targets="classifier.*", exclude="x", min_params=0, max_samples=None,
                                   max_statistics_bytes=10**6)  # fmt: skip
    assert len(record) == 4
    assert old.targets == Targets("classifier.*", exclude="x", min_params=0)
    assert old.statistics == Statistics(max_samples=None, max_bytes=10**6).at("training")
    # the old defaults passed explicitly change nothing, so they do not warn
    assert LowRankFactorization({1: 0.5}, min_params=1024, max_samples=100_000).targets == Targets()


def _val_batches(model: TinyNet) -> list:
    return [x for x, _ in model.val_dataloader()]


@pytest.mark.parametrize("min_features", [32, 0])  # default selection (one layer), and every layer
def test_callback_and_factorize_model_give_the_same_layers_and_ranks(min_features):
    """factorize_model with FixedRank(8) on the validation batches == the callback's milestone 0
    (a calibration pass over the same validation batches, before training) with the same spec."""
    pl.seed_everything(0)
    model = TinyNet(n_val=128)
    twin = copy.deepcopy(model)
    spec = dict(targets=Targets(min_features=min_features), statistics=Statistics(sample_fraction=1.0, max_samples=100_000))
    reports = factorize_model(twin, _val_batches(twin), FixedRank(8), speed_guard=False, **spec)

    cb = LowRankFactorization({0: FixedRank(8)}, speed_guard=False, output_batches=0, verbose=False, **spec)
    swapped = {}

    class AfterTheSwap(pl.Callback):  # runs after the milestone's swap, before the first training step
        def on_train_epoch_start(self, trainer, pl_module):
            swapped.update(composed(pl_module, list(cb.ranks)))

    pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, callbacks=[cb, AfterTheSwap()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    ).fit(model)  # fmt: skip

    assert cb.history[0]["statistics"] == "calibration"
    assert cb.ranks == {r.name: r.new_rank for r in reports if r.name not in cb.skipped}
    assert set(cb.ranks) | set(cb.skipped) == {r.name for r in reports}
    assert cb.skipped == {r.name: r.note for r in reports if r.name in cb.skipped}
    assert cb.history[0]["samples"] == {r.name: r.samples for r in reports if r.name in cb.ranks}
    names = list(cb.ranks)
    assert names and all(cb.ranks[n] == 8 or cb.ranks[n] is None for n in names)
    want = composed(twin, names)
    for n in names:
        torch.testing.assert_close(swapped[n], want[n], rtol=1e-4, atol=1e-5)
