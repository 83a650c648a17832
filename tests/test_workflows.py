"""Everyday Lightning workflows around a model whose structure changes (issue 12): checkpoints of
another structure in every entry point, resume with an edited schedule or targets, optimizers
that cache their parameters, frozen submodules, a reused callback, a missing validation loader."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from factorize_plugin import LowRankFactorization, Targets, factorize_model, load_factorized, load_factorized_checkpoint
from factorize_plugin.layers import FactorizedLinear
from lightning_helpers import TARGETS, TINY, Probe, TinyNet, max_abs_diff, state_dict_cpu, structure, tiny

DENSE = dict.fromkeys(TARGETS)
R1 = {"features.2": 4, "classifier.0": 16, "classifier.2": 5}  # {..: 0.5}
R2 = {"features.2": 2, "classifier.0": 8, "classifier.2": 2}  # {..: 0.25}


def trainer_for(callbacks, tmp_path=None, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=tmp_path is not None,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, default_root_dir=tmp_path,
    )  # fmt: skip
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


class EpochLogged(TinyNet):
    """Logs ``val_epoch`` = the epoch: with ``mode="min"`` the best checkpoint is epoch 0's (dense)."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_epoch", float(self.current_epoch))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self.val_dataloader()

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


# ------------------------------------------------- checkpoints of another structure
@pytest.fixture(scope="module")
def two_milestones(tmp_path_factory):
    """fit with {1: 0.5, 2: 0.25}, one checkpoint per epoch plus best (epoch 0, dense) and last."""
    tmp = tmp_path_factory.mktemp("two_milestones")
    pl.seed_everything(0)
    model = EpochLogged()
    cb = LowRankFactorization({1: 0.5, 2: 0.25}, **TINY)
    every = ModelCheckpoint(dirpath=tmp, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    best = ModelCheckpoint(dirpath=tmp / "best", monitor="val_epoch", mode="min", save_top_k=1, save_last=True)
    trainer = trainer_for([cb, best, every], tmp, max_epochs=3)  # "best" and "last" come from the first
    trainer.fit(model)
    assert structure(model) == R2
    return dict(model=model, trainer=trainer, best=best, ckpt={e: tmp / f"epoch={e}.ckpt" for e in range(3)})


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("entry", ["validate", "test", "predict"])
def test_every_entry_point_loads_a_checkpoint_of_another_structure(two_milestones, entry):
    model, trainer, best = two_milestones["model"], two_milestones["trainer"], two_milestones["best"]
    assert "epoch=0" in best.best_model_path  # the best epoch came before the first milestone
    run = getattr(trainer, entry)
    kw = {"verbose": False} if entry != "predict" else {}
    # "last" (here written with the best, before the milestone) then the final and a middle one
    for ckpt_path, want in [("best", DENSE), ("last", DENSE), (two_milestones["ckpt"][2], R2), (two_milestones["ckpt"][1], R1)]:
        run(model, ckpt_path=str(ckpt_path), **kw)
        assert structure(model) == want, ckpt_path
        path = {"best": best.best_model_path, "last": best.last_model_path}.get(ckpt_path, ckpt_path)
        assert max_abs_diff(state_dict_cpu(model), _weights(path)) == 0.0


@pytest.mark.parametrize("epoch,want", [(0, DENSE), (1, R1), (2, R2)])
def test_loaders_give_the_structure_the_checkpoint_holds(two_milestones, epoch, want):
    path = two_milestones["ckpt"][epoch]
    for start in ("dense", "factorized"):
        target = EpochLogged()
        if start == "factorized":  # already factorized at other ranks than the checkpoint's
            load_factorized(target, _weights(two_milestones["ckpt"][2 if epoch != 2 else 1]))
        loaded = load_factorized(target, str(path))
        assert structure(loaded) == want, start
        assert max_abs_diff(state_dict_cpu(loaded), _weights(path)) == 0.0
    assert structure(load_factorized_checkpoint(EpochLogged, str(path))) == want


# ------------------------------------------------------- resume with an edited schedule / targets
def _fit(model, cb, tmp_path=None, ckpt_path=None, max_epochs=4, extra=()):
    probe = Probe()
    callbacks = [cb, probe, *extra]
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1))
    trainer = trainer_for(callbacks, tmp_path, max_epochs=max_epochs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, probe


def _seeded_model() -> TinyNet:
    pl.seed_everything(0)
    return TinyNet(shuffle="epoch_seeded", optimizer="adam", scheduler="step")


def test_resume_with_an_extended_schedule_matches_the_uninterrupted_run(tmp_path):
    """{1: 0.5} for two epochs, then resumed with {1: 0.5, 3: 0.25}: the same state key, the
    param-group order restored (Adam continues on the right tensors), milestone 1 kept, milestone 3
    applied: bit-identical to a run with {1: 0.5, 3: 0.25} from the start."""
    extended = {1: 0.5, 3: 0.25}
    ref_model = _seeded_model()
    _, ref_probe = _fit(ref_model, LowRankFactorization(extended, **TINY), max_epochs=5)
    first = LowRankFactorization({1: 0.5}, **TINY)
    assert first.state_key == LowRankFactorization(extended, **TINY).state_key
    _fit(_seeded_model(), first, tmp_path, max_epochs=2)
    resumed = LowRankFactorization(extended, **TINY)
    model = _seeded_model()
    trainer, probe = _fit(model, resumed, ckpt_path=tmp_path / "epoch=1.ckpt", max_epochs=5)
    assert probe.start == {2: R1, 3: R2, 4: R2}
    assert resumed.done == [1, 3] and [h["epoch"] for h in resumed.history] == [1, 3]
    assert max_abs_diff(state_dict_cpu(model), state_dict_cpu(ref_model)) <= 1e-6
    # Adam continued: at the resumed first epoch the untouched parameters' step counts go on
    assert probe.adam_start[2]["features.0.weight"][0] == ref_probe.adam_start[2]["features.0.weight"][0] == 16


def test_new_milestone_before_the_resumed_epoch_is_applied_at_the_next_epoch_start(tmp_path):
    _fit(_seeded_model(), LowRankFactorization({1: 0.5}, **TINY), tmp_path, max_epochs=3)
    cb = LowRankFactorization({1: 0.5, 2: 0.25}, **TINY)
    with pytest.warns(UserWarning, match=r"milestone\(s\) \[2\] were not applied when due"):
        _, probe = _fit(_seeded_model(), cb, ckpt_path=tmp_path / "epoch=2.ckpt", max_epochs=5)
    assert probe.start == {3: R2, 4: R2}  # milestone 1 kept (not repeated), 2 applied late, once
    assert cb.done == [1, 2] and [(h["milestone"], h["epoch"]) for h in cb.history] == [(1, 1), (2, 3)]


@pytest.mark.parametrize("change", ["fewer targets", "same name, fewer targets"])
def test_changed_targets_touching_factorized_layers_stop_before_training(tmp_path, change):
    kw = dict(name="lr") if "name" in change else {}
    _fit(_seeded_model(), LowRankFactorization({1: 0.5}, **kw, **TINY), tmp_path, max_epochs=2)
    cb = LowRankFactorization({1: 0.5, 3: 0.25}, **kw, **tiny(["classifier.*"]))
    steps = []
    counter = pl.Callback()
    counter.on_train_batch_start = lambda *a: steps.append(1)
    # without a name the state key follows the targets: the old state is found under another key
    want = r"\['features\.2'\] would no longer be managed" if kw else r"layers \['classifier\.0', 'classifier\.2'\].*stored under"
    with pytest.raises(ValueError, match=want):
        _fit(_seeded_model(), cb, ckpt_path=tmp_path / "epoch=1.ckpt", max_epochs=5, extra=[counter])
    assert not steps  # refused before any training step


def test_added_dense_target_on_resume_is_fine(tmp_path):
    """Widening the targets by a layer that is still dense touches no factorized layer."""
    _fit(_seeded_model(), LowRankFactorization({1: 0.5}, name="n", **tiny(["classifier.0"])), tmp_path, max_epochs=2)
    cb = LowRankFactorization({1: 0.5, 3: 0.25}, name="n", **tiny(["classifier.*"]))
    _, probe = _fit(_seeded_model(), cb, ckpt_path=tmp_path / "epoch=1.ckpt", max_epochs=4, extra=[])
    assert probe.start[3]["classifier.0"] == 8 and probe.start[3]["classifier.2"] == 2


# ------------------------------------------------------------------- Lightning settings
def test_no_validation_loader_is_refused_at_setup_naming_the_callback():
    steps = []
    counter = pl.Callback()
    counter.on_train_batch_start = lambda *a: steps.append(1)
    model = TinyNet()
    model.val_dataloader = None  # no validation loader at all
    trainer = trainer_for([LowRankFactorization({1: 0.5}, **TINY), counter], max_epochs=2)
    with pytest.raises(RuntimeError, match="LowRankFactorization needs validation data.*val_dataloader"):
        trainer.fit(model, train_dataloaders=model.train_dataloader())
    assert not steps  # at setup, not after epoch 0


class LBFGSNet(pl.LightningModule):
    """A one-group model trained by LBFGS (which keeps its parameter list and a flat history)."""

    def __init__(self, optimizer: str = "lbfgs") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 4))
        self.optimizer = optimizer
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 32, generator=g)
        self.data = TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=32)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=48)

    def configure_optimizers(self):
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3, history_size=4)
        return CopyingSGD(self.parameters(), lr=0.1)


