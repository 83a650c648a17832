"""The whole-model speed decision bound to the training loop: the model's real training step.

``model_speed_check`` binds ``surgery.model_speed.ModelSpeedCheck`` to a ``Host``: the step is the
host's training step (Lightning: ``training_step`` under the trainer's precision context, on the
LightningModule itself, not through the DDP wrapper: only process 0 times, with no collective),
with the host's logging silenced and metric states put back afterwards (``Host.quiet``). The batch:
a training batch recorded in the epoch before the milestone (with ``interval="step"``: the training
batch the milestone precedes), else an evaluation batch.

``speed_check`` builds the guard of a milestone in either scope, and ``TrainingInputWatch`` keeps,
during the epoch before a milestone, what it times: the epoch's first training batch (whole-model
scope) or each layer's first training input (per-layer scope).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..surgery.timing.model_speed import ModelSpeedCheck
from ..surgery.timing.speed import InputRecorder, LayerInput, SpeedCheck, SpeedGuard
from .host import Host
from .output_shift import first_batches


def model_speed_check(
    host: Host, model: nn.Module, guard: SpeedGuard, step: Callable[[Any], Any], batch: Any
) -> ModelSpeedCheck:
    """A whole-model check timing ``step`` (the host's training step) on ``batch`` (already on the
    device); process 0 measures in a distributed job and every process gets its decision. Each
    comparison runs in alternating rounds under the guard's ``confidence``, ``repeats`` (most
    rounds) and ``budget``."""
    distributed = host.world_size > 1
    return ModelSpeedCheck(
        model, lambda: step(batch), list(host.optimizers), margin=guard.margin, clock=guard.clock,
        repeats=guard.repeats, min_time=guard.sample_seconds("model"), session=host.quiet,
        confidence=guard.confidence, budget=guard.budget, broadcast=host.broadcast if distributed else None,
        measure_here=host.is_global_zero,
    )  # fmt: skip


def model_scope(guard: Optional[SpeedGuard], host: Host) -> bool:
    """Whether the whole model's training step decides (the host has one to time: under Lightning's
    manual optimization it has none, since its training_step steps the real optimizers, so layers
    are timed alone)."""
    return guard is not None and guard.scope != "layer" and host.training_step() is not None


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
    host: Host,
    model: nn.Module,
    guard: Optional[SpeedGuard],
    watch: TrainingInputWatch,
    names: list[str],
    collected: Mapping[str, LayerInput],
    batches: list,
) -> Optional[Union[SpeedCheck, ModelSpeedCheck]]:
    """The guard bound to this milestone (process 0 measures in a distributed job). Whole-model
    scope: the training step on the epoch's first training batch (kept by ``watch``), else on an
    evaluation batch. Per layer (``names``): training inputs where ``watch`` recorded them, else the
    validation inputs ``collected`` at the training loader's batch size."""
    if guard is None:
        return None
    kept, seen = watch.take()
    step = host.training_step()
    if step is not None and model_scope(guard, host):
        batch = kept[0] if kept else (batches[0] if batches else first_batches(host, 1)[0])
        return model_speed_check(host, model, guard, step, batch)
    batch = host.train_batch_size()
    inputs = {}
    for name in names:
        if name in seen:
            inputs[name] = seen[name]
        elif name in collected:
            inputs[name] = dataclasses.replace(collected[name].with_batch(batch), requires_grad=True)
    return SpeedCheck(
        guard, inputs, list(host.optimizers), broadcast=host.broadcast if host.world_size > 1 else None,
        measure_here=host.is_global_zero,
    )
