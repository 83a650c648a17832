"""The engine's ``Host`` for a Lightning ``Trainer``: the loop as the engine sees it, read from the
trainer and its LightningModule (validation batches through ``validation_step``, the training step
under the trainer's precision, the strategy's collectives, ``self.log``, the DDP re-wrap)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .lightning_internals import preserved_metric_states, rewrap_ddp, silenced_logging, validation_loaders


class LightningHost:
    """``engine.host.Host`` over ``trainer`` and ``pl_module`` (read live: the same host serves a whole fit)."""

    def __init__(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.trainer, self.pl_module = trainer, pl_module

    global_step = property(lambda self: self.trainer.global_step)
    world_size = property(lambda self: self.trainer.world_size)
    is_global_zero = property(lambda self: self.trainer.is_global_zero)
    device = property(lambda self: self.trainer.strategy.root_device)

    @property
    def optimizers(self) -> Sequence[torch.optim.Optimizer]:
        return self.trainer.optimizers

    @property
    def epoch(self) -> int:
        return self.trainer.current_epoch

    @epoch.setter
    def epoch(self, value: int) -> None:  # the engine's start_epoch: the trainer counts epochs itself
        assert value == self.trainer.current_epoch, (value, self.trainer.current_epoch)

    def steps_per_epoch(self) -> Optional[int]:
        batches = self.trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:  # inf: an iterable without a length
            return None
        return max(1, batches // max(1, self.trainer.accumulate_grad_batches))

    def train_batch_size(self) -> Optional[int]:
        loader = self.trainer.train_dataloader
        return getattr(loader, "batch_size", None) if loader is not None else None

    def evaluation_loaders(self) -> tuple[list, list]:
        return validation_loaders(self.trainer)

    def to_device(self, batch: Any, loader_index: int = 0) -> Any:
        return self.trainer.strategy.batch_to_device(batch, dataloader_idx=loader_index)

    def evaluation_step(self, batch: Any, index: int, loader_index: int, loaders: int) -> None:
        extra = {"dataloader_idx": loader_index} if loaders > 1 else {}
        self.pl_module.validation_step(batch, index, **extra)

    def eval_context(self) -> ContextManager[Any]:
        return self.trainer.precision_plugin.val_step_context()

    def training_step(self) -> Optional[Callable[[Any], Any]]:
        if not self.pl_module.automatic_optimization:  # its training_step steps the real optimizers
            return None

        def step(batch: Any) -> Any:
            with self.trainer.precision_plugin.train_step_context():
                return self.pl_module.training_step(batch, 0)

        return step

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        with silenced_logging(self.pl_module), preserved_metric_states(self.pl_module):
            yield

    def broadcast(self, obj: Any) -> Any:
        return self.trainer.strategy.broadcast(obj, src=0)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def log(self, metrics: dict[str, float]) -> None:
        # identical on every rank; sync_dist only keeps Lightning from warning about epoch-level logs
        self.pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=self.trainer.world_size > 1)

    def info(self, message: str) -> None:
        rank_zero_info(message)

    def warn(self, message: str) -> None:
        rank_zero_warn(message)

    def after_swap(self) -> None:
        rewrap_ddp(self.trainer)  # a collective under DDP: every rank gets here, whatever changed
