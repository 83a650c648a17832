"""Rank policies are objects users pass from Python and write in YAML (class_path / init_args)."""

from pathlib import Path

import pytest

from factorize_plugin import FixedRank, LowRankFactorization, MaxNMSE, ParamBudget
from lightning_helpers import callback_from_yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_policy_objects_in_yaml(tmp_path):
    cb = callback_from_yaml(
        tmp_path,
        schedule={
            1: {"class_path": "factorize_plugin.FixedRank", "init_args": {"rank": 8}},
            2: {"class_path": "factorize_plugin.ParamBudget", "init_args": {"fraction": 0.3, "metric": "macs"}},
        },
    )
    assert cb._policies == {1: FixedRank(8), 2: ParamBudget(0.3, metric="macs")}


def test_yaml_policy_with_a_bad_value_is_refused(tmp_path):
    with pytest.raises((SystemExit, ValueError)):
        callback_from_yaml(tmp_path, schedule={1: {"class_path": "factorize_plugin.ParamBudget", "init_args": {"fraction": 1.5}}})


def test_python_schedule_mixes_policies_and_checks_their_order():
    cb = LowRankFactorization({1: FixedRank(16), 2: MaxNMSE(0.05), 3: 8})
    assert cb._policies == {1: FixedRank(16), 2: MaxNMSE(0.05), 3: FixedRank(8)}
    with pytest.raises(ValueError, match="goes back up at epoch 3"):
        LowRankFactorization({1: ParamBudget(0.3), 3: ParamBudget(0.5)})
    with pytest.raises(ValueError, match="goes back up at epoch 2"):
        LowRankFactorization({1: MaxNMSE(0.1), 2: MaxNMSE(0.01)})


def test_schedule_auto_in_yaml(tmp_path):
    from factorize_plugin import Readiness

    auto = {"class_path": "factorize_plugin.Auto", "init_args": {
        "target": {"class_path": "factorize_plugin.ParamBudget", "init_args": {"fraction": 0.3, "metric": "macs"}},
        "readiness": {"tolerance": 0.05, "latest": None},
    }}  # fmt: skip
    cb = callback_from_yaml(tmp_path, schedule=auto)
    assert cb.schedule == {} and cb._auto.target == ParamBudget(0.3, metric="macs")
    assert cb._auto.readiness == Readiness(tolerance=0.05, latest=None)
    default = callback_from_yaml(tmp_path, schedule="auto")  # no other knob needed
    assert default._auto.target == ParamBudget(0.5, metric="macs", sensitivity=False)
    assert default._auto.readiness == Readiness()
    with pytest.raises((SystemExit, ValueError)):
        callback_from_yaml(tmp_path, schedule={"class_path": "factorize_plugin.Auto",
                                               "init_args": {"readiness": {"tolerance": 2.0}}})  # fmt: skip
    # the old flat target= / readiness= beside schedule: auto still work, with a deprecation warning
    with pytest.warns(DeprecationWarning, match="is deprecated") as record:
        old = callback_from_yaml(tmp_path, schedule="auto", readiness={"tolerance": 0.05, "latest": None})
    assert any("readiness= is deprecated" in str(w.message) for w in record)
    assert old._auto.readiness == cb._auto.readiness
