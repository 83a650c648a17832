"""A GPT-style byte-level language model on real text that ships with Python: the standard library's
own ``.py`` source files (no download, no generated text).

The model is written the way nanoGPT-like code usually is: token + position embeddings, pre-norm
blocks whose attention projections (``attn.qkv``, ``attn.proj``) and MLP (``mlp.fc``, ``mlp.proj``)
are plain ``nn.Linear``, causal attention through ``F.scaled_dot_product_attention``, and an output
head tied to the token embedding (``head.weight = wte.weight``). The factorization callback leaves
the tied head alone (it says so in its report) and lowers the ranks of the projections.

Shared by ``examples/gpt_train.py``, ``benchmarks/bench_gpt_lm.py`` and the tests.
"""

from __future__ import annotations

import functools
import math
import sysconfig
import zlib
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

VOCAB = 256  # bytes


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int = 4_000_000, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 byte tensors from the standard library's top-level ``.py`` files, in
    sorted order; the validation text is a separate set of whole files (every 10th file)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library directory {root}")
    every = max(2, round(1 / val_fraction))
    train, val, total = [], [], 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        (val if i % every == every - 1 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break

    def as_tensor(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()

    return as_tensor(train), as_tensor(val)


OUTSIDE_STDLIB = ("site-packages", "dist-packages")  # installed third-party code, not the standard library


@functools.lru_cache(maxsize=2)
def stdlib_tree(include_test: bool = True, val_percent: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 byte tensors [n_bytes] from every ``.py`` file of the standard library,
    subpackages included (``site-packages`` left out), read once and cached in memory.

    The split is by file and deterministic: a file is held out for validation when the CRC-32 of its
    path relative to the standard library is below ``val_percent`` % of 2**32, so a file's side does
    not depend on which other files this Python ships. Within each side files are concatenated in
    sorted path order. ``include_test`` keeps the ``test`` package (Python 3.11: 31.5 MB of ``.py`` in
    all, 14.4 MB without it), which the GPU configuration needs so that no run reads a byte twice."""
    if not 0 < val_percent < 100:
        raise ValueError(f"val_percent must be in (0, 100), got {val_percent}")
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in OUTSIDE_STDLIB or (not include_test and rel.parts[0] == "test") or not path.is_file():
            continue
        held_out = zlib.crc32(rel.as_posix().encode()) < val_percent * 2**32 // 100
        (val if held_out else train).append(path.read_bytes())
    if not train or not val:
        raise FileNotFoundError(f"too few .py files under the standard library directory {root} for a train/val split")

    def as_tensor(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()

    return as_tensor(train), as_tensor(val)


CORPORA = ("top_level", "full")


def corpus(name: str, max_bytes: int = 4_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """``"top_level"``: ``stdlib_corpus(max_bytes)``; ``"full"``: ``stdlib_tree()`` (``max_bytes`` unused)."""
    if name == "top_level":
        return stdlib_corpus(max_bytes)
    if name == "full":
        return stdlib_tree()
    raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}")


class Windows(Dataset):
    """``count`` windows of ``block + 1`` bytes from ``data``: random starts drawn from ``seed``
    (re-drawn per epoch through ``set_epoch``), or evenly spaced when ``seed`` is None."""

    def __init__(self, data: torch.Tensor, block: int, count: int, seed: Optional[int] = 0) -> None:
        if len(data) <= block + 1:
            raise ValueError(f"corpus of {len(data)} bytes is shorter than one window of {block + 1}")
        self.data, self.block, self.count, self.seed = data, block, count, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        span = len(self.data) - self.block - 1
        if self.seed is None:
            self.starts = torch.linspace(0, span, self.count).long()
        else:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self.starts = torch.randint(0, span, (self.count,), generator=g)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        chunk = self.data[s : s + self.block + 1].long()
        return chunk[:-1], chunk[1:]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, heads)
        self.ln2, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Tokens [B, T] (int64) -> logits [B, T, vocab]."""

    def __init__(self, vocab: int = VOCAB, block: int = 64, dim: int = 128, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2 / nanoGPT
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class GPTTask(pl.LightningModule):
    """The language model with its data: AdamW, linear warm-up then cosine decay over ``max_steps``.

    ``corpus``: ``"top_level"`` (the standard library's top-level files, ``corpus_bytes`` of them:
    small, memorized by large models) or ``"full"`` (``stdlib_tree``: every file, split by file).

    ``lr``: the peak rate. The default (3e-3) is the older 4 MB-corpus benchmarks'; the whole-library
    CPU configuration of ``benchmarks/bench_lm_tradeoff.py`` trains best at 1e-3
    (``benchmarks/results/lm_lr_grid.json``: dense 2.29 against 2.70 at 3e-3 after 240 steps).

    Logs ``train_loss`` per step and ``val_loss`` (mean cross-entropy per byte, nats) per validation run.
    """

    def __init__(
        self,
        block: int = 64,
        dim: int = 128,
        layers: int = 4,
        heads: int = 4,
        batch_size: int = 32,
        train_windows: int = 3200,
        val_windows: int = 256,
        lr: float = 3e-3,
        max_steps: int = 1000,
        corpus_bytes: int = 4_000_000,
        seed: int = 0,
        corpus: str = "top_level",
    ) -> None:
        super().__init__()
        if corpus not in CORPORA:
            raise ValueError(f"GPTTask(corpus=...) must be one of {CORPORA}, got {corpus!r}")
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = GPT(VOCAB, block, dim, layers, heads)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def configure_model(self) -> None:
        """Under FSDP2 (``ModelParallelStrategy``, whose mesh Lightning sets before this hook):
        every projection its own ``fully_shard`` unit (what the factorization callback needs to
        swap it for a sharded pair), then each block, then the network (the root, holding the
        tied embedding and head). Nothing under DDP or on one device."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        for block in self.net.blocks:
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
                fully_shard(layer, mesh=dp)
            fully_shard(block, mesh=dp)
        fully_shard(self.net, mesh=dp)

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), on_step=False, on_epoch=True)

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2]
        other = [p for n, p in self.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=(0.9, 0.95),
        )
        total, warm = self.hparams.max_steps, max(1, self.hparams.max_steps // 20)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        train, _ = corpus(self.hparams.corpus, self.hparams.corpus_bytes)
        ds = Windows(train, self.hparams.block, self.hparams.train_windows, seed=self.hparams.seed)
        ds.set_epoch(self.current_epoch)
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=False, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        _, val = corpus(self.hparams.corpus, self.hparams.corpus_bytes)
        return DataLoader(Windows(val, self.hparams.block, self.hparams.val_windows, seed=None), batch_size=64)
