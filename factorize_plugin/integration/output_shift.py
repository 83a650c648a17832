"""The shift of the network's output a milestone causes (``OutputShift``, logged as
``factorize/output_nmse``) and whether the callback can measure the output at all."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from ..surgery.calling import InputFn, call_model, evaluating, output_tensor
from ..surgery.policies import RankPolicy
from .output_metric import OutputNMSE


def output_measurable(
    pl_module: LightningModule, policies: Mapping[Any, RankPolicy], budget_batches: int, output_batches: int
) -> bool:
    """Whether the module's output can be measured on a batch (``pl_module(input_fn(batch))``: it
    defines ``forward``); checked at setup. Without ``forward`` (all logic in the steps) a measuring
    ``ParamBudget`` is refused before training; the output-shift metric (only a metric) is skipped
    with a warning (returns False)."""
    if is_overridden("forward", pl_module, parent=LightningModule):
        return True
    name = type(pl_module).__name__
    measuring = sorted(epoch for epoch, policy in policies.items() if policy.uses_probe)
    if measuring and budget_batches > 0:
        raise ValueError(
            f"LowRankFactorization: {name} defines no forward, but the ParamBudget of milestone(s) {measuring} "
            f"measures each layer's effect on the output of {name}(input_fn(batch)) on budget_batches={budget_batches} "
            "validation batches. Define forward (training_step / validation_step can call it), or set "
            "budget_batches=0 to allocate by the layers' NMSE alone"
        )
    if output_batches > 0:
        rank_zero_warn(
            f"LowRankFactorization: {name} defines no forward, so the output shift at each milestone "
            f"(factorize/output_nmse, output_batches={output_batches}) cannot be measured and is skipped. Define "
            "forward to get it, or set output_batches=0 to silence this warning"
        )
    return False


class OutputShift:
    """How much a milestone moves the network's output on ``batches`` (the first validation
    batches, ``first_validation_batches``): the outputs before the swap, then after it, into an
    ``OutputNMSE``. Costs 2 * len(batches) forward passes per milestone (no grad, eval mode) and
    keeps the reference outputs (and the batches) in memory until ``after`` is called."""

    def __init__(
        self, trainer: Trainer, pl_module: LightningModule, batches: list, input_fn: Optional[InputFn]
    ) -> None:
        self.trainer, self.pl_module, self.input_fn = trainer, pl_module, input_fn
        start = time.perf_counter()
        self.batches = batches
        self.before = self._outputs()
        self.seconds = time.perf_counter() - start

    def _outputs(self) -> list[torch.Tensor]:
        context: Callable[[], Any] = self.trainer.precision_plugin.val_step_context
        out = []
        with evaluating(self.pl_module):
            for batch in self.batches:
                with context():
                    out.append(output_tensor(call_model(self.pl_module, batch, self.input_fn)).detach().clone())
        return out

    def after(self) -> float:
        """The output NMSE after the swap (summed over all processes under DDP: a collective)."""
        start = time.perf_counter()
        metric = OutputNMSE().to(self.pl_module.device)
        for before, after in zip(self.before, self._outputs(), strict=True):
            metric.update(after, before)
        value = float(metric.compute())
        self.batches, self.before = [], []
        self.seconds += time.perf_counter() - start
        return value
