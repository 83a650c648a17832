"""One target specification and one prepare / finish path for both entry points
(``surgery/pipeline.py``): the callback and ``factorize_model`` choose the same layers and ranks on
the same model and data, their defaults come from one place, and a bad spec fails when built."""

import copy
import inspect

import lightning.pytorch as pl
import pytest
import torch

from factorize_plugin import FixedRank, LowRankFactorization, factorize_model
from factorize_plugin.surgery.pipeline import ONE_SHOT_STATISTICS, TRAINING_STATISTICS, TargetSpec, prepare
from lightning_helpers import TinyNet, composed

SELECTION = ("targets", "exclude", "min_params", "min_features")
STATISTICS = ("max_samples", "sample_fraction")


def _defaults(fn, names):
    params = inspect.signature(fn).parameters
    return {n: params[n].default for n in names}


def test_both_entry_points_take_the_spec_defaults():
    spec = TargetSpec()
    assert _defaults(LowRankFactorization.__init__, SELECTION) == {n: getattr(spec, n) for n in SELECTION}
    assert _defaults(factorize_model, SELECTION) == {n: getattr(spec, n) for n in SELECTION}
    # statistics: the callback subsamples (every milestone, during training), one-shot keeps every row
    assert _defaults(LowRankFactorization.__init__, STATISTICS) == TRAINING_STATISTICS == {n: getattr(spec, n) for n in STATISTICS}
    assert _defaults(factorize_model, STATISTICS) == ONE_SHOT_STATISTICS
    one_shot = TargetSpec.one_shot()
    assert {n: getattr(one_shot, n) for n in STATISTICS} == ONE_SHOT_STATISTICS


@pytest.mark.parametrize(
    "field,value",
    [("targets", 3), ("exclude", [""]), ("min_params", -1), ("min_features", 2.5), ("max_samples", 0),
     ("sample_fraction", 2.0)],
)  # fmt: skip
def test_a_bad_spec_is_refused_when_built_naming_the_setting(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        TargetSpec(**{field: value})


def test_spec_normalizes_and_prepare_selects_by_it():
    spec = TargetSpec(targets="classifier.*", min_params=1e2, min_features=0)
    assert spec.targets == ["classifier.*"] and spec.min_params == 100 and type(spec.min_params) is int
    selection = prepare(TinyNet(), spec, {"here": FixedRank(16)})
    assert list(selection.layers) == ["classifier.0", "classifier.2"]
    assert any("rank=16" in a and "classifier.2" in a for a in selection.advice)  # 32 -> 10: stays dense
    with pytest.raises(ValueError, match="no layer to factorize"):
        prepare(TinyNet(), TargetSpec(min_params=10**9))


def _val_batches(model: TinyNet) -> list:
    return [x for x, _ in model.val_dataloader()]


@pytest.mark.parametrize("min_features", [32, 0])  # default selection (one layer), and every layer
def test_callback_and_factorize_model_give_the_same_layers_and_ranks(min_features):
    """factorize_model with FixedRank(8) on the validation batches == the callback's milestone 0
    (a calibration pass over the same validation batches, before training) with the same spec."""
    pl.seed_everything(0)
    model = TinyNet(n_val=128)
    twin = copy.deepcopy(model)
    spec = dict(min_features=min_features, sample_fraction=1.0, max_samples=100_000)
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
