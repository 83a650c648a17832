"""A tiny deterministic LightningModule on the real scikit-learn digits, and probe callbacks that
record what the tests assert on. Importable by spawned / launched worker processes (no pytest)."""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
from torch.utils.data import DataLoader, Sampler, TensorDataset

from factorize_plugin import Statistics, Targets
from factorize_plugin.layers import FactorizedConv2d, FactorizedLinear

PAIRS = (FactorizedLinear, FactorizedConv2d)
# TinyNet's factorizable layers: TINY picks the last three (its layers are narrower than the
# callback's default min_features, which leaves small layers and 10-class heads alone)
TARGETS = ("features.2", "classifier.0", "classifier.2")
# speed_guard=False: tests that assert a structure must not depend on this machine's timings
TINY_LAYERS = dict(min_params=100, min_features=0)
TINY = dict(targets=Targets(**TINY_LAYERS), verbose=False, speed_guard=False)


def with_targets(kwargs: dict[str, Any], include: Any = None, exclude: Any = None) -> dict[str, Any]:
    """``kwargs`` (such as ``TINY``) with these layer patterns, its ``targets``' size limits kept."""
    limits = kwargs["targets"]
    return dict(kwargs, targets=Targets(include, exclude, limits.min_params, limits.min_features))


def tiny(include: Any = None, exclude: Any = None) -> dict[str, Any]:
    """``TINY`` with these layer patterns."""
    return with_targets(TINY, include, exclude)

# The 2-process DDP runs: 16 samples per rank and batch, so that one process with batches of 32
# sees the union of both ranks' batches (DistributedSampler without shuffling: rank r gets r::2).
# SGD: no per-parameter normalization that would amplify rounding differences.
DDP_MODEL_KWARGS = dict(n_train=256, n_val=128, batch_size=16, val_batch_size=32, optimizer="sgd", lr=0.05)
DDP_SCHEDULE = {1: 0.5, 2: 0.25}
# every row of every validation batch: with random subsampling each rank would draw its own rows
# and the union would no longer be the single-process run's data
DDP_CALLBACK_KWARGS = dict(TINY, statistics=Statistics(sample_fraction=1.0))


@functools.lru_cache(maxsize=None)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 sklearn digits as float32 [N, 1, 8, 8] in [0, 1] and int64 labels, in a fixed
    seeded order (the file is sorted in blocks)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    return x[order], y[order]


class EpochSeededSampler(Sampler):
    """Shuffles with a seed derived from (seed, epoch): the same permutation for the same epoch in
    an uninterrupted run and in a resumed one (Lightning calls ``set_epoch`` on samplers that have it)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class UnionOfRanksSampler(Sampler):
    """One process sees what ``world`` DDP ranks see together: Lightning gives every rank a
    ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)`` for training (even for a loader built
    with ``shuffle=False``); this yields, batch after batch, rank 0's ``per_rank`` samples then
    rank 1's, ... so a loader with ``batch_size = world * per_rank`` sees the union of the ranks'
    i-th batches as its i-th batch."""

    def __init__(self, dataset, world: int, per_rank: int, seed: int = 0) -> None:
        from torch.utils.data import DistributedSampler

        self.ranks = [DistributedSampler(dataset, num_replicas=world, rank=r, shuffle=True, seed=seed) for r in range(world)]
        self.per_rank = per_rank

    def set_epoch(self, epoch: int) -> None:
        for s in self.ranks:
            s.set_epoch(epoch)

    def __iter__(self):
        shards = [list(s) for s in self.ranks]
        out = []
        for start in range(0, len(shards[0]), self.per_rank):
            for shard in shards:
                out.extend(shard[start : start + self.per_rank])
        return iter(out)

    def __len__(self) -> int:
        return sum(len(s) for s in self.ranks)


class TinyNet(pl.LightningModule):
    """conv(1->8) relu conv(8->16) relu pool fc(256->32) relu fc(32->10) on 8x8 digits.

    ``configure_optimizers`` builds two param groups (classifier, features; different LR and weight
    decay) with parameters sorted by name: once a layer is factorized that order differs from the
    order the live optimizer holds (``bias`` sorts before ``weight``, ``first.weight`` before
    ``second.bias``), so resuming needs the callback's param-group re-ordering.
    """

    def __init__(
        self,
        n_train: int = 256,
        n_val: int = 128,
        batch_size: int = 32,
        val_batch_size: int = 64,
        lr: float = 1e-2,
        optimizer: str = "adam",
        scheduler: Optional[str] = "step",
        shuffle: str = "none",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)

    def train_dataloader(self):
        hp = self.hparams
        x, y = digits()
        ds = TensorDataset(x[: hp.n_train], y[: hp.n_train])
        if hp.shuffle == "epoch_seeded":
            return DataLoader(ds, batch_size=hp.batch_size, sampler=EpochSeededSampler(len(ds), hp.seed))
        if hp.shuffle == "union_of_2_ranks":
            sampler = UnionOfRanksSampler(ds, world=2, per_rank=hp.batch_size // 2, seed=hp.seed)
            return DataLoader(ds, batch_size=hp.batch_size, sampler=sampler)
        return DataLoader(ds, batch_size=hp.batch_size, shuffle=False)

    def val_dataloader(self):
        hp = self.hparams
        x, y = digits()
        ds = TensorDataset(x[1000 : 1000 + hp.n_val], y[1000 : 1000 + hp.n_val])
        return DataLoader(ds, batch_size=hp.val_batch_size, shuffle=False)

    def configure_optimizers(self):
        hp = self.hparams
        named = sorted(self.named_parameters())  # sorted by name: a stable order, as some code bases do
        groups = [
            {"params": [p for n, p in named if n.startswith("classifier.")], "weight_decay": 1e-4},
            {"params": [p for n, p in named if not n.startswith("classifier.")], "weight_decay": 0.0, "lr": hp.lr / 2},
        ]
        if hp.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=hp.lr)
        else:
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9)
        if hp.scheduler is None:
            return opt
        if hp.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class WideNet(TinyNet):
    """TinyNet with a wider classifier, 256 -> 256 -> 256 -> 10: with ``targets=WIDE_TARGETS`` two
    square layers whose statistics are of their inputs (no copy of W: the same size dense or
    factorized), each 8 (256^2 + 257) bytes, 3x with held-out halves (collection in passes)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.classifier = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


