"""torch's transformer layers, tied heads, aliased modules, subclasses with their own forward and
layers that never run during validation, trained through the callback on real text (the
standard library's sources, bytes as tokens)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from examples.gpt_task import GPTTask, Windows, stdlib_corpus
from factorize_plugin import LowRankFactorization, Targets
from factorize_plugin.layers import FactorizedLinear
from factorize_plugin.surgery.select.sharing import check_optimizer
from factorize_plugin.surgery.select.targets import select_layers
from lightning_helpers import with_targets

FAST = dict(targets=Targets(min_params=256, min_features=8), verbose=False, speed_guard=False)


def _text(block: int = 16, train: int = 64, val: int = 32):
    tr, va = stdlib_corpus(400_000)
    return Windows(tr, block, train, seed=0), Windows(va, block, val, seed=None)


class SeqTask(pl.LightningModule):
    """Next-byte prediction with any ``net`` mapping tokens [B, T] to logits [B, T, 256]."""

    def __init__(self, net: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        self.train_ds, self.val_ds = _text()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x).flatten(0, 1), y.flatten()))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(self.train_ds, batch_size=16)

    def val_dataloader(self):
        return DataLoader(self.val_ds, batch_size=16)


class EncoderNet(nn.Module):
    def __init__(self, dim: int = 32, batch_first: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(dim, 256)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.emb(x)
        if not self.batch_first:
            return self.out(self.encoder(h.transpose(0, 1)).transpose(0, 1))
        return self.out(self.encoder(h))


class DecoderNet(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, dim)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True), 2)
        self.out = nn.Linear(dim, 256)

    def forward(self, x):
        h = self.emb(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.out(self.decoder(h, h, tgt_mask=mask, tgt_is_causal=True))


def _fit(task: pl.LightningModule, callback: LowRankFactorization, epochs: int = 2, sanity: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=sanity, limit_train_batches=2,
    )  # fmt: skip
    trainer.fit(task)
    return trainer


def _optimizer_params(trainer: pl.Trainer) -> list[int]:
    return [id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]]


def _assert_optimizer_holds_every_parameter_once(trainer: pl.Trainer, model: nn.Module) -> None:
    held = _optimizer_params(trainer)
    assert len(held) == len(set(held))
    assert set(held) == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_trains_with_default_targets_and_keeps_out_proj(batch_first):
    task = SeqTask(EncoderNet(batch_first=batch_first))
    cb = LowRankFactorization({1: 0.5}, **FAST)
    trainer = _fit(task, cb)
    enc = task.net.encoder.layers
    assert all(isinstance(layer.linear1, FactorizedLinear) and isinstance(layer.linear2, FactorizedLinear) for layer in enc)
    assert all(type(layer.self_attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear" for layer in enc)
    assert "net.encoder.layers.0.self_attn.out_proj" in cb.skipped and "MultiheadAttention" in cb.skipped["net.encoder.layers.0.self_attn.out_proj"]
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["val_loss"])
    _assert_optimizer_holds_every_parameter_once(trainer, task)


@pytest.mark.parametrize("exclude", [None, ["*.self_attn.*"]])
def test_encoder_fast_path_is_taken_after_factorization_and_stays_correct(monkeypatch, exclude):
    task = SeqTask(EncoderNet(batch_first=True))
    _fit(task, LowRankFactorization({1: 0.5}, **with_targets(FAST, exclude=exclude)))
    assert isinstance(task.net.encoder.layers[0].linear1, FactorizedLinear)
    x = task.val_ds[0][0].unsqueeze(0).repeat(4, 1)
    task.eval()
    calls = []
    fused = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a, **k: calls.append(1) or fused(*a, **k))
    with torch.no_grad():
        fast = task(x)
    assert calls, "the fused inference path was not taken"
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            slow = task(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-4)


def test_decoder_layer_trains_with_default_targets():
    task = SeqTask(DecoderNet())
    cb = LowRankFactorization({1: 0.5}, **FAST)
    trainer = _fit(task, cb)
    layer = task.net.decoder.layers[0]
    assert isinstance(layer.linear1, FactorizedLinear) and isinstance(layer.linear2, FactorizedLinear)
    assert {"net.decoder.layers.0.self_attn.out_proj", "net.decoder.layers.0.multihead_attn.out_proj"} <= set(cb.skipped)
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    _assert_optimizer_holds_every_parameter_once(trainer, task)


def test_naming_out_proj_is_an_error_before_training():
    task = SeqTask(EncoderNet())
    cb = LowRankFactorization({1: 0.5}, **with_targets(FAST, ["net.encoder.layers.0.self_attn.out_proj"]))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"out_proj.*MultiheadAttention reads out_proj.weight"):
        trainer.fit(task)
    assert trainer.global_step == 0


# ------------------------------------------------------------ shared weights / modules
def test_tied_head_is_left_out_and_the_embedding_keeps_training():
    task = GPTTask(block=16, dim=32, layers=1, heads=2, batch_size=8, train_windows=16, val_windows=16, corpus_bytes=400_000)
    cb = LowRankFactorization({1: 0.5}, **FAST)
    before = task.net.wte.weight.detach().clone()
    trainer = _fit(task, cb, epochs=3)
    assert "net.head" in cb.skipped and "tied" in cb.skipped["net.head"]
    assert task.net.head.weight is task.net.wte.weight
    assert isinstance(task.net.blocks[0].mlp.fc, FactorizedLinear)
    assert id(task.net.wte.weight) in _optimizer_params(trainer)
    _assert_optimizer_holds_every_parameter_once(trainer, task)
    # the shared tensor trained after the milestone too (epoch 2 ran on the factorized model)
    assert not torch.equal(before, task.net.wte.weight.detach())


def test_naming_a_tied_head_is_refused():
    with pytest.raises(ValueError, match=r"'net.head'.*shared with 'net.wte.weight'"):
        select_layers(GPTTask(dim=32, layers=1, heads=2), targets=["net.head"])


class Aliased(nn.Module):
    """One Linear under two names, used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.a = nn.Linear(32, 64)
        self.b = self.a
        self.mix = nn.Linear(64, 32)
        self.out = nn.Linear(32, 256)

    def forward(self, x):
        h = self.emb(x)
        return self.out(self.mix(torch.relu(self.a(h))) + self.mix(torch.relu(self.b(h))))


