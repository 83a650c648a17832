"""LightningCLI: every example YAML parses, one runs for a few batches, YAML mistakes are refused."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from factorize_plugin.integration.cli import run as main
from factorize_plugin.layers import FactorizedConv2d, FactorizedLinear

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
YAMLS = sorted(EXAMPLES.glob("*.yaml"))


def test_examples_exist():
    assert {p.name for p in YAMLS} >= {"mnist.yaml", "mnist_ddp.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_example_yaml_parses(path):
    out = subprocess.run(
        [sys.executable, "-m", "factorize_plugin", "fit", "--config", str(path), "--print_config"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    callbacks = printed["trainer"]["callbacks"]
    (fact,) = [c for c in callbacks if c["class_path"].endswith("LowRankFactorization")]
    assert {int(k): v for k, v in fact["init_args"]["schedule"].items()} == {2: 0.5, 4: 0.25}


def _tiny_config(tmp_path, **callback_args):
    cfg = yaml.safe_load((EXAMPLES / "mnist.yaml").read_text())
    cfg = copy.deepcopy(cfg)
    cfg["trainer"].update(
        max_epochs=2, limit_train_batches=3, limit_val_batches=2, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    cfg["model"]["init_args"].update(channels=[8, 16, 16], hidden=64)
    cfg["data"]["init_args"]["limit"] = 400
    cfg["trainer"]["callbacks"][0]["init_args"].update({"schedule": {1: 0.5}, "min_params": 256, **callback_args})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_runs_example_and_factorizes(tmp_path):
    cli = main(["fit", "--config", str(_tiny_config(tmp_path))])
    pairs = [m for m in cli.model.modules() if isinstance(m, (FactorizedLinear, FactorizedConv2d))]
    assert pairs, "the milestone at epoch 1 should have factorized layers"
    assert all(p.rank >= 1 for p in pairs)
    logged = (Path(cli.trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "factorize/params_kept" in logged and "val_acc" in logged


def _fails(tmp_path, capsys, **callback_args) -> str:
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["fit", "--config", str(_tiny_config(tmp_path, **callback_args))])
    return str(info.value) + capsys.readouterr().err


def test_unknown_argument_is_named(tmp_path, capsys):
    msg = _fails(tmp_path, capsys, rnak=3)
    assert "rnak" in msg


def test_float_rank_above_one_is_refused(tmp_path, capsys):
    msg = _fails(tmp_path, capsys, schedule={1: 1.5})
    assert "1.5" in msg and "(0, 1)" in msg


def test_rising_schedule_is_refused(tmp_path, capsys):
    msg = _fails(tmp_path, capsys, schedule={1: 0.25, 2: 0.5})
    assert "goes back up" in msg


def test_pattern_matching_nothing_fails_before_training(tmp_path, capsys):
    msg = _fails(tmp_path, capsys, targets=["encoder.*"])
    assert "encoder.*" in msg and "matches no module" in msg
    torch.manual_seed(0)  # (nothing trained: the error comes from setup)


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_other_subcommands_run(tmp_path, subcommand):
    cfg = yaml.safe_load(_tiny_config(tmp_path).read_text())
    cfg["trainer"].update(limit_test_batches=2, limit_predict_batches=2)
    path = tmp_path / f"{subcommand}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = main([subcommand, "--config", str(path)])
    assert cli.trainer.state.finished
    # outside fit the callback does nothing: the model stays dense
    assert not [m for m in cli.model.modules() if isinstance(m, (FactorizedLinear, FactorizedConv2d))]


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "factorize-plugin"  # the venv's bin, whether or not it is on PATH
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fit" in out.stdout
