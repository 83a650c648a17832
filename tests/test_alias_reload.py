"""One module under two names stays one module through every load path and a resume (issue 18,
items 2 and 3): before the fix a reload built two independent copies (6,794 -> 9,962 parameters)
and a resume failed in the optimizer restore."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from factorize_plugin import LowRankFactorization, load_factorized, load_factorized_checkpoint
from factorize_plugin.layers import FactorizedLinear


class AliasTask(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, 48)
        self.mid = nn.Linear(48, 48)
        self.mid2 = self.mid  # the same layer, applied twice
        self.out = nn.Linear(48, 4)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(256, 16, generator=g)
        self.y = torch.randint(0, 4, (256,), generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid2(torch.relu(self.mid(torch.relu(self.inp(x)))))))

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, _):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=32)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=64)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _trainer(max_epochs: int, cb: LowRankFactorization, tmp_path, **kw) -> pl.Trainer:
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    return pl.Trainer(max_epochs=max_epochs, callbacks=[cb, ckpt], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)  # fmt: skip


def _callback() -> LowRankFactorization:
    return LowRankFactorization({1: 8, 2: 4}, targets=["mid"], speed_guard=False, verbose=False, output_batches=0)


def _assert_aliased(model: AliasTask, rank: int) -> None:
    assert isinstance(model.mid, FactorizedLinear) and model.mid.rank == rank
    assert model.mid2 is model.mid


def test_alias_stays_one_module_through_every_loader(tmp_path) -> None:
    model = AliasTask()
    _trainer(2, _callback(), tmp_path).fit(model)
    _assert_aliased(model, 8)
    n = _params(model)

    fresh = load_factorized(AliasTask(), model.state_dict())
    _assert_aliased(fresh, 8)
    assert _params(fresh) == n
    loaded = load_factorized_checkpoint(AliasTask, str(tmp_path / "epoch=1.ckpt"))
    _assert_aliased(loaded, 8)
    assert _params(loaded) == n
    x = model.x[:8]
    assert torch.equal(loaded(x), model(x))


def test_trainer_validate_with_ckpt_path_keeps_the_alias(tmp_path) -> None:
    _trainer(2, _callback(), tmp_path).fit(AliasTask())
    fresh = AliasTask()
    _trainer(2, _callback(), tmp_path).validate(fresh, ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    _assert_aliased(fresh, 8)


def test_resume_of_an_aliased_model_continues_with_the_same_structure(tmp_path) -> None:
    pl.seed_everything(0)
    whole = AliasTask()
    _trainer(3, _callback(), tmp_path / "a").fit(whole)
    _assert_aliased(whole, 4)

    pl.seed_everything(0)
    resumed = AliasTask()
    cb = _callback()
    _trainer(3, cb, tmp_path / "b").fit(resumed, ckpt_path=str(tmp_path / "a" / "epoch=1.ckpt"))
    _assert_aliased(resumed, 4)
    assert [h["milestone"] for h in cb.history] == [1, 2]
    assert _params(resumed) == _params(whole)
