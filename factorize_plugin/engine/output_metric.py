"""How much a milestone moved the *network's* output: a torchmetrics ``Metric`` with sum states.

Before the swap the engine runs a few evaluation batches (``output_batches``) through the model
and keeps the outputs y (logits); after the swap it runs the same batches again (ŷ) and updates
``OutputNMSE`` with them. The value is sum (ŷ - y)^2 / sum (y - mean y)^2 over every element of
those outputs, one scalar mean (as torchmetrics' ``RelativeSquaredError`` on flattened tensors).
Its states are sums in float64, so under DDP ``compute()`` sums them over the ranks (the
torchmetrics way: every rank calls it) and every rank gets the value of the union of their batches.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class OutputNMSE(Metric):
    """Relative squared error of ``after`` against ``before`` (any equal shapes), accumulated."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    sse: torch.Tensor  # the states add_state registers
    sum_y: torch.Tensor
    sum_y2: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("sse", "sum_y", "sum_y2", "count"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, after: torch.Tensor, before: torch.Tensor) -> None:
        if after.shape != before.shape:
            raise ValueError(f"the output's shape changed from {tuple(before.shape)} to {tuple(after.shape)}")
        y = before.detach().to(self.sse.device, torch.float64)
        y_hat = after.detach().to(self.sse.device, torch.float64)
        self.sse += (y_hat - y).square().sum()
        self.sum_y += y.sum()
        self.sum_y2 += y.square().sum()
        self.count += y.numel()

    def compute(self) -> torch.Tensor:
        spread = self.sum_y2 - self.sum_y.square() / self.count.clamp_min(1)
        return self.sse / spread.clamp_min(torch.finfo(torch.float64).tiny)
