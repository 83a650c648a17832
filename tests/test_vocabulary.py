"""One vocabulary for the three doors (issue 32, item 1): the same argument name means the same
thing at the callback, the engine and ``factorize_model``, its defaults are written once
(``surgery/arguments.py``, where they differ on purpose, with why), every argument has one help
text, and an old name keeps working for one release with a ``DeprecationWarning``."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn

from factorize_plugin import (
    FactorizationEngine,
    LowRankFactorization,
    ParamBudget,
    Statistics,
    Targets,
    factorize_model,
)
from factorize_plugin.surgery.arguments import DEFAULTS, HELP, RENAMED


def signature_defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n != "self"}


def test_defaults_are_written_once_and_differ_only_where_the_table_says():
    callback, engine = signature_defaults(LowRankFactorization), signature_defaults(FactorizationEngine)
    one_shot = signature_defaults(factorize_model)
    for name, d in DEFAULTS.items():
        if name in ("max_samples", "sample_fraction"):  # fields of Statistics, resolved per door
            assert getattr(Statistics().at("training"), name) == d.training, name
            assert getattr(Statistics().at("one_shot"), name) == d.one_shot, name
            assert getattr(LowRankFactorization({1: 0.5}).statistics, name) == getattr(FactorizationEngine().statistics, name)
        else:
            assert engine[name] == d.training, name
        assert callback[name] == d.training and one_shot[name] == d.one_shot, name  # (as deprecated flat names too)
        assert d.training != d.one_shot and d.why
    shared = (set(callback) & set(one_shot)) - set(DEFAULTS) - {"speed_guard"}  # speed_guard: "auto" in both
    assert {n: callback[n] for n in shared} == {n: one_shot[n] for n in shared}
    assert all(engine[n] == callback[n] for n in engine if n != "schedule")  # the engine is the callback's door


def test_every_argument_of_the_training_doors_has_one_help_text():
    names = set(signature_defaults(LowRankFactorization)) | set(signature_defaults(FactorizationEngine))
    assert names <= set(HELP)
    for cls in (LowRankFactorization, FactorizationEngine):
        doc = inspect.getdoc(cls) or ""
        assert all(f"{n}: {HELP[n]}" in doc for n in signature_defaults(cls)), cls  # (LightningCLI's --help)


def test_an_old_name_still_works_with_a_deprecation_warning():
    assert RENAMED == {"sensitivity_batches": "budget_batches"}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))
    data = [torch.randn(16, 32) for _ in range(4)]
    kwargs = dict(policy=ParamBudget(0.5), targets=Targets(min_params=0, min_features=0), speed_guard=False)
    new, old = copy.deepcopy(model), copy.deepcopy(model)
    reports = factorize_model(new, data, budget_batches=2, **kwargs)
    with pytest.warns(DeprecationWarning, match=r"sensitivity_batches= is renamed budget_batches="):
        old_reports = factorize_model(old, data, sensitivity_batches=2, **kwargs)
    assert [r.new_rank for r in reports] == [r.new_rank for r in old_reports]
    with pytest.raises(ValueError, match="pass only budget_batches="):
        factorize_model(copy.deepcopy(model), data, budget_batches=2, sensitivity_batches=2, **kwargs)


def test_budget_batches_zero_means_the_same_at_every_door():
    """0: a ParamBudget allocates by the layers' NMSE alone, as ``ParamBudget(..., sensitivity=False)``."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    data = [torch.randn(32, 32) for _ in range(4)]
    common = dict(targets=Targets(min_params=0, min_features=0), speed_guard=False)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    zero = factorize_model(a, data, policy=ParamBudget(0.4), budget_batches=0, **common)
    nmse_only = factorize_model(b, data, policy=ParamBudget(0.4, sensitivity=False), **common)
    assert [r.new_rank for r in zero] == [r.new_rank for r in nmse_only]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
