"""Forward hooks that stream each chosen layer's inputs into float64 moment accumulators.

Memory per layer is that of one ``MomentAccumulator``: 8 * (D^2 + D + 1) bytes, with D the
layer's input features (C_in * k_h * k_w for a convolution), whatever the number of samples;
with ``space="auto"``, 8 * (K^2 + K + 1) with K = min(D, M) (plus a float64 copy of W).
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

from ..core.statistics import MomentAccumulator
from ..layers.adapters import LayerView, count_rows, input_rows, layer_view, weight_matrix
from .holdout import HeldOutHalves
from .speed import LayerInput


class ActivationCollector:
    """Collects input statistics of ``layers`` (name -> module) while the model runs forward.

    Args:
        layers: the modules to watch, by qualified name.
        max_samples: cap on rows per layer (tokens for Linear, output positions for Conv2d); once
            reached the layer's hook does nothing. Rows of a batch that would overshoot the cap are
            a random subset. ``None``: no cap.
        sample_fraction: share of each batch's rows to keep, drawn at random. ``"auto"`` keeps the
            float64 statistics' cost near ``AUTO_OVERHEAD`` of the layer's own forward cost
            (fraction = min(1, AUTO_OVERHEAD * M / D)) once the layer has ``WARMUP_FACTOR`` times
            as many rows as its statistics have features (all rows are kept until then);
            convolution patches are then gathered only at the sampled positions. 1.0 (default)
            keeps every row.
        seed: for the random subsets.
        space: ``"input"`` accumulates the layer's inputs (D x D per layer); ``"auto"`` accumulates
            the projected inputs x @ W (M x M) for layers with fewer outputs than inputs, which is
            exact only if the weights do not change between collection and solving.
        holdout: also keep two disjoint halves of each layer's rows while it has few
            (``holdout.HeldOutHalves``), for a held-out NMSE estimate.

    Use as a context manager, or ``attach()`` / ``detach()``. Works under ``torch.no_grad()``,
    ``torch.inference_mode()`` and autocast (autocast is disabled inside the hook).
    """

    AUTO_OVERHEAD = 0.1
    WARMUP_FACTOR = 4

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        max_samples: Optional[int] = 200_000,
        seed: int = 0,
        sample_fraction: Union[float, str] = 1.0,
        space: str = "input",
        holdout: bool = True,
    ) -> None:
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        if sample_fraction != "auto" and not (isinstance(sample_fraction, (int, float)) and 0 < sample_fraction <= 1):
            raise ValueError(f"sample_fraction must be in (0, 1] or 'auto', got {sample_fraction!r}")
        self.layers = dict(layers)
        self.max_samples = max_samples
        self.views: dict[str, LayerView] = {name: layer_view(m) for name, m in self.layers.items()}
        self._auto = sample_fraction == "auto"
        self.fractions: dict[str, float] = {
            name: min(1.0, self.AUTO_OVERHEAD * v.out_dim / v.in_dim) if self._auto else float(sample_fraction)
            for name, v in self.views.items()
        }
        if space not in ("input", "auto"):
            raise ValueError(f"space must be 'input' or 'auto', got {space!r}")
        self.projections: dict[str, torch.Tensor] = {
            name: weight_matrix(self.layers[name])[0]
            for name, v in self.views.items()
            if space == "auto" and v.out_dim < v.in_dim
        }
        self.stats: dict[str, MomentAccumulator] = {
            name: MomentAccumulator(v.out_dim, projection=self.projections[name])
            if name in self.projections
            else MomentAccumulator(v.in_dim)
            for name, v in self.views.items()
        }
        self.calls: dict[str, int] = {name: 0 for name in self.layers}
        self.positions: dict[str, float] = {name: 1.0 for name in self.layers}  # output positions per sample
        self.inputs: dict[str, LayerInput] = {}  # the first input each layer got (for the speed guard)
        self._generator = torch.Generator().manual_seed(seed)
        self._handles: list = []
        # two halves of a small set's rows, for an honest (held-out) error estimate
        self.holdout = HeldOutHalves(self.stats, enabled=holdout)

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
        view, stats, fraction = self.views[name], self.stats[name], self.fractions[name]
        projection = self.projections.get(name)
        projection32 = None if projection is None else projection.float()

        def hook(module: nn.Module, args: tuple) -> None:
            if name not in self.inputs:
                self.inputs[name] = LayerInput.of(args[0])
            seen = stats.num_samples
            if self.max_samples is not None and seen >= self.max_samples:
                return
            x = args[0]
            device_type = x.device.type if x.device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(device_type, enabled=False):
                total = count_rows(x, view)
                batch = x.shape[0] if x.ndim > (1 if view.geometry is None else 3) else 1
                self.positions[name] = total / max(batch, 1)
                # "auto" keeps at least the rows still missing to WARMUP_FACTOR x (statistics size),
                # so that small validation sets still give a well-determined covariance
                want = total if fraction >= 1 else max(1, round(fraction * total))
                if self._auto:
                    want = min(total, max(want, self.WARMUP_FACTOR * stats.in_features - seen))
                if self.max_samples is not None:
                    want = min(want, self.max_samples - seen)
                keep = None if want >= total else self._sample_rows(total, want, batch if view.geometry else 1)
                rows = input_rows(x.detach(), view, keep)
                if projection is not None:  # float64 inputs are projected in float64, others in float32
                    rows = rows @ projection if rows.dtype == torch.float64 else rows.float() @ projection32
                stats.update(rows)
                self.holdout.update(name, rows)
            self.calls[name] += 1

        return hook

    def _sample_rows(self, total: int, want: int, images: int) -> torch.Tensor:
        """``want`` random row indices out of ``total``. For convolutions the rows come from a random
        subset of about twice as many images as needed, so that only those images are padded."""
        per_image = total // images
        k = min(images, 2 * -(-want // per_image))
        if k >= images:
            return torch.randperm(total, generator=self._generator)[:want]
        chosen = torch.randperm(images, generator=self._generator)[:k]
        pos = torch.randperm(k * per_image, generator=self._generator)[:want]
        return chosen[pos // per_image] * per_image + pos % per_image

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
