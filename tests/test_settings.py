"""Every setting of the callback, ``factorize_model`` and the rank policies is checked where it is
given (issue 19, item 2), by one shared checker per setting (``surgery/settings.py``): a bad value
is a ValueError naming the setting, the value and the rule, before any training or calibration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from factorize_plugin import (
    FixedRank,
    LowRankFactorization,
    MaxNMSE,
    ParamBudget,
    Statistics,
    Targets,
    factorize_model,
)
from factorize_plugin.surgery import settings
from lightning_helpers import TINY, TINY_LAYERS


class NeverIterated:
    """Calibration data that fails the test if read: a setting must be refused before that."""

    def __iter__(self):
        raise AssertionError("the calibration data was read before the settings were checked")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))


# (setting, bad value, words of the rule); the settings both entry points take, top-level or as a
# field of their object (``_given``)
SHARED = [
    ("min_params", -5, ">= 0"),
    ("min_params", 1.5, "whole number"),
    ("min_params", "10", "whole number"),
    ("min_params", True, "whole number"),
    ("min_features", -1, ">= 0"),
    ("min_features", 2.5, "whole number"),
    ("max_samples", 0, ">= 1"),
    ("max_samples", -3, ">= 1"),
    ("max_samples", 10.5, "whole number"),
    ("sample_fraction", 2.0, "(0, 1]"),
    ("sample_fraction", 0.0, "(0, 1]"),
    ("sample_fraction", -0.5, "(0, 1]"),
    ("sample_fraction", math.nan, "(0, 1]"),
    ("sample_fraction", "half", "'auto'"),
    ("sample_fraction", True, "(0, 1]"),
    ("regularization", -1.0, ">= 0"),
    ("regularization", math.nan, ">= 0"),
    ("regularization", math.inf, "finite"),
    ("regularization", "strong", "number"),
    ("targets", 5, "pattern"),
    ("targets", ["classifier.0", 3], "pattern"),
    ("targets", [""], "empty"),
    ("exclude", 5, "pattern"),
    ("exclude", [None], "pattern"),
    ("input_fn", 5, "callable"),
    ("max_bytes", 0, ">= 1"),
    ("max_bytes", -3, ">= 1"),
    ("max_bytes", 1.5, "whole number"),
    ("max_bytes", "4GB", "whole number"),
    ("max_bytes", True, "whole number"),
    ("space", "output", "one of"),
]
CALLBACK_ONLY = [
    ("budget_batches", -1, ">= 0"),
    ("budget_batches", 1.5, "whole number"),
    ("output_batches", -1, ">= 0"),
    ("output_batches", True, "whole number"),
    ("name", "", "non-empty"),
    ("name", 5, "string"),
    ("verbose", "yes", "True or False"),
    ("mode", "ranks", "one of"),
]
FACTORIZE_MODEL_ONLY = [
    ("device", "nowhere", "device"),
    ("device", 3.5, "device"),
    ("output_fn", "logits", "callable"),
    ("budget_batches", -1, ">= 0"),
    ("budget_batches", 2.5, "whole number"),
    ("progress", "yes", "True, False or a callable"),
]


def _ids(case) -> str:
    return f"{case[0]}={case[1]!r}"


def _given(setting: str, value, layers: dict) -> dict:
    """The keyword argument that carries ``setting``: itself, or the object holding it."""
    if setting in ("exclude", "min_params", "min_features"):
        return {"targets": Targets(**{**layers, setting: value})}
    if setting in ("max_samples", "sample_fraction", "max_bytes", "space"):
        return {"statistics": Statistics(**{setting: value})}
    return {setting: value}


def _refused(info, setting: str, value, rule: str) -> None:
    message = str(info.value)
    assert setting in message and repr(value) in message and rule in message, message


@pytest.mark.parametrize("setting,value,rule", SHARED + CALLBACK_ONLY, ids=[_ids(c) for c in SHARED + CALLBACK_ONLY])
def test_callback_refuses_a_bad_setting_when_built(setting, value, rule):
    with pytest.raises(ValueError) as info:
        LowRankFactorization({1: 0.5}, **{**TINY, **_given(setting, value, TINY_LAYERS)})
    _refused(info, setting, value, rule)


@pytest.mark.parametrize("setting,value,rule", SHARED + FACTORIZE_MODEL_ONLY, ids=[_ids(c) for c in SHARED + FACTORIZE_MODEL_ONLY])
def test_factorize_model_refuses_a_bad_setting_before_calibrating(setting, value, rule):
    with pytest.raises(ValueError) as info:
        factorize_model(mlp(), NeverIterated(), rank=8, speed_guard=False, **_given(setting, value, {}))
    _refused(info, setting, value, rule)


@pytest.mark.parametrize("old,value,rule", [("min_params", -5, ">= 0"), ("max_statistics_bytes", 0, ">= 1"),
                                            ("space", "output", "one of")])  # fmt: skip
def test_the_old_flat_names_warn_and_are_checked_the_same(old, value, rule):
    with pytest.warns(DeprecationWarning, match=rf"{old}= is deprecated.*pass (targets=Targets|statistics=Statistics)"):
        with pytest.raises(ValueError, match=rule):
            factorize_model(mlp(), NeverIterated(), rank=8, speed_guard=False, **{old: value})
    if old != "space":  # (factorize_model's only: the callback never had it)
        with pytest.warns(DeprecationWarning, match=rf"LowRankFactorization: {old}= is deprecated"):
            with pytest.raises(ValueError, match=rule):
                LowRankFactorization({1: 0.5}, verbose=False, **{old: value})


# (policy class, keyword arguments, setting named, bad value, words of the rule)
POLICIES = [
    (FixedRank, dict(rank=0), "rank", 0, "at least 1"),
    (FixedRank, dict(rank=1.5), "rank", 1.5, "(0, 1)"),
    (FixedRank, dict(rank="8"), "rank", "8", "int >= 1"),
    (MaxNMSE, dict(max_nmse=1.0), "max_nmse", 1.0, "[0, 1)"),
    (MaxNMSE, dict(max_nmse=-0.1), "max_nmse", -0.1, "[0, 1)"),
    (MaxNMSE, dict(max_nmse="0.1"), "max_nmse", "0.1", "[0, 1)"),
    (MaxNMSE, dict(max_nmse=math.nan), "max_nmse", math.nan, "[0, 1)"),
    (ParamBudget, dict(fraction=0.0), "param_budget", 0.0, "(0, 1]"),
    (ParamBudget, dict(fraction=1.5), "param_budget", 1.5, "(0, 1]"),
    (ParamBudget, dict(fraction=0.3, metric="flops"), "metric", "flops", "one of"),
    (ParamBudget, dict(fraction=0.3, n_probes=0), "n_probes", 0, ">= 1"),
    (ParamBudget, dict(fraction=0.3, n_probes=2.5), "n_probes", 2.5, "whole number"),
    (ParamBudget, dict(fraction=0.3, sensitivity="yes"), "sensitivity", "yes", "True or False"),
    (ParamBudget, dict(fraction=0.3, compare_uniform=2), "compare_uniform", 2, "True or False"),
]


@pytest.mark.parametrize("cls,kwargs,setting,value,rule", POLICIES, ids=[f"{c[0].__name__}-{_ids(c[2:])}" for c in POLICIES])
def test_policy_refuses_a_bad_setting_when_built(cls, kwargs, setting, value, rule):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    _refused(info, setting, value, rule)


# the scalar shortcuts: factorize_model(rank=...), a schedule's plain values read by mode
SHORTCUTS = [("rank", 0, "at least 1"), ("max_nmse", 1.5, "[0, 1)"), ("param_budget", 2.0, "(0, 1]")]


@pytest.mark.parametrize("setting,value,rule", SHORTCUTS, ids=[_ids(c) for c in SHORTCUTS])
def test_scalar_policy_shortcuts_are_refused_at_both_entry_points(setting, value, rule):
    with pytest.raises(ValueError) as info:
        factorize_model(mlp(), NeverIterated(), speed_guard=False, **{setting: value})
    _refused(info, setting, value, rule)
    with pytest.raises(ValueError) as info:
        LowRankFactorization({1: value}, mode=setting, **TINY)
    _refused(info, setting, value, rule)


@pytest.mark.parametrize("entry", ["callback", "factorize_model"])
def test_a_bad_speed_guard_is_refused_at_both_entry_points(entry):
    with pytest.raises((TypeError, ValueError), match="speed_guard"):
        if entry == "callback":
            LowRankFactorization({1: 0.5}, **{**TINY, "speed_guard": "fast"})
        else:
            factorize_model(mlp(), NeverIterated(), rank=8, speed_guard="fast")


def test_good_settings_pass_and_come_back_normalized():
    assert settings.check_min_params(1024.0) == 1024 and type(settings.check_min_params(1024.0)) is int
    assert settings.check_max_samples(None) is None and settings.check_max_samples(10) == 10
    assert settings.check_sample_fraction("auto") == "auto" and settings.check_sample_fraction(1) == 1.0
    assert settings.check_patterns("targets", "fc?") == ["fc?"] and settings.check_patterns("targets", None) is None
    assert settings.check_regularization(0) == 0.0
    # the defaults are unchanged and valid
    cb = LowRankFactorization({1: 0.5})
    assert (cb.min_params, cb.min_features, cb.max_samples, cb.sample_fraction) == (1024, 32, 100_000, "auto")
