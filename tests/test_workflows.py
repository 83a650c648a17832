"""Everyday Lightning workflows around a model whose structure changes (issue 12): checkpoints of
another structure in every entry point, resume with an edited schedule or targets, optimizers
that cache their parameters, frozen submodules, a reused callback, a missing validation loader."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import TARGETS, TINY, Probe, TinyNet, max_abs_diff, state_dict_cpu, structure
from torch.utils.data import DataLoader, TensorDataset

from factorize_plugin import LowRankFactorization, factorize_model, load_factorized, load_factorized_checkpoint
from factorize_plugin.layers import FactorizedLinear

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
