"""LightningCLI: every example YAML parses, one runs for a few batches, YAML mistakes are refused."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from factorize_plugin import FixedRank, Readiness, Statistics, Targets
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
    (written,) = [c for c in yaml.safe_load(path.read_text())["trainer"]["callbacks"]
                  if c["class_path"].endswith("LowRankFactorization")]  # fmt: skip
    assert {int(k): v for k, v in fact["init_args"]["schedule"].items()} == written["init_args"]["schedule"]


@pytest.mark.slow
def test_fsdp_example_runs_on_two_processes(tmp_path):
    """examples/gpt_fsdp.yaml, made tiny: ModelParallelStrategy on 2 gloo processes, step milestones."""
    cfg = yaml.safe_load((EXAMPLES / "gpt_fsdp.yaml").read_text())
    cfg["trainer"].update(max_steps=6, val_check_interval=2, limit_val_batches=1, logger=False,
                          enable_progress_bar=False, default_root_dir=str(tmp_path))  # fmt: skip
    cfg["trainer"]["callbacks"][0]["init_args"].update(schedule={2: 0.5, 4: 0.25}, verbose=True)
    cfg["model"]["init_args"].update(dim=32, layers=1, heads=2, block=16, batch_size=4, max_steps=6,
                                     train_windows=48, val_windows=16, corpus_bytes=100_000)  # fmt: skip
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "factorize_plugin", "fit", "--config", str(path)],
        capture_output=True, text=True, timeout=300, cwd=EXAMPLES.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "the speed decision is off under FSDP2" in log
    assert "LowRankFactorization, epoch 0, step 2" in log and "LowRankFactorization, epoch 0, step 4" in log


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
    # speed_guard off: the structure asserted must not depend on this machine's timings
    cfg["trainer"]["callbacks"][0]["init_args"].update(
        {"schedule": {1: 0.5}, "targets": {"min_params": 256}, "speed_guard": False, **callback_args}
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
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


def test_cli_reads_rewarm_steps(tmp_path):
    cli = main(["fit", "--config", str(_tiny_config(tmp_path, rewarm_steps=2))])
    (fact,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "LowRankFactorization"]
    assert fact.rewarm_steps == 2 and fact.history[-1]["rewarm_steps"] == 2


def _callback(cli):
    (fact,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "LowRankFactorization"]
    return fact


def test_cli_reads_the_grouped_arguments_and_still_the_old_flat_names(tmp_path):
    grouped = _callback(main(["fit", "--config", str(_tiny_config(tmp_path, statistics={"max_samples": 500}))]))
    assert grouped.targets == Targets(min_params=256)
    assert grouped.statistics == Statistics(max_samples=500).at("training")
    old = _tiny_config(tmp_path / "old", targets=None, statistics=None, min_params=256, max_samples=500)
    with pytest.warns(DeprecationWarning, match="is deprecated") as record:
        flat = _callback(main(["fit", "--config", str(old)]))
    ours = [str(w.message) for w in record if "(it goes in the next release)" in str(w.message)]
    assert sorted(m.split(": ")[1].split("=")[0] for m in ours) == ["max_samples", "min_params"]
    assert (flat.targets, flat.statistics, flat.ranks) == (grouped.targets, grouped.statistics, grouped.ranks)


def test_cli_reads_an_auto_schedule(tmp_path):
    auto = {"class_path": "factorize_plugin.Auto", "init_args": {"target": 0.5, "readiness": {"patience": 2}}}
    cfg = yaml.safe_load(_tiny_config(tmp_path, schedule=auto).read_text())
    cfg["trainer"]["max_epochs"] = 1
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(cfg))
    fact = _callback(main(["fit", "--config", str(path)]))
    assert fact._auto.target == FixedRank(0.5) and fact._auto.readiness == Readiness(patience=2)


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


# ------------------------------------------------- the console script as users run it (issue 12)
MY_TASK = '''
import torch, torch.nn as nn, torch.nn.functional as F
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset


class Net(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Data(pl.LightningDataModule):
    def __init__(self, n: int = 128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 32, generator=g)
        self.ds = TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=32)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=32)
'''


def _my_task_config(tmp_path) -> Path:
    (tmp_path / "my_task.py").write_text(MY_TASK)
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "factorize_plugin.LowRankFactorization", "init_args": {
                "schedule": {1: 0.25}, "targets": {"include": "net.0", "min_params": 0, "min_features": 0},
                "speed_guard": False,
            }}],
        },
        "model": {"class_path": "my_task.Net"},
        "data": {"class_path": "my_task.Data"},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def console_fit(tmp_path_factory):
    """``factorize-plugin fit --config config.yaml`` run from a directory holding ``my_task.py``."""
    tmp_path = tmp_path_factory.mktemp("console")
    script = Path(sys.executable).parent / "factorize-plugin"
    config = _my_task_config(tmp_path)
    out = subprocess.run(
        [str(script), "fit", "--config", config.name], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    return out, tmp_path


def test_console_script_fit_exits_0_and_imports_from_the_current_directory(console_fit):
    out, tmp_path = console_fit
    # exit status 0 and no "<...FactorizeCLI object at 0x...>" (main() returning the CLI object
    # made the console-script wrapper print it and exit 1); my_task.py found in the cwd
    assert out.returncode == 0, out.stderr[-3000:]
    assert "object at 0x" not in out.stdout + out.stderr
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))


def test_cli_checkpoint_loads_with_load_factorized_checkpoint(console_fit, monkeypatch):
    """LightningCLI stores ``_class_path`` / ``_instantiator`` in the hyperparameters; the loader
    builds the class through them (also given a base class), then gets the factorized structure."""
    out, tmp_path = console_fit
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    hparams = torch.load(path, weights_only=False)["hyper_parameters"]
    assert hparams["_class_path"] == "my_task.Net"
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    my_task = importlib.import_module("my_task")
    from lightning.pytorch import LightningModule

    from factorize_plugin import load_factorized_checkpoint

    for cls in (my_task.Net, LightningModule):
        model = load_factorized_checkpoint(cls, str(path))
        assert type(model) is my_task.Net
        assert isinstance(model.net[0], FactorizedLinear) and model.net[0].rank == 8  # 0.25 of min(32, 64)
        assert isinstance(model.net[2], torch.nn.Linear)  # not targeted: dense


def test_help_says_what_the_tool_does_with_an_example():
    script = Path(sys.executable).parent / "factorize-plugin"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "LowRankFactorization" in out.stdout and "low-rank" in out.stdout
    assert "factorize-plugin fit --config examples/mnist.yaml" in out.stdout
    assert "Lightning Trainer command line tool" not in out.stdout


def test_callback_arguments_have_help_text(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.callbacks.help", "factorize_plugin.LowRankFactorization"])
    text = " ".join(capsys.readouterr().out.split())
    for arg, words in {
        "targets": "which layers: fnmatch patterns over qualified module names",
        "statistics": "how each layer's inputs are summarized",
        "exclude": "deprecated (goes in the next release): pass targets=Targets(exclude=...)",
        "min_params": "deprecated (goes in the next release): pass targets=Targets(min_params=...)",
    }.items():
        assert f"--trainer.callbacks.{arg}" in text
        help_text = text.split(f"--trainer.callbacks.{arg} {arg.upper()}", 2)[-1][:400]
        assert words in help_text, arg
