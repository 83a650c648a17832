"""``progressive(target, epochs)`` (issue 30, item 1): equal-ratio schedules for every kind of
target, the per-layer path of an int rank, clear refusals, and the YAML form parsed by LightningCLI."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from factorize_plugin import FixedRank, LowRankFactorization, MaxNMSE, ParamBudget, Progressive, progressive
from factorize_plugin.layers.adapters import LayerView
from factorize_plugin.surgery.ranks.policies import GeometricRank
from factorize_plugin.surgery.ranks.policy_spec import policy_from_spec, policy_spec
from lightning_helpers import callback_from_yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
Q = 0.4 ** (1 / 3)


def view(d: int, m: int, rank=None) -> LayerView:
    return LayerView(in_dim=d, out_dim=m, rank_base=min(d, m), rank=rank, geometry=None)


def test_param_budget_in_equal_ratio_steps():
    schedule = progressive(ParamBudget(0.4, metric="macs", n_probes=3), [0, 1, 2])
    assert type(schedule) is dict and list(schedule) == [0, 1, 2]
    fractions = [p.fraction for p in schedule.values()]
    assert fractions == pytest.approx([0.7368, 0.5429, 0.4], abs=1e-4)
    assert fractions == pytest.approx([Q, Q**2, Q**3]) and fractions[-1] == 0.4  # the target exactly
    assert all(p.metric == "macs" and p.n_probes == 3 for p in schedule.values())  # the other fields kept


@pytest.mark.parametrize("target", [FixedRank(0.25), 0.25], ids=["FixedRank(0.25)", "scalar"])
def test_fractions_run_from_one(target):
    schedule = progressive(target, [6, 2, 4])  # keys sorted
    values = [v.rank if isinstance(v, FixedRank) else v for v in schedule.values()]
    assert list(schedule) == [2, 4, 6]
    assert values == pytest.approx([0.25 ** (1 / 3), 0.25 ** (2 / 3), 0.25])
    assert all(type(v) is type(target) for v in schedule.values())  # a scalar stays a scalar (read by mode)


@pytest.mark.parametrize("target", [FixedRank(8), 8], ids=["FixedRank(8)", "int"])
def test_int_rank_runs_from_each_layers_min_in_out(target):
    schedule = progressive(target, [0, 10, 20])
    assert list(schedule.values()) == [GeometricRank(8, 1, 3), GeometricRank(8, 2, 3), FixedRank(8)]
    chosen = lambda v: [p.choose({"x": SimpleNamespace(view=v)})["x"] for p in schedule.values()]  # noqa: E731
    assert chosen(view(256, 32)) == [20, 13, 8]  # 32 * (8/32)^(k/3)
    assert chosen(view(1024, 256)) == [81, 25, 8]  # 256 * (8/256)^(k/3): its own ratio
    assert chosen(view(4, 100)) == [None, None, None]  # min(in, out) <= 8 already: no change
    assert GeometricRank(8, 1, 3).planned_rank(view(4, 100)) == 4
    cb = LowRankFactorization(schedule, speed_guard=False)  # its order check accepts the path
    assert list(cb._policies) == [0, 10, 20]


def test_geometric_rank_is_plain_data_and_checked():
    g = GeometricRank(8, 2, 3)
    assert policy_from_spec(policy_spec(g)) == g
    assert policy_spec(g)["init_args"] == {"rank": 8, "step": 2, "steps": 3}
    for bad in (dict(rank=0.5, step=1, steps=2), dict(rank=8, step=3, steps=2), dict(rank=8, step=0, steps=2)):
        with pytest.raises(ValueError):
            GeometricRank(**bad)
    with pytest.raises(ValueError, match="goes back up at step 2"):
        LowRankFactorization({1: GeometricRank(8, 2, 3), 2: GeometricRank(8, 1, 3)}, interval="step")


def test_refusals():
    with pytest.raises(ValueError, match="no uncompressed end"):
        progressive(MaxNMSE(0.05), [0, 1])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        progressive(1.5, [0, 1])
    with pytest.raises(TypeError):
        progressive(True, [0, 1])
    with pytest.raises(ValueError, match="empty"):
        progressive(0.5, [])
    with pytest.raises(ValueError, match="twice"):
        progressive(0.5, [1, 1])
    with pytest.raises(ValueError, match="epochs"):
        progressive(0.5, [-1, 2])
    with pytest.raises(TypeError):
        progressive(0.5, "012")


def test_progressive_mapping_is_the_same_schedule():
    p = Progressive(ParamBudget(0.4), [0, 1, 2])
    assert dict(p) == progressive(ParamBudget(0.4), [0, 1, 2]) and len(p) == 3
    cb = LowRankFactorization(p, speed_guard=False)
    assert [q.fraction for q in cb._policies.values()] == pytest.approx([Q, Q**2, 0.4])


def test_progressive_in_yaml(tmp_path):
    budget = {"class_path": "factorize_plugin.ParamBudget", "init_args": {"fraction": 0.4, "metric": "macs"}}
    cb = callback_from_yaml(
        tmp_path, interval="step",
        schedule={"class_path": "factorize_plugin.Progressive", "init_args": {"target": budget, "epochs": [0, 50, 100]}},
    )  # fmt: skip
    assert cb.interval == "step" and list(cb._policies) == [0, 50, 100]
    assert [p.fraction for p in cb._policies.values()] == pytest.approx([Q, Q**2, 0.4])
    assert all(p.metric == "macs" for p in cb._policies.values())
    scalar = callback_from_yaml(
        tmp_path, schedule={"class_path": "factorize_plugin.Progressive", "init_args": {"target": 16, "epochs": [1, 3]}}
    )
    assert scalar.interval == "epoch" and scalar._policies == {1: GeometricRank(16, 1, 2), 3: FixedRank(16)}
    plain = callback_from_yaml(tmp_path, schedule={2: 0.5, 4: 0.25})  # the plain mapping still reads as before
    assert plain._policies == {2: FixedRank(0.5), 4: FixedRank(0.25)}
    with pytest.raises((SystemExit, ValueError)):
        callback_from_yaml(
            tmp_path,
            schedule={"class_path": "factorize_plugin.Progressive", "init_args": {
                "target": {"class_path": "factorize_plugin.MaxNMSE", "init_args": {"max_nmse": 0.1}}, "epochs": [0, 1],
            }},
        )  # fmt: skip


def test_cli_fit_with_a_progressive_step_schedule(tmp_path):
    """``factorize-plugin fit`` on examples/mnist.yaml (shrunk) with a ``Progressive`` schedule at
    optimizer steps 0 and 2 of a 4-batch epoch: both milestones apply, at their steps."""
    from factorize_plugin.integration.cli import run

    cfg = yaml.safe_load((EXAMPLES / "mnist.yaml").read_text())
    cfg["trainer"].update(
        max_epochs=1, limit_train_batches=4, limit_val_batches=2, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path), logger=False,
    )  # fmt: skip
    cfg["model"]["init_args"].update(channels=[8, 16, 16], hidden=64)
    cfg["data"]["init_args"]["limit"] = 400
    budget = {"class_path": "factorize_plugin.ParamBudget", "init_args": {"fraction": 0.5, "sensitivity": False}}
    cfg["trainer"]["callbacks"][0]["init_args"] = {
        "schedule": {"class_path": "factorize_plugin.Progressive", "init_args": {"target": budget, "epochs": [0, 2]}},
        "interval": "step", "targets": {"min_params": 256}, "speed_guard": False, "verbose": False,
    }  # fmt: skip
    path = tmp_path / "step.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = run(["fit", "--config", str(path)])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, LowRankFactorization)]
    assert cb.done == [0, 2]
    assert [(h["milestone"], h["global_step"]) for h in cb.history] == [(0, 0), (2, 2)]
    assert [h["value"]["init_args"]["fraction"] for h in cb.history] == pytest.approx([0.5**0.5, 0.5])
