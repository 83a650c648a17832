"""``benchmarks/bench_cnn_recover.py`` (issue 30, items 2 and 3): the pretrained MNIST CNN compressed and
recovered on its digits; the dry run covers every method in a few steps."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_cnn_recover as bench


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn_recover")
    return out, bench.main(["--dry-run", "--out", str(out)])


def test_every_method_is_measured_and_written(dry):
    out, result = dry
    assert json.loads((out / "cnn_recover.json").read_text())["cells"] == result["cells"]
    assert set(result["cells"]) == set(bench.METHODS)
    for method, by_fraction in result["cells"].items():
        for f, by_seed in by_fraction.items():
            for cell in by_seed.values():
                assert 0 <= cell["after"]["loss"] < 1 and 0.9 <= cell["after"]["accuracy"] <= 1
                if method != "dense_ft":
                    assert float(f) - 0.05 <= cell["kept_fraction"] <= float(f) + 1e-9


def test_the_callbacks_step_zero_switch_is_the_one_shot_and_progressive_applies_its_milestones(dry):
    _, result = dry
    one_shot, switch = result["cells"]["exact_budget_ft"]["0.2"]["0"], result["cells"]["callback_switch0"]["0.2"]["0"]
    assert switch["ranks"] == one_shot["ranks"] and switch["milestones"] == [0]
    assert switch["after"]["loss"] == pytest.approx(one_shot["after"]["loss"], rel=1e-5)
    progressive = result["cells"]["callback_progressive"]["0.2"]["0"]
    steps = result["setup"]["steps"]
    assert progressive["milestones"] == [0, steps // 3, 2 * steps // 3]


def test_the_summary_compares_progressive_with_compress_once_per_seed(dry):
    _, result = dry
    goal = result["summary"]["goals"]["0.2"]
    seed = goal["per_seed"]["0"]
    progressive = result["cells"]["callback_progressive"]["0.2"]["0"]["after"]
    one_shot = result["cells"]["exact_budget_ft"]["0.2"]["0"]["after"]
    assert seed["lower_loss"] == (progressive["loss"] < one_shot["loss"])
    assert goal["beats_one_shot_on_every_seed"] == seed["lower_loss"]
