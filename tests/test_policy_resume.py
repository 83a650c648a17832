"""Resume with policy-object schedules (issue 19): the callback's checkpointed state is plain data
(a policy as its class path and fields, no run state), carries a version, migrates the
version-less state of earlier releases, and ``trainer.fit(ckpt_path=...)`` resumes every policy
type under torch's default safe (weights_only) loading, from Python and from a YAML experiment."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from factorize_plugin import FixedRank, LowRankFactorization, MaxNMSE, ParamBudget
from factorize_plugin.engine.schedule import plain_value
from factorize_plugin.integration.cli import run as cli_main
from factorize_plugin.layers import FactorizedConv2d, FactorizedLinear
from factorize_plugin.surgery.ranks.policy_spec import policy_from_spec, policy_spec
from lightning_helpers import TINY, Probe, TinyNet, max_abs_diff, resume_trainer, state_dict_cpu, structure

MAX_EPOCHS = 4
SCHEDULES = {
    "FixedRank": {1: FixedRank(8), 2: FixedRank(4)},
    "MaxNMSE": {1: MaxNMSE(0.02), 2: MaxNMSE(0.1)},
    "ParamBudget": {1: ParamBudget(0.6, n_probes=3), 2: ParamBudget(0.3, n_probes=3)},
}
SPECS = {
    "FixedRank": {"class_path": "factorize_plugin.FixedRank", "init_args": {"rank": 8}},
    "MaxNMSE": {"class_path": "factorize_plugin.MaxNMSE", "init_args": {"max_nmse": 0.02}},
    "ParamBudget": {
        "class_path": "factorize_plugin.ParamBudget",
        "init_args": {"fraction": 0.6, "metric": "params", "sensitivity": True, "n_probes": 3, "compare_uniform": True},
    },
}


def fit(schedule, ckpt_dir=None, ckpt_path=None):
    pl.seed_everything(0)
    model = TinyNet(shuffle="epoch_seeded")
    cb = LowRankFactorization(copy.deepcopy(schedule), **TINY)
    probe = Probe()
    callbacks = [cb, probe]
    trainer = resume_trainer(callbacks, MAX_EPOCHS, ckpt_dir)
    trainer.fit(model, ckpt_path=ckpt_path)  # Lightning's default loading: torch's weights_only unpickler
    return model, cb, probe


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_resume_with_policy_objects_under_safe_loading(kind, tmp_path):
    schedule = SCHEDULES[kind]
    model, cb, probe = fit(schedule, ckpt_dir=tmp_path)
    assert cb.done == [1, 2]
    ckpt = tmp_path / "epoch=1.ckpt"  # after the first milestone: its history holds the policy
    saved = torch.load(ckpt, weights_only=True)  # plain data only
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("LowRankFactorization")]
    assert state["version"] == LowRankFactorization.STATE_VERSION
    assert state["history"][0]["value"] == SPECS[kind]  # class path and fields, no run state (last_plan)

    resumed_model, resumed, resumed_probe = fit(schedule, ckpt_path=ckpt)
    # the structure right after the resume is the one saved; the schedule continues from there,
    # no milestone repeated or skipped
    assert resumed_probe.start == {e: probe.start[e] for e in range(2, MAX_EPOCHS)}
    assert resumed.done == [1, 2] and [h["milestone"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == cb.history[0]
    assert resumed.ranks == cb.ranks and structure(resumed_model) == structure(model)
    assert max_abs_diff(state_dict_cpu(resumed_model), state_dict_cpu(model)) <= 1e-6


def test_state_dict_is_plain_data_with_a_version():
    cb = LowRankFactorization({1: ParamBudget(0.5), 2: 0.25}, **TINY)
    cb.history = [{"milestone": e, "value": plain_value(v)} for e, v in cb.schedule.items()]
    state = cb.state_dict()
    assert state["version"] == LowRankFactorization.STATE_VERSION
    assert state["history"][0]["value"]["class_path"] == "factorize_plugin.ParamBudget"
    assert state["history"][1]["value"] == 0.25
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == state


# ----------------------------------------------------------------------------- migration
OLD_STATE = {  # what LowRankFactorization.state_dict() wrote before it had a version
    "done": [1],
    "ranks": {"features.2": 4, "classifier.0": 16, "classifier.2": 5},
    "history": [
        {
            "epoch": 1, "milestone": 1, "value": 0.5,
            "ranks": {"features.2": 4, "classifier.0": 16, "classifier.2": 5},
            "nmse": {"features.2": 0.01, "classifier.0": 0.02, "classifier.2": 0.03},
            "samples": {"features.2": 100, "classifier.0": 100, "classifier.2": 100},
            "speedup": {}, "notes": {}, "statistics": "validation",
        }
    ],
    "param_groups": None,
    "targets": ["features.2", "classifier.0", "classifier.2"],
}  # fmt: skip


def test_old_version_less_state_migrates():
    cb = LowRankFactorization({1: 0.5, 2: 0.25}, **TINY)
    cb.load_state_dict(copy.deepcopy(OLD_STATE))
    assert cb.done == [1] and cb.ranks == OLD_STATE["ranks"] and cb.history == OLD_STATE["history"]
    state = cb.state_dict()
    assert state["version"] == LowRankFactorization.STATE_VERSION
    assert state["history"] == OLD_STATE["history"] and state["done"] == [1]


def test_old_state_with_a_policy_object_migrates_to_its_spec():
    """A checkpoint written before the fix holds the policy object itself (loadable only with
    weights_only=False): migration turns it into its class path and fields, dropping run state."""
    old = copy.deepcopy(OLD_STATE)
    policy = ParamBudget(0.5)
    policy.last_plan = "run state"
    old["history"][0]["value"] = policy
    cb = LowRankFactorization({1: ParamBudget(0.5)}, **TINY)
    cb.load_state_dict(old)
    assert cb.history[0]["value"]["class_path"] == "factorize_plugin.ParamBudget"
    assert cb.history[0]["value"]["init_args"]["fraction"] == 0.5
    assert "last_plan" not in cb.history[0]["value"]["init_args"]


def test_a_state_from_a_newer_release_is_refused():
    cb = LowRankFactorization({1: 0.5}, **TINY)
    with pytest.raises(ValueError, match="version"):
        cb.load_state_dict({**OLD_STATE, "version": LowRankFactorization.STATE_VERSION + 1})


def test_old_checkpoint_resumes(tmp_path):
    """A whole checkpoint in the old format (version-less callback state) resumes."""
    model, cb, probe = fit({1: 0.5, 2: 0.25}, ckpt_dir=tmp_path)
    ckpt = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    for key, state in ckpt["callbacks"].items():
        if key.startswith("LowRankFactorization"):
            state.pop("version")
    torch.save(ckpt, tmp_path / "old.ckpt")
    resumed_model, resumed, resumed_probe = fit({1: 0.5, 2: 0.25}, ckpt_path=tmp_path / "old.ckpt")
    assert resumed_probe.start == {e: probe.start[e] for e in range(2, MAX_EPOCHS)}
    assert resumed.done == [1, 2] and resumed.history[0] == cb.history[0]
    assert [h["milestone"] for h in resumed.history] == [1, 2] and resumed.ranks == cb.ranks
    assert max_abs_diff(state_dict_cpu(resumed_model), state_dict_cpu(model)) <= 1e-6


# ----------------------------------------------------------------------------- YAML
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _yaml(tmp_path, max_epochs: int, name: str) -> Path:
    cfg = yaml.safe_load((EXAMPLES / "mnist.yaml").read_text())
    cfg["trainer"].update(
        max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=2, enable_progress_bar=False,
        enable_model_summary=False, logger=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    cfg["model"]["init_args"].update(channels=[8, 16, 16], hidden=64)
    cfg["data"]["init_args"]["limit"] = 400
    cfg["trainer"]["callbacks"][0]["init_args"].update(
        schedule={
            1: {"class_path": "factorize_plugin.ParamBudget", "init_args": {"fraction": 0.5, "sensitivity": False}},
            2: {"class_path": "factorize_plugin.FixedRank", "init_args": {"rank": 4}},
        },
        targets={"min_params": 256}, speed_guard=False,
    )  # fmt: skip
    cfg["trainer"]["callbacks"].append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "{epoch}", "save_top_k": -1},
        }
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ranks(model) -> dict:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, (FactorizedLinear, FactorizedConv2d))}


def test_yaml_experiment_with_policy_schedule_resumes(tmp_path):
    full = cli_main(["fit", "--config", str(_yaml(tmp_path / "full", 3, "full"))])
    first = cli_main(["fit", "--config", str(_yaml(tmp_path / "part", 2, "part"))])
    (cb_first,) = [c for c in first.trainer.callbacks if isinstance(c, LowRankFactorization)]
    assert cb_first.done == [1]
    ckpt = tmp_path / "part" / "ckpt" / "epoch=1.ckpt"
    resumed = cli_main(["fit", "--config", str(_yaml(tmp_path / "resume", 3, "resume")), "--ckpt_path", str(ckpt)])
    (cb_full,) = [c for c in full.trainer.callbacks if isinstance(c, LowRankFactorization)]
    (cb,) = [c for c in resumed.trainer.callbacks if isinstance(c, LowRankFactorization)]
    assert cb.done == [1, 2] and [h["milestone"] for h in cb.history] == [1, 2]
    assert cb.history[0] == cb_first.history[0]  # restored as saved
    assert cb.history[0]["ranks"] == cb_full.history[0]["ranks"]
    assert cb.history[0]["value"]["class_path"] == "factorize_plugin.ParamBudget"
    assert cb.history[0]["value"]["init_args"]["fraction"] == 0.5
    # the second milestone (FixedRank(4)) acts on the restored structure as in the uninterrupted run
    assert cb.ranks == cb_full.ranks and _ranks(resumed.model) == _ranks(full.model) and _ranks(resumed.model)


@pytest.mark.parametrize("policy", [FixedRank(8), FixedRank(0.25), MaxNMSE(0.05), ParamBudget(0.3, metric="macs", n_probes=2)], ids=repr)
def test_policy_spec_round_trip(policy):
    spec = policy_spec(policy)
    assert spec["class_path"] == f"factorize_plugin.{type(policy).__name__}"
    assert policy_from_spec(spec) == policy


def test_policy_spec_refuses_what_is_not_a_policy():
    with pytest.raises(ValueError, match="does not name a RankPolicy"):
        policy_from_spec({"class_path": "collections.OrderedDict", "init_args": {}})


def test_state_dict_turns_numbers_plain_and_names_what_cannot_be_saved():
    import numpy as np

    cb = LowRankFactorization({1: 0.5}, **TINY)
    cb.history = [{"milestone": 1, "nmse": {"fc": np.float64(0.25)}, "samples": {"fc": torch.tensor(7)}}]
    state = cb.state_dict()
    assert type(state["history"][0]["nmse"]["fc"]) is float and state["history"][0]["samples"]["fc"] == 7
    cb.history[0]["extra"] = object()
    with pytest.raises(TypeError, match=r"history\[0\]\['extra'\] holds a object.*weights_only"):
        cb.state_dict()
