"""Forward hooks that stream each chosen layer's inputs into float64 moment accumulators.

Memory per layer is that of one ``MomentAccumulator``: 8 * (D^2 + D + 1) bytes, with D the
layer's input features (C_in * k_h * k_w for a convolution), whatever the number of samples.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn

from .core.statistics import MomentAccumulator
from .layers.adapters import LayerView, input_rows, layer_view


class ActivationCollector:
    """Collects input statistics of ``layers`` (name -> module) while the model runs forward.

    Args:
        layers: the modules to watch, by qualified name.
        max_samples: cap on rows per layer (tokens for Linear, output positions for Conv2d); once
            reached the layer's hook does nothing. Rows of a batch that would overshoot the cap are
            a random subset. ``None``: no cap.
        seed: for that subset.

    Use as a context manager, or ``attach()`` / ``detach()``. Works under ``torch.no_grad()``,
    ``torch.inference_mode()`` and autocast (autocast is disabled inside the hook).
    """

    def __init__(self, layers: Mapping[str, nn.Module], max_samples: Optional[int] = 200_000, seed: int = 0) -> None:
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.layers = dict(layers)
        self.max_samples = max_samples
        self.views: dict[str, LayerView] = {name: layer_view(m) for name, m in self.layers.items()}
        self.stats: dict[str, MomentAccumulator] = {
            name: MomentAccumulator(v.in_dim) for name, v in self.views.items()
        }
        self.calls: dict[str, int] = {name: 0 for name in self.layers}
        self.positions: dict[str, float] = {name: 1.0 for name in self.layers}  # output positions per sample
        self._generator = torch.Generator().manual_seed(seed)
        self._handles: list = []

    def attach(self) -> "ActivationCollector":
        if not self._handles:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_pre_hook(self._hook_for(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "ActivationCollector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _hook_for(self, name: str):
        view, stats = self.views[name], self.stats[name]

        def hook(module: nn.Module, args: tuple) -> None:
            seen = stats.num_samples
            if self.max_samples is not None and seen >= self.max_samples:
                return
            x = args[0]
            device_type = x.device.type if x.device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(device_type, enabled=False):
                rows = input_rows(module, x.detach(), view)
                batch = x.shape[0] if x.ndim > (1 if view.geometry is None else 3) else 1
                self.positions[name] = rows.shape[0] / max(batch, 1)
                if self.max_samples is not None and seen + rows.shape[0] > self.max_samples:
                    keep = torch.randperm(rows.shape[0], generator=self._generator)[: self.max_samples - seen]
                    rows = rows[keep.to(rows.device)]
                stats.update(rows)
            self.calls[name] += 1

        return hook

    def samples(self) -> dict[str, int]:
        return {name: s.num_samples for name, s in self.stats.items()}

    def check_nonempty(self) -> None:
        """Raises if any layer saw no samples (e.g. its hook was bypassed by ``torch.compile``)."""
        empty = sorted(name for name, n in self.samples().items() if n == 0)
        if empty:
            raise RuntimeError(
                f"no activations were recorded for layer(s) {empty}: they did not run during collection, or "
                "their hooks were bypassed (torch.compile skips hooks added after compilation; call "
                "torch._dynamo.reset() or collect on the uncompiled model). Refusing to factorize from empty statistics."
            )