WIDE_TARGETS = ["classifier.0", "classifier.2"]


class SettlingNet(TinyNet):
    """TinyNet whose targeted layers' spectra settle at a known epoch: after every training batch of
    epoch e each dense targeted layer's weight is set to U diag(s_e) V^T (U, V fixed, seeded), where
    the largest singular value is (1 + max(0, settle_epoch - e)) times its final value. The stable
    ranks change by far more than 10 % from one epoch to the next until ``settle_epoch`` and not at
    all afterwards: validation runs at the end of epochs ``settle_epoch`` and ``settle_epoch + 1``
    see the same weights, so a patience-1 watcher is ready at the second and switches at
    ``settle_epoch + 2``. The other layers train normally."""

    def __init__(self, settle_epoch: int = 2, **kw: Any) -> None:
        super().__init__(**kw)
        self.settle_epoch = settle_epoch
        g = torch.Generator().manual_seed(7)
        self._bases = {}
        for name in TARGETS:
            w = self.get_submodule(name).weight
            m, d = w.shape[0], w[0].numel()
            k = min(m, d)
            u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
            v, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
            self._bases[name] = (u, v, torch.linspace(1.0, 0.1, k) * w.detach().norm() / math.sqrt(k))

    def spectrum_weight(self, name: str, epoch: int) -> torch.Tensor:
        u, v, s = self._bases[name]
        s = s.clone()
        s[0] = s[0] * (1 + max(0, self.settle_epoch - epoch))
        return (u * s) @ v.T

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            for name in TARGETS:
                layer = self.get_submodule(name)
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    layer.weight.copy_(self.spectrum_weight(name, self.current_epoch).reshape(layer.weight.shape))


def rank_of(module: nn.Module) -> Optional[int]:
    return module.rank if isinstance(module, PAIRS) else None


def structure(model: nn.Module, names=TARGETS) -> dict[str, Optional[int]]:
    """name -> rank (None: dense) of the given layers."""
    return {n: rank_of(model.get_submodule(n)) for n in names}


def composed(model: nn.Module, names=TARGETS) -> dict[str, torch.Tensor]:
    """name -> the layer's weight as one float64 matrix (a pair's product): comparable across runs
    (factors themselves are only defined up to an invertible r x r map)."""
    from factorize_plugin.layers import weight_matrix

    return {n: weight_matrix(model.get_submodule(n))[0].clone() for n in names}


def trainable_ids(model: nn.Module) -> list[int]:
    return sorted(id(p) for p in model.parameters() if p.requires_grad)


def optimizer_ids(opt) -> list[int]:
    opt = getattr(opt, "_optimizer", opt)
    return sorted(id(p) for g in opt.param_groups for p in g["params"])


