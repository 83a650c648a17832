"""Models a new user brings that are not a plain forward over Linear layers (issue 18, items 4-9):
a ``nn.TransformerEncoder`` on its nested-tensor path, a LightningModule without ``forward``, a
``torch.compile``'d model, a model on the meta device; and the figures that mix them: the
multiply-adds of a skipped layer on (B, T, F) inputs, the row minimum over two validation loaders."""

from __future__ import annotations

import copy
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from factorize_plugin import LowRankFactorization, Targets, factorize_model
from factorize_plugin.layers import FactorizedLinear
from factorize_plugin.surgery.report.reports import format_reports
from lightning_helpers import with_targets

FAST = dict(targets=Targets(min_params=0, min_features=0), verbose=False, speed_guard=False)


def _trainer(callback: LowRankFactorization, epochs: int = 2, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def _chain(err: BaseException) -> str:
    """The messages of an exception and of those it was raised from or during."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return " | ".join(parts)


# ------------------------------------------------------------ 4. nested-tensor encoder
class PaddedEncoder(nn.Module):
    """A TransformerEncoder called with a padding mask (its default enable_nested_tensor=True)."""

    def __init__(self, nested: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x, src_key_padding_mask=mask))


def _padded_batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 12, 32, generator=g)
        mask = torch.zeros(8, 12, dtype=torch.bool)
        mask[:4, 9:] = True  # right padding, as a tokenizer makes it
        out.append((x, mask, torch.randint(0, 4, (8,), generator=g)))
    return out


def test_factorize_model_on_a_nested_tensor_encoder_matches_the_plain_path():
    nested = PaddedEncoder(nested=True).eval()
    assert nested.enc.use_nested_tensor
    plain = copy.deepcopy(nested)
    plain.enc.enable_nested_tensor = plain.enc.use_nested_tensor = False
    batches = _padded_batches()
    kwargs = dict(rank=8, targets=Targets("enc.layers.*.linear*", min_params=0, min_features=0), speed_guard=False,
                  input_fn=lambda b: (b[0], b[1]))
    got = factorize_model(nested, batches, **kwargs)
    want = factorize_model(plain, batches, **kwargs)
    assert [r.name for r in got] == [r.name for r in want] and all(r.new_rank == 8 for r in got)
    assert [r.nmse for r in got] == pytest.approx([r.nmse for r in want], rel=1e-9)
    assert isinstance(nested.enc.layers[0].linear1, FactorizedLinear)
    for (k, a), (_, b) in zip(nested.state_dict().items(), plain.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    # the model's own path is back: nested tensors on, torch's fast path on
    assert nested.enc.use_nested_tensor and torch.backends.mha.get_fastpath_enabled()
    x, mask, _ = batches[0]
    with torch.no_grad():
        assert torch.allclose(nested(x, mask)[~mask], plain(x, mask)[~mask], atol=1e-5)


def test_param_budget_measures_a_nested_tensor_encoder_as_the_plain_path():
    nested = PaddedEncoder(nested=True).eval()
    plain = copy.deepcopy(nested)
    plain.enc.enable_nested_tensor = plain.enc.use_nested_tensor = False
    kwargs = dict(param_budget=0.4, targets=Targets("enc.layers.*.linear*", min_params=0, min_features=0), speed_guard=False,
                  input_fn=lambda b: (b[0], b[1]))
    got = factorize_model(nested, _padded_batches(), **kwargs)
    want = factorize_model(plain, _padded_batches(), **kwargs)
    assert [r.new_rank for r in got] == [r.new_rank for r in want]
    assert torch.backends.mha.get_fastpath_enabled()


class EncoderTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = PaddedEncoder(nested=True)

    def forward(self, x, mask):
        return self.net(x, mask)

    def _loss(self, batch):
        x, mask, y = batch
        return F.cross_entropy(self(x, mask)[:, 0], y)

    def training_step(self, batch, i):
        return self._loss(batch)

    def validation_step(self, batch, i):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(batches):
    return DataLoader(batches, batch_size=None)


def test_callback_on_a_nested_tensor_encoder_with_padding_mask():
    task = EncoderTask()
    cb = LowRankFactorization({0: 16, 1: 8}, input_fn=lambda b: (b[0], b[1]), **with_targets(FAST, "net.enc.layers.*.linear*"))
    trainer = _trainer(cb, num_sanity_val_steps=1)
    trainer.fit(task, _loader(_padded_batches(2)), _loader(_padded_batches(2, seed=1)))
    assert [h["statistics"] for h in cb.history] == ["calibration", "validation"]
    assert cb.ranks == {f"net.enc.layers.{i}.linear{j}": 8 for i in (0, 1) for j in (1, 2)}
    assert all(n > 0 for n in cb.history[-1]["samples"].values())
    assert "output_nmse" in cb.history[-1]
    assert task.net.enc.use_nested_tensor and torch.backends.mha.get_fastpath_enabled()


# ------------------------------------------------------------ 5. no forward
class NoForward(pl.LightningModule):
    """All the logic in the steps, as Lightning allows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch, i):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, i):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _digits_like(n: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)), batch_size=16)


def test_no_forward_skips_the_output_metric_with_a_warning_naming_output_batches():
    cb = LowRankFactorization({0: 8, 1: 4}, **with_targets(FAST, "net.0"))
    with pytest.warns(UserWarning, match=r"no forward.*output_batches=0"):
        _trainer(cb).fit(NoForward(), _digits_like(), _digits_like(seed=1))
    assert cb.ranks == {"net.0": 4}
    assert all("output_nmse" not in h for h in cb.history)


