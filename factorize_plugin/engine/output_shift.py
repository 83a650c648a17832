"""The shift of the network's output a milestone causes (``OutputShift``, logged as
``factorize/output_nmse``), and the first evaluation batches it (and the output probe) run."""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn as nn

from ..surgery.calling import InputFn, call_model, evaluating, output_tensor
from .host import Host


def first_batches(host: Host, n: int) -> list:
    """The first ``n`` batches of the host's first evaluation loader (fewer under its limit), on the
    device. The global RNG is left as it was: iterating a loader draws its base seed from it, and
    these extra passes must not change the training run's random stream."""
    loaders, limits = host.evaluation_loaders()
    batches: list = []
    with torch.random.fork_rng(devices=[]):
        for i, batch in enumerate(loaders[0]):
            if i >= min(n, limits[0]):
                break
            batches.append(host.to_device(batch, 0))
    return batches


class OutputShift:
    """How much a milestone moves the network's output on ``batches`` (the first evaluation
    batches): the outputs before the swap, then after it, into an ``OutputNMSE``. Costs
    2 * len(batches) forward passes per milestone (no grad, eval mode) and keeps the reference
    outputs (and the batches) in memory until ``after`` is called."""

    def __init__(self, host: Host, model: nn.Module, batches: list, input_fn: Optional[InputFn]) -> None:
        self.host, self.model, self.input_fn = host, model, input_fn
        start = time.perf_counter()
        self.batches = batches
        self.before = self._outputs()
        self.seconds = time.perf_counter() - start

    def _outputs(self) -> list[torch.Tensor]:
        out = []
        with evaluating(self.model):
            for batch in self.batches:
                with self.host.eval_context():
                    out.append(output_tensor(call_model(self.model, batch, self.input_fn)).detach().clone())
        return out

    def after(self) -> float:
        """The output NMSE after the swap (summed over all processes in a ``torch.distributed`` job:
        a collective)."""
        from .output_metric import OutputNMSE  # torchmetrics, loaded only where the shift is measured

        start = time.perf_counter()
        metric = OutputNMSE().to(self.host.device)
        for before, after in zip(self.before, self._outputs(), strict=True):
            metric.update(after, before)
        value = float(metric.compute())
        self.batches, self.before = [], []
        self.seconds += time.perf_counter() - start
        return value
