"""Hugging Face models built from tiny configs (no download): BERT (nn.Linear, decoder tied to the
embedding and to a shared bias), GPT-2 (transformers' Conv1D projections, tied head) and a
Llama-style decoder (tied or untied head), trained through the callback inside a LightningModule
on real text, then saved with ``save_pretrained`` and loaded back factorized."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from examples.gpt_task import Windows, stdlib_corpus
from factorize_plugin import LowRankFactorization, Targets, factorize_model
from factorize_plugin.layers import FactorizedLinear, TransposedLinear, layer_view, weight_matrix
from factorize_plugin.layers.adapters import install_factors
from factorize_plugin.surgery.swap.hf import load_factorized_pretrained
from lightning_helpers import with_targets

FAST = dict(targets=Targets(min_params=256, min_features=8), verbose=False, speed_guard=False)
V = 256  # bytes as tokens


def bert() -> nn.Module:
    return BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32))  # fmt: skip


def gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=32, bos_token_id=0, eos_token_id=0))


def llama(tied: bool) -> nn.Module:
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg)


FAMILIES = {"bert": bert, "gpt2": gpt2, "llama_tied": lambda: llama(True), "llama_untied": lambda: llama(False)}
FEED_FORWARD = {"bert": ["*.intermediate.dense", "*.output.dense"], "gpt2": ["*.mlp.*"], "llama_tied": ["*.mlp.*"], "llama_untied": ["*.mlp.*"]}
# expected: (a layer factorized under the default targets, the tied head left out or None)
EXPECT = {
    "bert": ("model.bert.encoder.layer.0.attention.self.query", "model.cls.predictions.decoder"),
    "gpt2": ("model.transformer.h.0.attn.c_attn", "model.lm_head"),
    "llama_tied": ("model.model.layers.0.self_attn.q_proj", "model.lm_head"),
    "llama_untied": ("model.model.layers.0.self_attn.q_proj", None),
}


class HFTask(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        tr, va = stdlib_corpus(400_000)
        self.train_ds, self.val_ds = Windows(tr, 16, 32, seed=0), Windows(va, 16, 16, seed=None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, i):
        return self._loss(batch)

    def validation_step(self, batch, i):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(self.train_ds, batch_size=16)

    def val_dataloader(self):
        return DataLoader(self.val_ds, batch_size=16)


def _fit(task: pl.LightningModule, cb: LowRankFactorization) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2)  # fmt: skip
    trainer.fit(task)
    return trainer


def _every_parameter_once(trainer: pl.Trainer, module: nn.Module) -> bool:
    held = [id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]]
    return len(held) == len(set(held)) and set(held) == {id(p) for p in module.parameters()}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("patterns", [False, True], ids=["default_targets", "feed_forward_patterns"])
def test_trains_through_a_schedule(family, patterns):
    torch.manual_seed(0)
    task = HFTask(FAMILIES[family]())
    targets = FEED_FORWARD[family] if patterns else None
    cb = LowRankFactorization({1: 0.25}, **with_targets(FAST, targets))  # 0.25: square 32x32 layers save too
    trainer = _fit(task, cb)
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    factorized = {n for n, m in task.named_modules() if isinstance(m, FactorizedLinear)}
    layer, head = EXPECT[family]
    if patterns:
        ff = {"bert": "model.bert.encoder.layer.0.intermediate.dense", "gpt2": "model.transformer.h.0.mlp.c_fc"}
        assert ff.get(family, "model.model.layers.0.mlp.up_proj") in factorized
        assert layer not in factorized  # attention left alone
    else:
        assert layer in factorized
        if family == "gpt2":  # Conv1D projections factorized, not skipped
            assert {"model.transformer.h.1.mlp.c_fc", "model.transformer.h.1.mlp.c_proj", "model.transformer.h.1.attn.c_proj"} <= factorized
    if head is not None:
        assert head not in factorized
        if not patterns:
            assert "shared" in cb.skipped[head]
    elif not patterns:
        assert "model.lm_head" in factorized  # an untied head is an ordinary Linear
    assert _every_parameter_once(trainer, task)  # tied embeddings and BERT's shared bias still train
    assert cb.history[-1]["statistics_bytes"] > 0  # peak float64 statistics of the milestone


def test_bert_tied_decoder_and_shared_bias_stay_tied():
    task = HFTask(bert())
    trainer = _fit(task, LowRankFactorization({1: 0.5}, **FAST))
    pred = task.model.cls.predictions
    assert pred.decoder.weight is task.model.bert.embeddings.word_embeddings.weight and pred.decoder.bias is pred.bias
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(pred.bias) in held and id(pred.decoder.weight) in held


def test_conv1d_is_a_transposed_linear():
    conv = Conv1D(12, 20)  # nf=12 outputs, nx=20 inputs
    assert isinstance(conv, TransposedLinear) and not isinstance(nn.Linear(2, 2), TransposedLinear)
    view = layer_view(conv)
    assert (view.in_dim, view.out_dim) == (20, 12)
    w, b = weight_matrix(conv)
    u, s, vh = torch.linalg.svd(w)
    pair = install_factors(conv, u[:, :12] * s, vh, b)  # full rank: the same map
    x = torch.randn(3, 5, 20)
    assert isinstance(pair, FactorizedLinear)
    torch.testing.assert_close(pair(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [gpt2, lambda: llama(True)], ids=["gpt2", "llama_tied"])
def test_save_pretrained_and_load_back_factorized(tmp_path, make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randint(0, V, (2, 16))
    factorize_model(model, [{"input_ids": x}], rank=0.5, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    with torch.no_grad():
        want = model(input_ids=x).logits
    model.save_pretrained(tmp_path)  # failed with "'dict' object has no attribute 'device'"
    loaded = load_factorized_pretrained(type(model), str(tmp_path))
    assert sum(isinstance(m, FactorizedLinear) for m in loaded.modules()) == sum(isinstance(m, FactorizedLinear) for m in model.modules())
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight  # the tie survives
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, want)
    # plain from_pretrained builds the dense model: it reports the factorized layers' weights as missing
    _, info = type(model).from_pretrained(str(tmp_path), output_loading_info=True)
    assert info["missing_keys"] and any(k.endswith("first.weight") for k in info["unexpected_keys"])


def test_load_factorized_pretrained_refuses_a_dense_directory(tmp_path):
    gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no factorized layer"):
        load_factorized_pretrained(GPT2LMHeadModel, str(tmp_path))


def test_a_square_conv1d_pair_loaded_from_a_dense_state_dict_is_a_conv1d_again():
    """GPT-2's attn.c_proj is a square Conv1D (weight [in, out]): folded back from a dense
    checkpoint it must become a Conv1D again; an nn.Linear ([out, in]) would take the same-shaped
    weight transposed, silently."""
    from factorize_plugin import load_factorized

    torch.manual_seed(0)
    model = gpt2().eval()
    x = torch.randint(0, V, (2, 16))
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(input_ids=x).logits
    factorize_model(model, [{"input_ids": x}], rank=0.25, targets=Targets(["*.attn.c_proj"], min_params=0, min_features=0), speed_guard=False)
    assert isinstance(model.transformer.h[0].attn.c_proj, FactorizedLinear)
    load_factorized(model, dense_state)
    layer = model.transformer.h[0].attn.c_proj
    assert isinstance(layer, Conv1D) and layer.weight.shape == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want)