def test_no_forward_with_a_measuring_param_budget_is_refused_before_training():
    cb = LowRankFactorization({1: 0.5}, mode="param_budget", **FAST)
    trainer = _trainer(cb)
    with pytest.raises(ValueError, match=r"NoForward defines no forward.*budget_batches=0"):
        trainer.fit(NoForward(), _digits_like(), _digits_like(seed=1))
    assert trainer.global_step == 0


def test_no_forward_with_budget_batches_0_allocates_by_nmse():
    cb = LowRankFactorization({0: 0.5}, mode="param_budget", budget_batches=0, output_batches=0, **FAST)
    _trainer(cb, epochs=1).fit(NoForward(), _digits_like(), _digits_like(seed=1))
    assert cb.history and cb.history[0]["ranks"]


# ------------------------------------------------------------ 6. torch.compile
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))


def test_factorize_model_on_a_compiled_model_factorizes_the_model_it_wraps():
    net = _mlp()
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(32, 16)
    compiled(x)  # compiled once before, as a user's model would be
    reports = factorize_model(compiled, [x], rank=4, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert [r.name for r in reports] == ["0", "2"]
    assert isinstance(net[0], FactorizedLinear) and compiled._orig_mod is net
    with torch.no_grad():
        assert torch.allclose(compiled(x), net(x), atol=1e-6)


def test_factorize_model_refuses_a_compiled_submodule_naming_it():
    model = nn.Sequential(torch.compile(_mlp(), backend="eager"), nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"'0' is a torch.compile'd module.*_orig_mod"):
        factorize_model(model, [torch.randn(8, 16)], rank=4, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())


# ------------------------------------------------------------ 7. meta device
def test_factorize_model_refuses_a_meta_model_naming_the_parameter():
    with torch.device("meta"):
        net = _mlp()
    with pytest.raises(ValueError, match=r"'0\.weight'.*meta device"):
        factorize_model(net, [torch.randn(8, 16)], rank=4, speed_guard=False, targets=Targets(min_params=0, min_features=0))


def test_callback_refuses_a_meta_model_before_anything_runs():
    with torch.device("meta"):
        task = NoForward()
    cb = LowRankFactorization({0: 8}, **FAST)
    with pytest.raises(Exception) as info:
        _trainer(cb).fit(task, _digits_like(), _digits_like(seed=1))
    assert re.search(r"'net\.0\.weight'.*meta device", _chain(info.value))


# ------------------------------------------------------------ 8. multiply-adds of skipped layers
class TinyGPT(nn.Module):
    """Embedding, one MLP, a head tied to the embedding: every layer runs on (B, T, F)."""

    def __init__(self, vocab: int = 100, dim: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.wte(tokens)
        return self.head(h + self.proj(F.gelu(self.fc(h))))


def test_kept_multiply_adds_count_a_skipped_tied_head_at_every_position():
    T = 8
    reports = factorize_model(TinyGPT(), [torch.randint(0, 100, (4, T))], rank=4, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    by_name = {r.name: r for r in reports}
    assert "tied" in by_name["head"].note
    assert by_name["head"].macs_dense == T * 32 * 100
    # by hand: every layer's multiply-adds per sequence are its weights (biases are additions) times T
    dense = T * (32 * 128 + 128 * 32 + 32 * 100)
    after = T * ((32 * 4 + 4 * 128) + (128 * 4 + 4 * 32) + 32 * 100)
    assert sum(r.macs_dense for r in reports) == dense and sum(r.macs_after for r in reports) == after
    assert f"{after / dense:.1%} of their dense multiply-adds" in format_reports(reports)


def test_callback_summary_counts_a_skipped_tied_head_at_every_position(caplog):
    class GPTTask(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyGPT()

        def forward(self, tokens):
            return self.net(tokens)

        def training_step(self, batch, i):
            return F.cross_entropy(self(batch[0]).flatten(0, 1), batch[0].flatten())

        def validation_step(self, batch, i):
            self.log("val_loss", F.cross_entropy(self(batch[0]).flatten(0, 1), batch[0].flatten()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    tokens = DataLoader(TensorDataset(torch.randint(0, 100, (16, 8))), batch_size=8)
    cb = LowRankFactorization({0: 4}, **dict(FAST, verbose=True))
    with caplog.at_level("INFO"):
        _trainer(cb, epochs=1).fit(GPTTask(), tokens, tokens)
    assert "net.head" in cb.skipped
    dense = 8 * (32 * 128 + 128 * 32 + 32 * 100)
    after = 8 * ((32 * 4 + 4 * 128) + (128 * 4 + 4 * 32) + 32 * 100)
    assert f"{after / dense:.1%} of their dense multiply-adds" in caplog.text


# ------------------------------------------------------------ 9. row minimum over two loaders
class Wide(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(96, 128)
        self.out = nn.Linear(128, 4)

    def forward(self, x):
        return self.out(F.relu(self.fc(x)))

    def training_step(self, batch, i):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, i, dataloader_idx=0):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _rows(n: int, batch: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 96, generator=g), torch.randint(0, 4, (n,), generator=g)), batch_size=batch)


def test_auto_row_minimum_is_met_over_two_validation_loaders():
    """192 validation rows in all (batches of 32, 32, 32, 4 then 46, 46): "auto" keeps 2 x 96 of them,
    both in the calibration pass (milestone 0) and in the validation run before milestone 1."""
    cb = LowRankFactorization({0: 32, 1: 16}, output_batches=0, **with_targets(FAST, "fc"))
    _trainer(cb, num_sanity_val_steps=0).fit(Wide(), _rows(64, 32, 0), [_rows(100, 32, 1), _rows(92, 46, 2)])
    assert [h["statistics"] for h in cb.history] == ["calibration", "validation"]
    assert [h["samples"]["fc"] for h in cb.history] == [192, 192]
