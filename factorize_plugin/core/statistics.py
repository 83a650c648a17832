"""Streaming first and second moments of a layer's inputs (and optionally targets), in float64.

The exact low-rank solver needs the data only through these moments, so memory is
O(D^2 + D*M) whatever the number of samples. Chunks are centered on their own mean before the
outer product and merged with the parallel-variance update (Chan et al.), so an offset on the
inputs costs no precision (centered float32/bf16/fp16 chunks are multiplied in float32 and summed
in float64; float64 data stays float64 throughout); merging across processes is two sum
all-reduces.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, cast

import torch

SumFn = Callable[[torch.Tensor], torch.Tensor]
"""Sums a flat float64 tensor across processes in place (and returns it)."""


def _positive_int(value: object, name: str, what: str) -> int:
    """``value`` as an int >= 1 (Python or NumPy integers), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 ({what}), got {value!r}")
    return int(value)


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 data is multiplied in float64; everything else in float32 (after centering)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


GRAM_BLOCK = 128
"""Column block of ``add_gram_``: products of fewer columns lose BLAS efficiency."""


def add_gram_(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out += x.T @ x`` (out [D, D], float64; x [n, D]), computing only the blocks on and above
    the diagonal and adding each straight into ``out`` (no [D, D] temporary in x's dtype).

    The product is symmetric, so up to 8 column blocks of >= ``GRAM_BLOCK`` columns, each also
    added mirrored below the diagonal, cost about 0.6 of the full product on a CPU (D=1024,
    8,192 rows); the entries are the same dot products as in ``x.T @ x``.
    """
    d = x.shape[1]
    blocks = min(8, d // GRAM_BLOCK)
    if blocks < 2:
        return out.add_(x.T @ x)
    edges = [i * d // blocks for i in range(blocks + 1)]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        upper = x[:, lo:hi].T @ x[:, lo:]  # [hi - lo, d - lo]
        out[lo:hi, lo:].add_(upper)
        out[hi:, lo:hi].add_(upper[:, hi - lo :].T)
    return out


def _shifted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x - s`` with s the mean of x [n, D] in x's own dtype, the float64 mean r [D] of those
    shifted rows (rounding leaves it near, not at, zero) and the float64 mean s + r of x."""
    shift = x.mean(0)
    x = x - shift
    resid = x.mean(0).double()
    return x, resid, shift.double() + resid


class MomentAccumulator:
    """Float64 running mean and centered second moments of ``x`` (and optionally ``y``).

    Args:
        in_features: D, the last dimension of ``x``.
        out_features: M, the last dimension of ``y``. Leave ``None`` when the target is the layer's
            own output ``y = x @ W + b`` (then only input moments are needed).
        device: where the float64 buffers live (default: CPU, or the first update's device).
        chunk_size: rows per float64 chunk; bounds the temporary memory of an update.
        projection: W [D0, D] when the samples are a layer's projected inputs ``z = x @ W`` rather
            than its inputs ``x`` [D0] (cheaper when the layer has fewer outputs than inputs;
            ``decompose`` then solves in that space). The caller feeds ``z``. Kept as a snapshot
            in W's own dtype (``.detach().clone()``: later in-place changes of the parameter do
            not reach it; bf16/float16/float32 -> float64 is exact, so nothing is lost); whoever
            needs it in float64 upcasts on use.

    State (all float64): ``count`` (scalar), ``mean_x`` [D], ``cxx`` [D, D] = sum (x - mean)(x - mean)^T,
    and with targets ``mean_y`` [M], ``cxy`` [D, M], ``syy`` (scalar) = sum ||y - mean_y||^2.
    """

    def __init__(
        self,
        in_features: int,
        out_features: Optional[int] = None,
        device: Optional[torch.device | str] = None,
        chunk_size: int = 8192,
        projection: Optional[torch.Tensor] = None,
    ) -> None:
        self.in_features = _positive_int(in_features, "in_features", "the last dimension of x")
        self.out_features = (
            None if out_features is None else _positive_int(out_features, "out_features", "the last dimension of y")
        )
        self.chunk_size = _positive_int(chunk_size, "chunk_size", "the number of rows merged per float64 chunk")
        if projection is not None and projection.shape[1] != in_features:
            raise ValueError(f"projection must be [D0, {in_features}], got {tuple(projection.shape)}")
        self.projection = None if projection is None else projection.detach().clone()
        self._device = None if device is None else torch.device(device)
        self._allocated = False
        # small updates are buffered and merged chunk_size rows at a time: a merge costs O(D^2)
        # whatever its size, so merging every small batch would dominate for large D
        self._pending: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        self._pending_rows = 0
        if self._device is not None:
            self._allocate(self._device)

    # ------------------------------------------------------------------ state
    def _allocate(self, device: torch.device) -> None:
        f64: dict[str, Any] = dict(dtype=torch.float64, device=device)
        d = self.in_features
        self._count = torch.zeros((), **f64)
        self._mean_x = torch.zeros(d, **f64)
        self._cxx = torch.zeros(d, d, **f64)
        if self.out_features is not None:
            m = self.out_features
            self._mean_y = torch.zeros(m, **f64)
            self._cxy = torch.zeros(d, m, **f64)
            self._syy = torch.zeros((), **f64)
        self._device = device
        self._allocated = True

    @property
    def has_targets(self) -> bool:
        return self.out_features is not None

    @property
    def num_samples(self) -> int:
        return (int(self._count.item()) if self._allocated else 0) + self._pending_rows

    @staticmethod  # called in the class body below (callable from Python 3.10), then deleted
    def _flushed(name: str) -> Any:  # builds a property that merges pending rows first
        def get(self: "MomentAccumulator") -> torch.Tensor:
            self.flush()
            return getattr(self, name)

        return property(get)

    count = _flushed("_count")
    mean_x = _flushed("_mean_x")
    cxx = _flushed("_cxx")
    mean_y = _flushed("_mean_y")
    cxy = _flushed("_cxy")
    syy = _flushed("_syy")
    del _flushed

    @property
    def device(self) -> Optional[torch.device]:
        return self._device

    @property
    def allocated(self) -> bool:
        """Whether the float64 buffers exist (they are made on the first update or merge)."""
        return self._allocated

    def nbytes(self) -> int:
        """Bytes held by the float64 buffers: 8 * (D^2 + D + 1 [+ D*M + M + 1])."""
        d, m = self.in_features, self.out_features or 0
        extra = d * m + m + 1 if self.out_features is not None else 0
        return 8 * (d * d + d + 1 + extra)

    def state_tensors(self) -> list[torch.Tensor]:
        """The buffers in a fixed order (for serialization)."""
        self._ensure_allocated()
        self.flush()
        names = ["_count", "_mean_x", "_cxx"] + (["_mean_y", "_cxy", "_syy"] if self.has_targets else [])
        return [getattr(self, n) for n in names]

    def _ensure_allocated(self) -> None:
        if not self._allocated:
            self._allocate(self._device or torch.device("cpu"))

    # ---------------------------------------------------------------- updates
    @torch.no_grad()
    def update(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> "MomentAccumulator":
        """Adds samples. ``x``: [..., D]; ``y``: [..., M] with the same leading shape (only when
        the accumulator tracks targets). Any floating dtype; accumulation is float64."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features in its last dimension, expected {self.in_features}")
        if self.has_targets != (y is not None):
            raise ValueError("y must be given exactly when the accumulator was built with out_features")
        if not self._allocated:
            self._allocate(self._device or x.device)
        x = x.detach().reshape(-1, self.in_features)
        if y is not None:
            if y.shape[-1] != self.out_features:
                raise ValueError(f"y has {y.shape[-1]} features, expected {self.out_features}")
            y = y.detach().reshape(-1, self.out_features)
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"x and y hold different numbers of samples: {x.shape[0]} vs {y.shape[0]}")
        if x.shape[0] == 0:
            return self
        if x.shape[0] >= self.chunk_size:
            self.flush()
            for start in range(0, x.shape[0], self.chunk_size):
                xc = x[start : start + self.chunk_size].to(self._device, work_dtype(x))
                yc = None if y is None else y[start : start + self.chunk_size].to(self._device, work_dtype(y))
                self._merge_chunk(xc, yc)
            return self
        self._pending.append(
            (
                x.to(self._device, work_dtype(x), copy=True),
                None if y is None else y.to(self._device, work_dtype(y), copy=True),
            )
        )
        self._pending_rows += x.shape[0]
        if self._pending_rows >= self.chunk_size:
            self.flush()
        return self

    def flush(self) -> None:
        """Merges buffered rows into the moments (done automatically before any read)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        x = torch.cat([p[0] for p in pending])
        # every chunk has targets or none has (update checks the kind of accumulator)
        y = None if pending[0][1] is None else torch.cat([cast(torch.Tensor, p[1]) for p in pending])
        self._merge_chunk(x, y)

    def _merge_chunk(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        """Merges one chunk (float64, or float32 for lower-precision data). The chunk is centered
        on its own mean first, so its product needs no float64 range: a float32 chunk is
        multiplied in float32 (twice as fast on CPUs, far more on GPUs; relative error ~1e-7 of
        the chunk's own spread) and the result is summed into the float64 totals. The centering
        shift is the chunk's mean in its own dtype; the residual mean r of the shifted rows
        corrects both the mean and the second moments exactly (sum (x-s)(x-s)^T - n r r^T), with
        no float64 copy of the chunk."""
        n_b = x.shape[0]
        x, resid, mean_b = _shifted(x)
        n_a = self._count.item()
        n = n_a + n_b
        delta = mean_b - self._mean_x
        w = n_a * n_b / n
        add_gram_(self._cxx, x).addr_(resid, resid, alpha=-n_b).addr_(delta, delta, alpha=w)
        self._mean_x.add_(delta, alpha=n_b / n)
        if y is not None:
            y, resid_y, mean_yb = _shifted(y)
            delta_y = mean_yb - self._mean_y
            self._cxy.add_(x.T @ y.to(x.dtype)).addr_(resid, resid_y, alpha=-n_b).addr_(delta, delta_y, alpha=w)
            self._syy.add_(
                torch.linalg.vecdot(y.reshape(-1), y.reshape(-1)).double()
                - n_b * resid_y.square().sum()
                + w * delta_y.square().sum()
            )
            self._mean_y.add_(delta_y, alpha=n_b / n)
        self._count.add_(n_b)

    @torch.no_grad()
    def merge_(self, other: "MomentAccumulator") -> "MomentAccumulator":
        """Adds the samples summarized by ``other`` (same feature sizes) into this accumulator."""
        if (other.in_features, other.out_features) != (self.in_features, self.out_features):
            raise ValueError("cannot merge accumulators of different feature sizes")
        if other.num_samples == 0:
            return self
        if not self._allocated:  # an accumulator without a device of its own adopts the other's
            self._allocate(self._device or other.device or torch.device("cpu"))
        self.flush()
        n_a, n_b = self._count.item(), other.count.item()
        n = n_a + n_b
        dev = self._device
        delta = other.mean_x.to(dev) - self._mean_x
        w = n_a * n_b / n
        self._cxx.add_(other.cxx.to(dev)).add_(torch.outer(delta, delta), alpha=w)
        self._mean_x.add_(delta, alpha=n_b / n)
        if self.has_targets:
            delta_y = other.mean_y.to(dev) - self._mean_y
            self._cxy.add_(other.cxy.to(dev)).add_(torch.outer(delta, delta_y), alpha=w)
            self._syy.add_(other.syy.to(dev) + w * delta_y.square().sum())
            self._mean_y.add_(delta_y, alpha=n_b / n)
        self._count.add_(n_b)
        return self

    @torch.no_grad()
    def all_reduce_(self, sum_fn: SumFn, moments_fn: Optional[SumFn] = None) -> "MomentAccumulator":
        """Replaces the local moments by those of the union of all processes' samples.

        ``sum_fn`` sums a flat float64 tensor across processes (e.g. ``torch.distributed.all_reduce``
        or Lightning's ``strategy.reduce(t, reduce_op="sum")``). First the counts and sums (giving
        the global mean), then each second-moment buffer, re-centered in place on the global mean
        (two collectives, four with targets). Every process must call this, in the same order
        across accumulators.

        ``moments_fn`` (default ``sum_fn``) sums the second-moment buffers instead: a sum into one
        process (``torch.distributed.reduce`` to ``dst``) leaves the union's moments on that process
        only; the count and mean are the union's everywhere, the other processes' second moments
        are meaningless afterwards (drop them).
        """
        moments_fn = sum_fn if moments_fn is None else moments_fn
        self._ensure_allocated()
        self.flush()
        first = [self._count.reshape(1), self._mean_x * self._count]
        if self.has_targets:
            first.append(self._mean_y * self._count)
        flat = sum_fn(torch.cat(first))
        d = self.in_features
        n = flat[0].clone()
        g_x = flat[1 : 1 + d] / n.clamp_min(1)
        # re-center the local second moments on the global mean, in place, and sum each buffer
        local_n = float(self._count)
        dx = self._mean_x - g_x
        self._cxx.addr_(dx, dx, alpha=local_n)
        self._cxx.view(-1).copy_(moments_fn(self._cxx.view(-1)))
        if self.has_targets:
            g_y = flat[1 + d :] / n.clamp_min(1)
            dy = self._mean_y - g_y
            self._cxy.addr_(dx, dy, alpha=local_n)
            self._cxy.view(-1).copy_(moments_fn(self._cxy.view(-1)))
            self._syy.add_(local_n * dy.square().sum())
            self._syy.view(1).copy_(moments_fn(self._syy.view(1)))
            self._mean_y.copy_(g_y)
        self._count.copy_(n)
        self._mean_x.copy_(g_x)
        return self

    def check(self, what: str = "inputs") -> None:
        """Raises ValueError if there are no samples or the moments are not finite."""
        if self.num_samples == 0:
            raise ValueError(f"no samples were accumulated for the {what}: cannot factorize from empty statistics")
        tensors = self.state_tensors()
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise ValueError(f"the {what} contain NaN or inf values: the statistics are not finite")
