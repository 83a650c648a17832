"""The Lightning side of the whole-model speed decision: the model's real training step.

``model_speed_check`` binds ``surgery.model_speed.ModelSpeedCheck`` to a Trainer: the step is
``pl_module.training_step(batch, 0)`` under the trainer's precision context (autocast for
``*-mixed``) on the trainer's device, called on the LightningModule itself (not through the DDP
wrapper: only rank 0 times, with no collective), with ``self.log`` silenced and torchmetrics
states put back afterwards. The batch: a training batch recorded in the epoch before the
milestone (with ``interval="step"``: the training batch the milestone precedes), else a validation
batch.

``speed_check`` builds the guard of a milestone in either scope, and ``TrainingInputWatch`` keeps,
during the epoch before a milestone, what it times: the epoch's first training batch (whole-model
scope) or each layer's first training input (per-layer scope).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer

from ..surgery.model_speed import ModelSpeedCheck
from ..surgery.speed import InputRecorder, LayerInput, SpeedCheck, SpeedGuard
from .lightning_internals import first_validation_batches, preserved_metric_states, silenced_logging


def model_speed_check(trainer: Trainer, pl_module: LightningModule, guard: SpeedGuard, batch: Any) -> ModelSpeedCheck:
    """A whole-model check timing ``pl_module``'s training step on ``batch`` (already on the
    device); rank 0 measures under DDP and every rank gets its decision. Each comparison runs in
    alternating rounds under the guard's ``confidence``, ``repeats`` (most rounds) and ``budget``."""

    def forward() -> Any:
        with trainer.precision_plugin.train_step_context():
            return pl_module.training_step(batch, 0)

    @contextlib.contextmanager
    def session() -> Iterator[None]:
        with silenced_logging(pl_module), preserved_metric_states(pl_module):
            yield

    distributed = trainer.world_size > 1
    return ModelSpeedCheck(
        pl_module, forward, trainer.optimizers, margin=guard.margin, clock=guard.clock,
        repeats=guard.repeats, min_time=guard.sample_seconds("model"), session=session,
        confidence=guard.confidence, budget=guard.budget,
        broadcast=(lambda obj: trainer.strategy.broadcast(obj, src=0)) if distributed else None,
        measure_here=trainer.is_global_zero,
    )


def model_scope(guard: Optional[SpeedGuard], pl_module: LightningModule) -> bool:
    """Whether the whole model's training step decides (manual optimization: its training_step
    steps the real optimizers, so layers are timed alone)."""
    return guard is not None and guard.scope != "layer" and pl_module.automatic_optimization


class TrainingInputWatch:
    """During the epoch before a milestone: keeps its first training batch (whole-model scope) or
    records each layer's first training input (per-layer scope: a forward pre-hook that removes
    itself after one call) for the speed guard."""

    def __init__(self) -> None:
        self.recorder: Optional[InputRecorder] = None  # first training batch's input per layer
        self.batch: Optional[list] = None  # while watching: [] until the epoch's first training batch is kept

    def start(self, layers: Mapping[str, torch.nn.Module], whole_model: bool) -> None:
        self.drop()
        if whole_model:
            self.batch = []
        else:
            self.recorder = InputRecorder(layers, training_only=True).attach()

    def keep(self, batch: Any) -> None:
        """Called with each training batch: keeps the first (on the device) while watching."""
        if self.batch is not None and not self.batch:
            self.batch.append(batch)

    def take(self) -> tuple[list, dict[str, LayerInput]]:
        """The kept batch (in a list: empty if none) and the recorded inputs per layer; stops watching."""
        batch = self.batch or []
        inputs = dict(self.recorder.inputs) if self.recorder is not None else {}
        self.drop()
        return batch, inputs

    def drop(self) -> None:
        if self.recorder is not None:
            self.recorder.detach()
        self.recorder, self.batch = None, None


def speed_check(
    trainer: Trainer,
    pl_module: LightningModule,
    guard: Optional[SpeedGuard],
    watch: TrainingInputWatch,
    names: list[str],
    collected: Mapping[str, LayerInput],
    batches: list,
) -> Optional[Union[SpeedCheck, ModelSpeedCheck]]:
    """The guard bound to this milestone (rank 0 measures under DDP). Whole-model scope: the
    training step on the epoch's first training batch (kept by ``watch``), else on a validation
    batch. Per layer (``names``): training inputs where ``watch`` recorded them, else the
    validation inputs ``collected`` at the training loader's batch size."""
    if guard is None:
        return None
    kept, seen = watch.take()
    if model_scope(guard, pl_module):
        batch = kept[0] if kept else (batches[0] if batches else first_validation_batches(trainer, 1)[0])
        return model_speed_check(trainer, pl_module, guard, batch)
    batch = getattr(trainer.train_dataloader, "batch_size", None) if trainer.train_dataloader is not None else None
    inputs = {}
    for name in names:
        if name in seen:
            inputs[name] = seen[name]
        elif name in collected:
            inputs[name] = dataclasses.replace(collected[name].with_batch(batch), requires_grad=True)
    distributed = trainer.world_size > 1
    return SpeedCheck(
        guard, inputs, trainer.optimizers,
        broadcast=(lambda obj: trainer.strategy.broadcast(obj, src=0)) if distributed else None,
        measure_here=trainer.is_global_zero,
    )