class CopyingSGD(torch.optim.SGD):
    """An optimizer that caches its own copy of the parameter list (and steps through it)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.cached = list(self.param_groups[0]["params"])


class Snapshots(pl.Callback):
    def __init__(self, name):
        self.name, self.start, self.end = name, {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.start[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.get_submodule(self.name).named_parameters()}

    def on_train_epoch_end(self, trainer, pl_module):
        self.end[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.get_submodule(self.name).named_parameters()}


@pytest.mark.parametrize("target,rank", [("net.0", 8), ("net.2", 2)])
def test_lbfgs_updates_the_factorized_layer(target, rank):
    """LBFGS steps through ``_params`` (the group's own list, edited in place) and keys its flat
    history on the first parameter: with ``net.2`` swapped that history is for the old sizes."""
    model, snaps = LBFGSNet(), Snapshots(target)
    cb = LowRankFactorization({1: rank}, **tiny(target))
    trainer = trainer_for([cb, snaps], max_epochs=3)
    trainer.fit(model)
    assert isinstance(model.get_submodule(target), FactorizedLinear) and model.get_submodule(target).rank == rank
    for epoch in (1, 2):  # the new factors move during training (LBFGS steps them)
        start, end = snaps.start[epoch], snaps.end[epoch]
        assert set(start) == {"first.weight", "second.weight", "second.bias"}
        assert all((start[k] - end[k]).abs().max() > 1e-6 for k in start), epoch
    opt = trainer.optimizers[0]
    assert opt._params is opt.param_groups[0]["params"]
    assert [id(p) for p in opt._params] == [id(p) for p in model.parameters()]


def test_optimizer_copying_its_parameters_is_refused_before_training():
    steps = []
    counter = pl.Callback()
    counter.on_train_batch_start = lambda *a: steps.append(1)
    trainer = trainer_for([LowRankFactorization({1: 8}, **tiny("net.0")), counter], max_epochs=2)
    with pytest.raises(ValueError, match="CopyingSGD keeps its parameters in `cached`"):
        trainer.fit(LBFGSNet(optimizer="copying"))
    assert not steps


class FrozenBNNet(TinyNet):
    """TinyNet with a BatchNorm kept frozen (eval mode, no grad) inside a training model."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.bn = nn.BatchNorm1d(256)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.1)
        self.bn.eval().requires_grad_(False)

    def forward(self, x):
        return self.classifier(self.bn(self.features(x).flatten(1)))

    def on_train_epoch_start(self):
        assert not self.bn.training


def test_calibration_keeps_a_frozen_batchnorm_frozen():
    """The key-0 calibration (and a re-collection) runs the model in eval mode and gives every
    submodule its own mode back: the frozen BatchNorm stays in eval, its statistics unchanged."""
    model = FrozenBNNet()
    cb = LowRankFactorization({0: 0.5}, **TINY)
    trainer_for([cb], max_epochs=1, limit_train_batches=2).fit(model)
    assert cb.history[0]["statistics"] == "calibration"
    assert not model.bn.training and model.classifier.training
    assert torch.all(model.bn.running_mean == 0.1) and int(model.bn.num_batches_tracked) == 0


def test_factorize_model_keeps_a_frozen_batchnorm_frozen():
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16)).train()
    model[1].eval()
    batches = [torch.randn(32, 16) for _ in range(4)]
    factorize_model(model, batches, rank=4, targets=Targets(min_params=0, min_features=0))
    assert model.training and model[0].training and not model[1].training
    assert int(model[1].num_batches_tracked) == 0


