"""Model-level bad input (issue 12): integer-like ranks, a single target string, schedule keys,
warnings for settings that change nothing, a calibration batch that does not fit the model."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn as nn

from factorize_plugin import FixedRank, LowRankFactorization, Targets, factorize_model
from factorize_plugin.layers import FactorizedLinear
from lightning_helpers import TINY, TinyNet, structure, tiny

INT_LIKE = [np.int64(8), np.int32(8), torch.tensor(8)]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))


def batches(n: int = 4, width: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, width, generator=g) for _ in range(n)]


def trainer(callbacks, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------- integer-like ranks
@pytest.mark.parametrize("rank", INT_LIKE, ids=lambda r: type(r).__module__ + "." + type(r).__name__)
def test_integer_like_ranks_are_ints_everywhere(rank):
    policy = FixedRank(rank)
    assert type(policy.rank) is int and policy.rank == 8 and policy.order_key() == ("int rank", -8.0)
    model = mlp()
    factorize_model(model, batches(), rank=rank, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert isinstance(model[0], FactorizedLinear) and model[0].rank == 8
    model = mlp()
    factorize_model(model, batches(), FixedRank(rank), speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert model[2].rank == 8
    cb = LowRankFactorization({np.int64(1): rank}, **TINY)
    assert cb.schedule == {1: 8} and type(cb.schedule[1]) is int  # plain numbers: checkpoints load weights_only
    net = TinyNet()
    trainer([cb], max_epochs=2).fit(net)
    assert structure(net)["classifier.0"] == 8


def test_fractional_numpy_and_tensor_ranks_are_floats():
    for rank in (np.float64(0.25), torch.tensor(0.25)):
        assert type(FixedRank(rank).rank) is float and FixedRank(rank).order_key()[0] == "fractional rank"


# ------------------------------------------------------------------- targets and schedule keys
def test_a_single_target_string_is_one_pattern():
    cb = LowRankFactorization({1: 0.5}, **tiny("classifier.0", exclude="features.*"))
    assert cb.targets.include == ["classifier.0"] and cb.exclude == ["features.*"]
    net = TinyNet()
    trainer([cb], max_epochs=2).fit(net)  # was read letter by letter: "pattern 'c' matches no module"
    assert structure(net) == {"features.2": None, "classifier.0": 16, "classifier.2": None}


@pytest.mark.parametrize(
    "schedule,match",
    [({1.7: 16}, r"1\.7 is not a whole epoch"), ({"1": 16, 1: 8}, r"names epoch 1 twice"), ({-1: 8}, "negative")],
)
def test_bad_schedule_keys_are_errors(schedule, match):
    with pytest.raises(ValueError, match=match):
        LowRankFactorization(schedule)


# ---------------------------------------------------------- settings that change nothing: warnings
def _messages(record) -> str:
    return " | ".join(str(w.message) for w in record)


def test_factorize_model_warns_about_settings_that_change_nothing():
    with pytest.warns(UserWarning, match=r"rank=48 is at or above the size.*'0': 48.*stay dense") as rec:
        factorize_model(mlp(), batches(), rank=48, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert "'2': 32" in _messages(rec)
    with pytest.warns(UserWarning, match=r"exclude pattern\(s\) \['decoder\.\*'\] match no module"):
        factorize_model(mlp(), batches(), rank=8, targets=Targets(exclude=["decoder.*"], min_params=0, min_features=0), speed_guard=False)
    square = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with pytest.warns(UserWarning, match=r"changed no layer.*0\.5 on a square layer saves nothing"):
        reports = factorize_model(square, batches(), rank=0.5, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert not any(r.changed for r in reports)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sensible call warns about nothing
        factorize_model(mlp(), batches(), rank=8, targets=Targets(exclude="2", min_params=0, min_features=0), speed_guard=False)


def test_callback_warns_about_settings_that_change_nothing():
    cb = LowRankFactorization({1: 32}, **tiny(exclude=["decoder.*"]))
    with pytest.warns(UserWarning) as rec:
        trainer([cb], max_epochs=2).fit(TinyNet())
    text = _messages(rec)
    assert "exclude pattern(s) ['decoder.*'] match no module" in text
    assert "milestone 1: rank=32 is at or above the size min(in, out) of layer(s)" in text and "'features.2': 16" in text
    square = LowRankFactorization({1: 0.5}, **tiny(["classifier.0"]))

    class Square(TinyNet):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    with pytest.warns(UserWarning, match=r"milestone 1 \(rank=0\.5\) changed no layer"):
        trainer([square], max_epochs=2).fit(Square())


# ------------------------------------------------------- calibration batch of the wrong shape
def test_calibration_batch_of_the_wrong_shape_names_the_layer():
    with pytest.raises(RuntimeError, match=r"does not fit layer '0' \(Linear, in_features=64\).*\(32, 100\)"):
        factorize_model(mlp(), batches(width=100), rank=8, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(40, 32))  # inner mismatch, untargeted layer too
    with pytest.raises(RuntimeError, match=r"does not fit layer '2' \(Linear, in_features=40\).*\(32, 48\)"):
        factorize_model(model, batches(), rank=8, targets=Targets(["0"], min_params=0, min_features=0), speed_guard=False)
    assert not [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]


# ------------------------------------------------------- honest NMSE for small calibration sets
def _correlated(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=torch.Generator().manual_seed(99)) / width**0.5
    return torch.randn(rows, width, generator=g) @ mix


@pytest.mark.parametrize("rows,warns", [(40, True), (4000, False)])
def test_small_calibration_sets_report_a_held_out_nmse_and_warn(rows, warns):
    """40 rows on a 128-wide layer at rank 16: the fit's own NMSE (~0.22) is optimistic against new
    rows (~0.64); the held-out estimate (fit on half, measured on the other half) is close to that,
    and a warning says so. With many rows the two agree and nothing warns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128))
    dense = nn.Sequential(nn.Linear(128, 128))
    dense.load_state_dict(model.state_dict())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        (report,) = factorize_model(model, [_correlated(rows, 128, 1)], rank=16, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    x = _correlated(4000, 128, 2)
    with torch.no_grad():
        y, y_hat = dense(x), model(x)
    new_rows = float((y_hat - y).square().sum() / (y - y.mean(0)).square().sum())
    assert report.heldout_nmse is not None
    assert abs(report.heldout_nmse - new_rows) < abs(report.nmse - new_rows) or abs(report.nmse - new_rows) < 0.05
    assert any("fitted NMSE is optimistic" in str(w.message) for w in rec) == warns
    if warns:
        assert report.nmse < 0.35 and new_rows > 0.55 and report.heldout_nmse > 0.55


def test_callback_history_holds_the_held_out_nmse():
    cb = LowRankFactorization({1: 0.5}, **TINY)
    trainer([cb], max_epochs=2).fit(TinyNet())
    held = cb.history[0]["heldout_nmse"]
    assert set(held) <= set(cb.history[0]["nmse"]) and held  # 128 validation digits: a small set
    assert all(v >= 0 for v in held.values())


def test_callback_calibration_batch_of_the_wrong_shape_names_the_layer():
    """Key 0 calibrates before training (no sanity check here): 7x7 images reach classifier.0 with
    144 features instead of 256, and the error says where."""

    class SmallImages(TinyNet):
        def val_dataloader(self):
            x = torch.rand(64, 1, 7, 7)
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=32)

    cb = LowRankFactorization({0: 0.5}, **TINY)
    with pytest.raises(RuntimeError, match=r"a validation batch does not fit layer 'classifier\.0' \(Linear, in_features=256\).*\(32, 144\)"):
        trainer([cb], max_epochs=1, num_sanity_val_steps=0).fit(SmallImages())
