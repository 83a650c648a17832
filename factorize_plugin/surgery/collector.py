"""Forward hooks that stream each chosen layer's inputs (or, in the projected space, its outputs)
into float64 moment accumulators.

Memory per layer is that of one ``MomentAccumulator``: 8 * (D^2 + D + 1) bytes, with D the
layer's input features (C_in * k_h * k_w for a convolution), whatever the number of samples;
with ``space="auto"``, 8 * (K^2 + K + 1) with K = min(D, M) (plus a float64 copy of W). Twice that
while a layer has few rows (the held-out halves), plus up to ``BUFFER_ROWS`` waiting rows.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

from ..core.statistics import MomentAccumulator, work_dtype
from ..layers.adapters import LayerView, count_rows, input_rows, layer_view, output_rows, weight_matrix
from . import fastpath
from .holdout import HeldOutHalves
from .speed import LayerInput, autocast_dtype


def _autocast_type(device: torch.device) -> str:
    return device.type if device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"


def _exact_output(x: torch.Tensor, output: object) -> bool:
    """Whether the layer's output is its full-precision product with its weights: a float32 or
    float64 tensor of the input's dtype, computed outside autocast (whose bf16/fp16 products
    would be less precise than projecting the inputs in float32)."""
    return (
        isinstance(output, torch.Tensor)
        and output.dtype in (torch.float32, torch.float64)
        and output.dtype == x.dtype
        and autocast_dtype(x.device) is None
    )


class ActivationCollector:
    """Collects input statistics of ``layers`` (name -> module) while the model runs forward.

    Args:
        layers: the modules to watch, by qualified name.
        max_samples: cap on rows per layer (tokens for Linear, output positions for Conv2d); once
            reached the layer's hook does nothing. Rows of a batch that would overshoot the cap are
            a random subset. ``None``: no cap.
        sample_fraction: share of each batch's rows to keep, drawn at random. ``"auto"`` keeps the
            float64 statistics' cost near ``AUTO_OVERHEAD`` of the layer's own forward cost
            (fraction = min(1, AUTO_OVERHEAD * M / D)), but at least ``WARMUP_FACTOR`` times as
            many rows as its statistics have features, so that a short run still gives a
            well-determined covariance; convolution patches are then gathered only at the sampled
            positions. 1.0 (default) keeps every row.
        expected_batches: with ``"auto"``, the number of batches the run will have (Lightning's
            ``num_val_batches`` summed over its loaders, a calibration list's length): those
            minimum rows are then drawn evenly from every batch instead of all from the first
            ones (what a small batch cannot give, the batches after it do).
        seed: for the random subsets.
        space: ``"input"`` accumulates the layer's inputs (D x D per layer); ``"auto"`` accumulates
            the projected inputs z = x @ W (M x M) for layers with fewer outputs than inputs, which is
            exact only if the weights do not change between collection and solving. z is read off
            the layer's own output (less its bias) when that is float32/float64 and computed
            outside autocast, else the inputs are projected in float32.
        holdout: also keep two disjoint halves of each layer's rows while it has few
            (``holdout.HeldOutHalves``), for a held-out NMSE estimate.
        counted: layers left dense (a tied head, ...) whose output positions per sample are
            recorded in ``positions`` too, without statistics: the reports count their
            multiply-adds per position like those of the factorized layers.

    Use as a context manager, or ``attach()`` / ``detach()``. Works under ``torch.no_grad()``,
    ``torch.inference_mode()`` and autocast (the statistics' products are computed with autocast off).
    """

    AUTO_OVERHEAD = 0.05
    WARMUP_FACTOR = 2
    BUFFER_ROWS = 1024

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        max_samples: Optional[int] = 200_000,
        seed: int = 0,
        sample_fraction: Union[float, str] = 1.0,
        space: str = "input",
        holdout: bool = True,
        expected_batches: Optional[int] = None,
        counted: Optional[Mapping[str, nn.Module]] = None,
    ) -> None:
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        if sample_fraction != "auto" and not (isinstance(sample_fraction, (int, float)) and 0 < sample_fraction <= 1):
            raise ValueError(f"sample_fraction must be in (0, 1] or 'auto', got {sample_fraction!r}")
        self.layers = dict(layers)
        self.max_samples = max_samples
        self.views: dict[str, LayerView] = {name: layer_view(m) for name, m in self.layers.items()}
        self._auto = sample_fraction == "auto"
        self.expected_batches = expected_batches if expected_batches and expected_batches < float("inf") else None
        self.fractions: dict[str, float] = {
            name: min(1.0, self.AUTO_OVERHEAD * v.out_dim / v.in_dim) if self._auto else float(sample_fraction)
            for name, v in self.views.items()
        }
        if space not in ("input", "auto"):
            raise ValueError(f"space must be 'input' or 'auto', got {space!r}")
        projected = [name for name, v in self.views.items() if space == "auto" and v.out_dim < v.in_dim]
        matrices = {name: weight_matrix(self.layers[name]) for name in projected}
        self.projections: dict[str, torch.Tensor] = {name: w for name, (w, _) in matrices.items()}
        self._biases = {name: b for name, (_, b) in matrices.items()}  # z = y - b from the layer's output
        self._stats: dict[str, MomentAccumulator] = {
            name: MomentAccumulator(v.out_dim, projection=self.projections[name])
            if name in self.projections
            else MomentAccumulator(v.in_dim)
            for name, v in self.views.items()
        }
        self.calls: dict[str, int] = {name: 0 for name in self.layers}
        self.counted = {name: m for name, m in (counted or {}).items() if name not in self.layers}
        # output positions per sample (tokens, pixels) of the layers and of the counted ones
        self.positions: dict[str, float] = {name: 1.0 for name in [*self.layers, *self.counted]}
        self.inputs: dict[str, LayerInput] = {}  # the first input each layer got (for the speed guard)
        self._generator = torch.Generator().manual_seed(seed)
        # rows waiting for _drain, by (name, already projected)
        self._buffers: dict[tuple[str, bool], list[torch.Tensor]] = {(n, p): [] for n in self.layers for p in (False, True)}
        self._buffered_rows: dict[tuple[str, bool], int] = dict.fromkeys(self._buffers, 0)
        # rows this process kept per layer, counted here for the hooks: the accumulators' counts are
        # device tensors, and reading them in every hook call would synchronize with a GPU
        self._kept: dict[str, int] = dict.fromkeys(self.layers, 0)
        self._projection_copies: dict[tuple, torch.Tensor] = {}
        self._handles: list = []
        # two halves of a small set's rows, for an honest (held-out) error estimate
        self.holdout = HeldOutHalves(self._stats, enabled=holdout)

    @property
    def stats(self) -> dict[str, MomentAccumulator]:
        """Every row each layer kept, by name (a layer with held-out halves: their union)."""
        for name in self.layers:
            self._drain(name)
        unions = {name: self.holdout.union(name) for name in self._stats}
        return {name: s if unions[name] is None else unions[name] for name, s in self._stats.items()}

    def attach(self) -> "ActivationCollector":
        if not self._handles:
            fastpath.hold()  # hooked transformer layers cannot take nested tensors (see fastpath)
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._hook_for(name)))
            for name, module in self.counted.items():
                self._handles.append(module.register_forward_pre_hook(self._position_hook(name, layer_view(module))))
        return self

    def detach(self) -> None:
        if self._handles:
            fastpath.release()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name in self.layers:
            self._drain(name)

    def __enter__(self) -> "ActivationCollector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _hook_for(self, name: str):
        view, fraction, width = self.views[name], self.fractions[name], self._stats[name].in_features
        bias = self._biases.get(name)

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name not in self.inputs:
                self.inputs[name] = LayerInput.of(args[0])
            seen = self._kept[name]
            if self.max_samples is not None and seen >= self.max_samples:
                return
            # no autocast or grad concerns here: only indexing and copies (the products are in _drain)
            x = args[0].detach()
            total = count_rows(x, view)
            batch = x.shape[0] if x.ndim > (1 if view.geometry is None else 3) else 1
            self.positions[name] = total / max(batch, 1)
            want = total if fraction >= 1 else max(1, round(fraction * total))
            if self._auto:
                want = min(total, max(want, self._minimum_rows(width, seen, self.calls[name])))
            if self.max_samples is not None:
                want = min(want, self.max_samples - seen)
            keep = None if want >= total else self._sample_rows(total, want, batch if view.geometry else 1)
            if name in self.projections and _exact_output(x, output):
                # the projected rows z = x @ W are the layer's own output less its bias: no patches
                # to gather and no product to compute
                rows = output_rows(output.detach(), view, keep)
                rows = rows.clone() if bias is None else rows - bias.to(rows.device, rows.dtype)
                self._buffer(name, rows, projected=True)
            else:
                rows = input_rows(x, view, keep)
                if keep is None and view.geometry is None:
                    rows = rows.clone()  # a view of the activation, which may be changed in place later
                self._buffer(name, rows, projected=False)
            self.calls[name] += 1

        return hook

    def _position_hook(self, name: str, view: LayerView):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            batch = x.shape[0] if x.ndim > (1 if view.geometry is None else 3) else 1
            self.positions[name] = count_rows(x, view) / max(batch, 1)

        return hook

    def _buffer(self, name: str, rows: torch.Tensor, projected: bool) -> None:
        """Keeps ``rows`` [n, D] (or [n, M] when ``projected``) of layer ``name`` until
        ``BUFFER_ROWS`` are waiting: the hook then does a few tensor operations per call, and the
        projection and the two held-out halves see a few large blocks instead of many small ones."""
        key = (name, projected)
        buffer = self._buffers[key]
        if buffer and buffer[-1].dtype != rows.dtype:
            self._drain(name)
        buffer.append(rows)
        self._buffered_rows[key] += rows.shape[0]
        self._kept[name] += rows.shape[0]
        if self._buffered_rows[key] >= self.BUFFER_ROWS:
            self._drain(name)

    def _drain(self, name: str) -> None:
        """Moves the buffered rows of ``name`` into its statistics (input rows projected first, for
        "auto" space: float64 rows in float64, others in float32)."""
        for projected in (False, True):
            buffer = self._buffers[(name, projected)]
            if not buffer:
                continue
            device_type = _autocast_type(buffer[0].device)
            # float64 buffers made here must not be inference tensors; autocast must not touch the products
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(device_type, enabled=False):
                rows = buffer[0] if len(buffer) == 1 else torch.cat(buffer)
                buffer.clear()
                self._buffered_rows[(name, projected)] = 0
                if name in self.projections and not projected:
                    rows = rows.to(work_dtype(rows)) @ self._projection_for(name, rows)
                if not self.holdout.update(name, rows):
                    self._stats[name].update(rows)

    def _projection_for(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """W of layer ``name`` on the rows' device, in the dtype they are multiplied in (cached)."""
        key = (name, rows.device, work_dtype(rows))
        if key not in self._projection_copies:
            self._projection_copies[key] = self.projections[name].to(rows.device, key[2])
        return self._projection_copies[key]

    def _minimum_rows(self, width: int, seen: int, calls: int) -> int:
        """Rows this call must keep for "auto" to reach WARMUP_FACTOR x ``width`` rows: the rows
        still missing shared evenly over the calls still expected (one per expected batch; the
        share grows when earlier batches were too small to give theirs, e.g. a short last batch or
        a second loader's larger batches), else all that are missing (from the first batches)."""
        missing = self.WARMUP_FACTOR * width - seen
        if self.expected_batches is None or missing <= 0:
            return missing
        return -(-missing // max(1, self.expected_batches - calls))

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
        """Rows in each layer's statistics (after a DDP ``all_reduce_``: of every process)."""
        waiting = {name: self._buffered_rows[(name, False)] + self._buffered_rows[(name, True)] for name in self._stats}
        return {name: s.num_samples + self.holdout.rows(name) + waiting[name] for name, s in self._stats.items()}

    def check_nonempty(self) -> None:
        """Raises if any layer saw no samples (e.g. its hook was bypassed by ``torch.compile``)."""
        empty = sorted(name for name, n in self.samples().items() if n == 0)
        if empty:
            raise RuntimeError(
                f"no activations were recorded for layer(s) {empty}: they did not run during collection, or "
                "their hooks were bypassed (torch.compile skips hooks added after compilation; call "
                "torch._dynamo.reset() or collect on the uncompiled model). Refusing to factorize from empty statistics."
            )