def test_second_fit_on_a_fresh_model_starts_the_schedule_over():
    cb = LowRankFactorization({1: 0.5}, **TINY)
    first = TinyNet()
    trainer_for([cb], max_epochs=2).fit(first)
    assert structure(first) == R1 and cb.done == [1]
    second = TinyNet()
    trainer_for([cb], max_epochs=2).fit(second)
    assert structure(second) == R1  # not silently left dense
    assert cb.done == [1] and len(cb.history) == 1


# --------------------------------------------------------------------------- metrics
def test_output_nmse_is_logged_per_milestone_and_equals_a_direct_measurement(monkeypatch):
    from factorize_plugin.engine import engine as engine_module

    model = TinyNet()
    x = torch.cat([b[0] for b, _ in zip(model.val_dataloader(), range(2))])
    seen = {}
    real = engine_module.refactorize

    def around(pl_module, *a, **k):
        with torch.no_grad():
            seen["before"] = pl_module.eval()(x).clone()
        out = real(pl_module, *a, **k)
        with torch.no_grad():
            seen["after"] = pl_module(x).clone()
        pl_module.train()
        return out

    monkeypatch.setattr(engine_module, "refactorize", around)
    logged = {}
    cb = LowRankFactorization({1: 0.25}, output_batches=2, **TINY)
    grab = pl.Callback()
    grab.on_train_epoch_end = lambda trainer, m: logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    trainer_for([cb, grab], max_epochs=2).fit(model)
    y, y_hat = seen["before"].double(), seen["after"].double()
    want = float((y_hat - y).square().sum() / (y - y.mean()).square().sum())
    assert cb.history[0]["output_nmse"] == pytest.approx(want, rel=1e-9)
    assert logged["factorize/output_nmse"] == pytest.approx(want, rel=1e-6)
    assert 0 < want < 1 and cb.history[0]["output_nmse_seconds"] > 0
    off = LowRankFactorization({1: 0.25}, output_batches=0, **TINY)
    trainer_for([off], max_epochs=2).fit(TinyNet())
    assert "output_nmse" not in off.history[0]


def test_output_metric_sums_states_in_float64():
    from factorize_plugin.engine.output_metric import OutputNMSE

    m = OutputNMSE()
    assert all(getattr(m, s).dtype == torch.float64 for s in ("sse", "sum_y", "sum_y2", "count"))
    assert all(m._reductions[s].__name__ in ("dim_zero_sum",) for s in ("sse", "sum_y", "sum_y2", "count"))
    y = torch.randn(64, 10) + 1000.0  # offset data: float32 one-pass variance would lose it
    y_hat = y + 0.1 * torch.randn(64, 10)
    m.update(y_hat[:32], y[:32])
    m.update(y_hat[32:], y[32:])
    want = float((y_hat.double() - y.double()).square().sum() / (y.double() - y.double().mean()).square().sum())
    assert float(m.compute()) == pytest.approx(want, rel=1e-6)