def test_module_under_two_names_is_swapped_under_both():
    task = SeqTask(Aliased())
    trainer = _fit(task, LowRankFactorization({1: 8}, **with_targets(FAST, ["net.a", "net.mix"])))
    assert isinstance(task.net.a, FactorizedLinear) and task.net.b is task.net.a
    _assert_optimizer_holds_every_parameter_once(trainer, task)


def test_alias_name_selects_the_one_layer():
    model = Aliased()
    assert list(select_layers(model, targets=["b"])) == ["a"]


def test_optimizer_check_catches_a_lost_parameter():
    a = nn.Linear(4, 4)
    opt = torch.optim.SGD(list(a.parameters()), lr=0.1)
    before = [p for g in opt.param_groups for p in g["params"]]
    opt.param_groups[0]["params"][:] = before[:1]
    with pytest.raises(RuntimeError, match="lost 1 parameter"):
        check_optimizer(opt, before, [])
    opt.param_groups[0]["params"][:] = before + before[:1]
    with pytest.raises(RuntimeError, match="twice"):
        check_optimizer(opt, before, [])


# ------------------------------------------------------------ subclasses
class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 3.0 * super().forward(x)


class WithScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.scaled = ScaledLinear(32, 64)
        self.plain = nn.Linear(64, 256)

    def forward(self, x):
        return self.plain(torch.tanh(self.scaled(self.emb(x))))


