"""The Lightning side of the whole-model speed decision: the model's real training step.

``model_speed_check`` binds ``surgery.model_speed.ModelSpeedCheck`` to a Trainer: the step is
``pl_module.training_step(batch, 0)`` under the trainer's precision context (autocast for
``*-mixed``) on the trainer's device, called on the LightningModule itself (not through the DDP
wrapper: only rank 0 times, with no collective), with ``self.log`` silenced and torchmetrics
states put back afterwards. The batch: a training batch recorded in the epoch before the
milestone, else a validation batch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from lightning.pytorch import LightningModule, Trainer

from ..surgery.model_speed import ModelSpeedCheck
from ..surgery.speed import SpeedGuard
from .lightning_internals import preserved_metric_states, silenced_logging


def model_speed_check(trainer: Trainer, pl_module: LightningModule, guard: SpeedGuard, batch: Any) -> ModelSpeedCheck:
    """A whole-model check timing ``pl_module``'s training step on ``batch`` (already on the
    device); rank 0 measures under DDP and every rank gets its decision. A whole step is long and
    steady next to a layer's: median of ``max(3, guard.repeats // 2)`` samples (3 by default)
    after 2 warm-up steps."""

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
        repeats=max(3, guard.repeats // 2), min_time=guard.min_time, session=session,
        broadcast=(lambda obj: trainer.strategy.broadcast(obj, src=0)) if distributed else None,
        measure_here=trainer.is_global_zero,
    )