def state_dict_cpu(model: nn.Module) -> dict[str, Any]:
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()}


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    worst = 0.0
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].shape == b[k].shape, k
            worst = max(worst, float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0)
        else:
            assert a[k] == b[k], k
    return worst


class Probe(pl.Callback):
    """Records, per epoch, what the callback under test did. Put it after the callback."""

    def __init__(self, names=TARGETS) -> None:
        self.names = tuple(names)
        self.start: dict[int, dict] = {}  # epoch -> structure at on_train_epoch_start (after the swap)
        self.end: dict[int, dict] = {}  # epoch -> structure at on_train_epoch_end
        self.val_hooks: list[tuple[int, bool, int]] = []  # (epoch, sanity, hooks on the targets), per val batch
        self.lr: dict[int, list[float]] = {}
        self.opt_consistent: list[bool] = []  # optimizer params == model trainable params, per epoch start / batch
        self.opt_ids: list[int] = []
        self.sched_ids: list[int] = []
        self.losses: list[float] = []
        self.adam_end: dict[int, dict[str, tuple]] = {}  # epoch -> name -> (step, exp_avg clone)
        self.adam_start: dict[int, dict[str, tuple]] = {}
        self.unstepped_at_start: dict[int, int] = {}  # backward passes not yet followed by a step, at the swap
        self._unstepped = 0
        self.all_grads_present: list[bool] = []

    def _adam(self, trainer, pl_module) -> dict[str, tuple]:
        opt = trainer.optimizers[0]
        out = {}
        for n, p in pl_module.named_parameters():
            st = opt.state.get(p)
            out[n] = None if not st else (float(st["step"]), st["exp_avg"].clone() if "exp_avg" in st else None)
        return out

    def on_train_epoch_start(self, trainer, pl_module):
        e = trainer.current_epoch
        self.start[e] = structure(pl_module, self.names)
        self.lr[e] = [g["lr"] for g in trainer.optimizers[0].param_groups]
        self.opt_ids.append(id(trainer.optimizers[0]))
        self.sched_ids.append(id(trainer.lr_scheduler_configs[0].scheduler) if trainer.lr_scheduler_configs else 0)
        self.opt_consistent.append(optimizer_ids(trainer.optimizers[0]) == trainable_ids(pl_module))
        self.adam_start[e] = self._adam(trainer, pl_module)
        self.unstepped_at_start[e] = self._unstepped

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.opt_consistent.append(optimizer_ids(trainer.optimizers[0]) == trainable_ids(pl_module))

    def on_after_backward(self, trainer, pl_module):
        self._unstepped += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._unstepped = 0
        self.all_grads_present.append(all(p.grad is not None for p in pl_module.parameters() if p.requires_grad))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_epoch_end(self, trainer, pl_module):
        e = trainer.current_epoch
        self.end[e] = structure(pl_module, self.names)
        self.adam_end[e] = self._adam(trainer, pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in map(pl_module.get_submodule, self.names))
        self.val_hooks.append((trainer.current_epoch, trainer.sanity_checking, hooks))


def cosine_lr(base: float, t_max: int, epoch: int) -> float:
    return base * (1 + math.cos(math.pi * epoch / t_max)) / 2


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


class DumpOnTrainEnd(pl.Callback):
    """Each rank writes its final state dict (and structure) to ``<folder>/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        import os

        torch.save(
            {"state_dict": state_dict_cpu(pl_module), "structure": structure(pl_module)},
            os.path.join(self.folder, f"rank{trainer.global_rank}.pt"),
        )


def resume_trainer(callbacks: list, max_epochs: int, ckpt_dir=None) -> pl.Trainer:
    """A quiet, deterministic CPU Trainer for resume tests; with ``ckpt_dir`` a checkpoint per epoch
    (``{epoch}.ckpt``)."""
    callbacks = list(callbacks)
    if ckpt_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1))
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
        deterministic=True,
    )


def callback_from_yaml(tmp_path, **init_args):
    """The ``LowRankFactorization`` LightningCLI builds from examples/mnist.yaml with these callback
    ``init_args`` (parsed, not run)."""
    from pathlib import Path

    import yaml
    from lightning.pytorch import LightningDataModule, LightningModule

    from factorize_plugin import LowRankFactorization
    from factorize_plugin.integration.cli import FactorizeCLI

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "mnist.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"].update(init_args)
    cfg["trainer"]["logger"] = False
    path = tmp_path / "callback.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = FactorizeCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=["--config", str(path)],
    )  # fmt: skip
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, LowRankFactorization)]
    return cb