def test_subclass_with_own_forward_is_skipped_by_default_and_refused_when_named():
    task = SeqTask(WithScaled())
    cb = LowRankFactorization({1: 8}, **FAST)
    _fit(task, cb)
    assert type(task.net.scaled) is ScaledLinear and "overrides forward" in cb.skipped["net.scaled"]
    assert isinstance(task.net.plain, FactorizedLinear)
    with pytest.raises(ValueError, match=r"'scaled'.*ScaledLinear overrides forward"):
        select_layers(WithScaled(), targets=["scaled"])


# ------------------------------------------------------------ never called during validation
class TrainOnlyBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.body = nn.Linear(32, 64)
        self.aux = nn.Linear(64, 64)
        self.out = nn.Linear(64, 256)

    def forward(self, x):
        h = torch.relu(self.body(self.emb(x)))
        if self.training:
            h = h + 0.1 * self.aux(h)
        return self.out(h)


class StepCounter(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1


@pytest.mark.parametrize("sanity", [1, 0])
def test_training_only_layer_is_left_out_with_a_note(sanity):
    task = SeqTask(TrainOnlyBranch())
    cb = LowRankFactorization({1: 8}, **FAST)
    with pytest.warns(UserWarning, match=r"'net.aux'.*training"):
        _fit(task, cb, sanity=sanity)
    assert "net.aux" in cb.skipped and "compile" not in cb.skipped["net.aux"]
    assert type(task.net.aux) is nn.Linear and isinstance(task.net.body, FactorizedLinear)


@pytest.mark.parametrize("sanity, steps", [(1, 0), (0, 2)])
def test_named_training_only_layer_is_an_error_before_any_swap(sanity, steps):
    task = SeqTask(TrainOnlyBranch())
    counter = StepCounter()
    cb = LowRankFactorization({1: 8}, **with_targets(FAST, ["net.aux", "net.body"]))
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", callbacks=[cb, counter], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=sanity, limit_train_batches=2,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"'net.aux'.*never called.*training mode") as err:
        trainer.fit(task)
    assert "compile" not in str(err.value)
    # with a sanity check it is found before training; without, at the first collection (before the swap)
    assert counter.steps == steps and type(task.net.body) is nn.Linear


# ------------------------------------------------------------ the GPT example, short
def test_gpt_example_short_run_lowers_ranks_and_leaves_the_tied_head():
    from examples.gpt_train import run

    result = run({1: 0.5, 2: 0.25}, steps=6, epochs=3, model=dict(dim=32, layers=1, heads=2, block=16, batch_size=4, val_windows=16),
                 callback=dict(speed_guard=False))  # fmt: skip
    ranks = result["ranks"]
    assert ranks["net.blocks.0.mlp.fc"] == 8 and ranks["net.blocks.0.attn.qkv"] == 8  # 0.25 of 32
    assert "net.head" in result["notes"]
    assert result["steps"] == 6 and len(result["curve"]) == 3 and all(e["tokens_per_s"] > 0 for e in result["epochs"])


def test_factorize_model_names_a_training_only_layer_and_the_reason():
    from factorize_plugin import factorize_model

    model = TrainOnlyBranch()
    x = torch.randint(0, 256, (2, 8))
    # named: an error naming the layer and the likely reason, nothing swapped
    with pytest.raises(RuntimeError, match=r"'aux'.*training mode") as err:
        factorize_model(model, [x], rank=8, targets=Targets(["aux", "body"], min_params=256), speed_guard=False)
    assert "compile" not in str(err.value) and type(model.body) is nn.Linear
    # default targets: left out with a note in its report, the others factorized
    reports = factorize_model(model, [x], rank=8, targets=Targets(min_params=256), speed_guard=False)
    by_name = {r.name: r for r in reports}
    assert not by_name["aux"].changed and "never called during calibration" in by_name["aux"].note
    assert "training mode" in by_name["aux"].note and by_name["body"].new_rank == 8
