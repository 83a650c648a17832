"""Forward hooks that stream each chosen layer's inputs (or, in the projected space, its outputs)
into float64 moment accumulators.

Memory per layer is that of one ``MomentAccumulator``: 8 * (D^2 + D + 1) bytes, with D the
layer's input features (C_in * k_h * k_w for a convolution), whatever the number of samples;
with ``space="auto"``, 8 * (K^2 + K + 1) with K = min(D, M) (plus a float64 copy of W). Twice that
while a layer has few rows (the held-out halves), plus up to ``BUFFER_ROWS`` waiting rows.

Layers that read the same input tensor (Llama's q/k/v and gate/up projections, BERT's
query/key/value) share one accumulator: ``statistics_bytes`` counts it once. The sharing is
detected at run time and confirmed on every call (see ``ActivationCollector``).
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
import zlib
from typing import Callable, Iterable, Mapping, Optional, Union, cast

import torch
import torch.nn as nn

from ...core.statistics import MomentAccumulator, work_dtype
from ...layers.adapters import LayerView, count_rows, input_rows, layer_view, output_rows, weight_matrix
from ...layers.sharded import is_unit
from .. import fastpath
from ..settings import is_real
from ..timing.speed import LayerInput, autocast_dtype
from .holdout import HeldOutHalves
from .sharding import Sharding, assign_owners, solve_work


def _autocast_type(device: torch.device) -> str:
    return device.type if device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"


@dataclasses.dataclass
class _Round:
    """One call of a group of layers sharing an accumulator: the input tensor (by identity and
    version) its first member got, the rows it kept (buffered only once every member got the
    same tensor) and the members that got it so far."""

    ref: weakref.ref
    version: int
    rows: torch.Tensor
    seen: set


def _version(x: torch.Tensor) -> int:
    """The in-place version counter of ``x`` (-1 for an inference tensor, which has none)."""
    return -1 if x.is_inference() else x._version


def _same(ref: weakref.ref, version: int, x: torch.Tensor) -> bool:
    """``x`` is the very tensor ``ref`` points to, unchanged in place since (a dead reference
    matches nothing: the tensor was freed, so ``x`` is another one)."""
    return ref() is x and _version(x) == version


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
        seed: for the random subsets; each accumulator draws from a stream of its own (seeded by
            ``seed`` and its key), so a layer's rows do not depend on which other layers are
            collected with it (collection in several passes keeps the same rows).
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
        share_inputs: layers whose statistics are of their inputs (not projected) and that get the
            very same input tensor (same object, unchanged) on their first call, in a row, with the
            same row sampling (input width, convolution geometry, fraction), share one accumulator
            (and held-out halves). Every later call is checked: a call's rows go into the shared
            accumulator only once every member got the same tensor; if one gets another tensor, or
            a member runs twice (or never) before the others ran, the group splits: each member
            goes on with an exact copy of the shared statistics up to the last complete call (plus
            that call's rows where it got them). With every row kept (``sample_fraction`` 1, no cap
            reached mid-batch) the statistics are bit-identical to unshared collection; with
            sampling a group keeps one random subset instead of one per layer. ``False``: one
            accumulator per layer.

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
        share_inputs: bool = True,
    ) -> None:
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        if sample_fraction != "auto" and not (is_real(sample_fraction) and 0 < float(sample_fraction) <= 1):
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
        # W in its own dtype (a view of the parameter; a factorized layer's float64 product), of which
        # each projected accumulator keeps a snapshot: ``projections`` holds those snapshots (the
        # same tensors, no other copy; None once the accumulator is dropped by reduce_to_owners_)
        matrices = {name: weight_matrix(self.layers[name], own_dtype=True) for name in projected}
        self._biases = {name: b for name, (_, b) in matrices.items()}  # z = y - b from the layer's output
        self._stats: dict[str, MomentAccumulator] = {
            name: MomentAccumulator(v.out_dim, projection=matrices[name][0])
            if name in matrices
            else MomentAccumulator(v.in_dim)
            for name, v in self.views.items()
        }
        self.projections: dict[str, Optional[torch.Tensor]] = {name: self._stats[name].projection for name in matrices}
        del matrices
        self.calls: dict[str, int] = {name: 0 for name in self.layers}
        self.counted = {name: m for name, m in (counted or {}).items() if name not in self.layers}
        # output positions per sample (tokens, pixels) of the layers and of the counted ones
        self.positions: dict[str, float] = {name: 1.0 for name in [*self.layers, *self.counted]}
        self.inputs: dict[str, LayerInput] = {}  # the first input each layer got (for the speed guard)
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}
        # rows waiting for _drain, by (name, already projected)
        self._buffers: dict[tuple[str, bool], list[torch.Tensor]] = {
            (n, p): [] for n in self.layers for p in (False, True)
        }
        self._buffered_rows: dict[tuple[str, bool], int] = dict.fromkeys(self._buffers, 0)
        # rows this process kept per layer, counted here for the hooks: the accumulators' counts are
        # device tensors, and reading them in every hook call would synchronize with a GPU
        self._kept: dict[str, int] = dict.fromkeys(self.layers, 0)
        self._projection_copies: dict[tuple, torch.Tensor] = {}
        self._handles: list = []
        # shared inputs: layer -> key of the accumulator (and buffers, rows kept, halves) it uses;
        # key -> members of a group sharing it; the open call of a group; the first input of a
        # layer that may still be joined by others (weakref, version, sampling signature)
        self.share_inputs = share_inputs
        self._stream: dict[str, str] = {name: name for name in self.layers}
        self._members: dict[str, list[str]] = {}
        self._round: dict[str, _Round] = {}
        self._first: dict[int, list[tuple[str, weakref.ref, int]]] = {}
        self._signature = {name: (v.in_dim, v.geometry, self.fractions[name]) for name, v in self.views.items()}
        self._peak_bytes = 0
        self._dropped: dict[str, int] = {}  # accumulators reduced to another process: their rows
        # two halves of a small set's rows, for an honest (held-out) error estimate
        self.holdout = HeldOutHalves(self._stats, enabled=holdout, streams=self._stream)

    @property
    def stats(self) -> dict[str, MomentAccumulator]:
        """Every row each layer kept, by name (a layer with held-out halves: their union). Layers
        sharing their input get the same accumulator object."""
        keys = dict.fromkeys(self._stream.values())
        for key in keys:
            self._drain(key)
        merged: dict[str, MomentAccumulator] = {}
        for key in keys:
            union = self.holdout.union(key)
            merged[key] = self._stats[key] if union is None else union
        return {name: merged[key] for name, key in self._stream.items()}

    def groups(self) -> dict[str, list[str]]:
        """The layers using each accumulator, by its key (one layer each, or a shared-input group)."""
        out: dict[str, list[str]] = {}
        for name, key in self._stream.items():
            out.setdefault(key, []).append(name)
        return out

    def _key_bytes(self, key: str) -> int:
        if key in self._dropped:  # reduced to another process (reduce_to_owners_)
            return 0
        acc = self._stats[key]
        held = (acc.nbytes() if acc.allocated else 0) + self.holdout.nbytes(key)
        if key in self.projections:  # the snapshot of W projected statistics keep (W's dtype), copies on other devices
            layer = self.layers[key]  # (a pair's weight is computed, an FSDP2 unit's a shard: not W's storage)
            weight = None if is_unit(layer) else getattr(layer, "weight", None)
            own = {weight.untyped_storage().data_ptr()} if isinstance(weight, torch.Tensor) else set()
            snapshot = cast(torch.Tensor, acc.projection)  # a projected layer's accumulator
            copies = [snapshot] + [w for k, w in self._projection_copies.items() if k[0] == key]
            for w in copies:
                ptr = w.untyped_storage().data_ptr()
                if ptr not in own:
                    own.add(ptr)
                    held += w.numel() * w.element_size()
        return held

    def statistics_bytes_of(self, names: Iterable[str]) -> int:
        """Bytes the float64 statistics of layers ``names`` hold now: their accumulators, held-out
        halves and the halves' cached union, and the copies of W that projected statistics keep
        (a snapshot in W's own dtype, shared with the halves, plus a copy per other device the rows
        come from; a bf16/float16 W cast to float32 for one drained block at a time is transient and
        not counted); an accumulator shared by several of them counted once."""
        return sum(self._key_bytes(key) for key in dict.fromkeys(self._stream[n] for n in names))

    @property
    def statistics_bytes(self) -> int:
        """Peak bytes of all float64 statistics (see ``statistics_bytes_of``; a shared accumulator
        counted once), over collection and the reads of ``stats`` so far: what the statistics cost
        in memory on this process."""
        return max(self._peak_bytes, self.statistics_bytes_of(self.layers))

    def _note_bytes(self) -> None:
        self._peak_bytes = max(self._peak_bytes, self.statistics_bytes_of(self.layers))

    def all_reduce_(self, sum_fn: Callable[[torch.Tensor], torch.Tensor]) -> "ActivationCollector":
        """Replaces every accumulator by that of all processes' rows (``MomentAccumulator.all_reduce_``),
        a shared one once. Every process must call it: first the processes agree on the sharing
        (a group that is not the same on every process is split everywhere), so that all of them
        reduce the same accumulators in the same order."""
        self._agree_on_sharing(sum_fn)
        stats, done = self.stats, set()
        for name in sorted(stats):  # same collectives, same order, on every rank
            if id(stats[name]) not in done:
                done.add(id(stats[name]))
                stats[name].all_reduce_(sum_fn)
        return self

    def reduce_to_owners_(self, sharding: Sharding) -> dict[str, int]:
        """Sums every accumulator into one owner process (``sharding.reduce_to``; the counts and means
        are all-reduced, ``MomentAccumulator.all_reduce_``), a shared one once, in name order; the
        owners balance the solve work (``sharding.assign_owners`` on the statistics' widths and the
        layers' outputs, a shared-input group going to one owner). Every other process then drops
        that accumulator (and its copies of W): after the reduce each process holds the statistics
        of its own layers only; ``samples`` still reports every layer's rows (of all processes).
        Every process must call it. Returns the owner of each layer."""
        self._agree_on_sharing(sharding.all_sum)
        groups = self.groups()
        work = {
            key: sum(solve_work(self._stats[key].in_features, self.views[m].out_dim) for m in members)
            for key, members in groups.items()
        }
        owners = assign_owners(work, sharding.world_size, sharding.loads)  # after earlier passes' work
        stats = self.stats
        for key in sorted(groups):  # the keys are layer names; same collectives, same order, on every rank
            acc, owner = stats[key], owners[key]
            def to_owner(t: torch.Tensor, owner: int = owner) -> torch.Tensor:
                return sharding.reduce_to(t, owner)

            acc.all_reduce_(sharding.all_sum, to_owner)
            if owner != sharding.rank:
                self._dropped[key] = acc.num_samples  # the union's count: what samples() reports
                self._stats[key] = MomentAccumulator(acc.in_features)  # empty, never allocated
                if key in self.projections:
                    self.projections[key] = None  # the snapshot of W goes with the accumulator
                for k in [k for k in self._projection_copies if k[0] == key]:
                    del self._projection_copies[k]
        return {name: owners[key] for name, key in self._stream.items()}

    def _agree_on_sharing(self, sum_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Splits, on every process alike, each group whose members differ between processes: per
        layer (in sorted order) the index of its group's first member is summed with its square and
        a count of processes; they agree iff n * sum(v^2) == sum(v)^2 (exact in float64)."""
        names = sorted(self.layers)
        index = {n: i for i, n in enumerate(names)}
        device = next((a.device for a in self._stats.values() if a.device is not None), torch.device("cpu"))
        while True:
            groups = self.groups()
            v = torch.tensor(
                [float(min(index[m] for m in groups[self._stream[n]])) for n in names], dtype=torch.float64
            )
            total = sum_fn(torch.cat([torch.ones(1, dtype=torch.float64), v, v * v]).to(device)).cpu()
            n, sums, squares = total[0], total[1 : 1 + len(names)], total[1 + len(names) :]
            pairs = zip(names, sums.tolist(), squares.tolist(), strict=True)
            differ = [name for name, s, q in pairs if float(n) * q != s * s]
            if not differ:  # (decided on the sums: the same on every process)
                return
            for key in dict.fromkeys(self._stream[name] for name in differ):
                if key in self._members:  # a group here; elsewhere it may be one layer alone
                    self._split(key)

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
        for key in list(self._round):  # a call some member of a group never got: the sharing broke
            self._split(key)
        self._first.clear()
        for key in dict.fromkeys(self._stream.values()):
            self._drain(key)
        self._note_bytes()

    def __enter__(self) -> "ActivationCollector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _hook_for(self, name: str):
        shareable = self.share_inputs and name not in self.projections

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x0 = args[0]
            if name not in self.inputs:
                self.inputs[name] = LayerInput.of(x0)
            key = self._stream[name]
            if key in self._members:
                if self._shared_call(name, key, x0):
                    return
                key = self._stream[name]  # the group split: on its own from here
            elif shareable and self.calls[name] == 0 and self._join(name, x0):
                return
            taken = self._rows(name, key, x0, output)
            if taken is None:
                return
            self._buffer(key, *taken)
            if shareable and self.calls[name] == 0:  # layers called next with this tensor may join
                self._first.setdefault(id(x0), []).append((name, weakref.ref(x0), _version(x0)))
            self.calls[name] += 1

        return hook

    def _position(self, name: str, x: torch.Tensor) -> int:
        """Records the output positions per sample of layer ``name`` for input ``x``; its rows."""
        view = self.views[name]
        total = count_rows(x, view)
        batch = x.shape[0] if x.ndim > (1 if view.geometry is None else 3) else 1
        self.positions[name] = total / max(batch, 1)
        return total

    def _rows(self, name: str, key: str, x0: torch.Tensor, output: object) -> Optional[tuple[torch.Tensor, bool]]:
        """The rows layer ``name`` keeps of this call (and whether they are projected), or None
        when its accumulator ``key`` already has ``max_samples`` rows."""
        view, fraction = self.views[name], self.fractions[name]
        seen = self._kept[key]
        if self.max_samples is not None and seen >= self.max_samples:
            return None
        # no autocast or grad concerns here: only indexing and copies (the products are in _drain)
        x = x0.detach()
        total = self._position(name, x)
        batch = x.shape[0] if x.ndim > (1 if view.geometry is None else 3) else 1
        want = total if fraction >= 1 else max(1, round(fraction * total))
        if self._auto:
            want = min(total, max(want, self._minimum_rows(self._stats[name].in_features, seen, self.calls[name])))
        if self.max_samples is not None:
            want = min(want, self.max_samples - seen)
        keep = None if want >= total else self._sample_rows(key, total, want, batch if view.geometry else 1)
        bias = self._biases.get(name)
        if name in self.projections and _exact_output(x, output):
            # the projected rows z = x @ W are the layer's own output less its bias: no patches
            # to gather and no product to compute
            rows = output_rows(cast(torch.Tensor, output).detach(), view, keep)  # a tensor: _exact_output
            rows = rows.clone() if bias is None else rows - bias.to(rows.device, rows.dtype)
            return rows, True
        rows = input_rows(x, view, keep)
        if keep is None and view.geometry is None:
            rows = rows.clone()  # a view of the activation, which may be changed in place later
        return rows, False

    def _join(self, name: str, x0: torch.Tensor) -> bool:
        """On its first call, layer ``name`` joins the accumulator of a layer whose only call so
        far (and its group's) got this very tensor, with the same row sampling."""
        for leader, ref, version in self._first.get(id(x0), ()):
            key = self._stream[leader]
            members = self._members.get(key, [key])
            if (
                key != leader
                or not _same(ref, version, x0)
                or self._signature[leader] != self._signature[name]
                or key in self._round
                or any(self.calls[m] != 1 for m in members)
            ):
                continue
            self._members[key] = members + [name]
            self._stream[name] = key
            self._position(name, x0.detach())
            self.calls[name] += 1
            return True
        return False

    def _shared_call(self, name: str, key: str, x0: torch.Tensor) -> bool:
        """A call of member ``name`` of the group sharing ``key``: opens the group's next call
        (its rows wait), or confirms the open one (its rows are buffered once every member got
        the same tensor). False when the call breaks the sharing: the group is split and the
        caller treats the call as that of a layer of its own."""
        members, rnd = self._members[key], self._round.get(key)
        if rnd is None:
            if any(self.calls[m] != self.calls[name] for m in members):  # not expected: be safe
                self._split(key)
                return False
            taken = self._rows(name, key, x0, None)
            if taken is not None:
                self._round[key] = _Round(weakref.ref(x0), _version(x0), taken[0], {name})
                self.calls[name] += 1
            return True  # (None: the shared accumulator is full; no member takes rows any more)
        if name not in rnd.seen and _same(rnd.ref, rnd.version, x0):
            rnd.seen.add(name)
            self._position(name, x0.detach())
            self.calls[name] += 1
            if len(rnd.seen) == len(members):
                del self._round[key]
                self._buffer(key, rnd.rows, projected=False)
            return True
        self._split(key)
        return False

    def _split(self, key: str) -> None:
        """Ends the sharing of accumulator ``key``: every other member goes on with an exact copy
        of it (pending rows, held-out halves and their parity included) and the open call's rows
        go to the members that got its tensor."""
        members, rnd = self._members.pop(key), self._round.pop(key, None)
        with torch.inference_mode(False), torch.no_grad():
            self._drain(key)
            for m in members:
                if m != key:
                    self._stream[m] = m
                    self._stats[m] = copy.deepcopy(self._stats[key])
                    self.holdout.copy(key, m)
                    self._kept[m] = self._kept[key]
            if rnd is not None:
                for m in rnd.seen:
                    self._buffer(m, rnd.rows, projected=False)
        self._note_bytes()

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
        """Moves the buffered rows of accumulator ``name`` (a layer's, or a shared-input group's
        key) into its statistics (input rows projected first, for "auto" space: float64 rows in
        float64, others in float32)."""
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
            self._note_bytes()

    def _projection_for(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """W of layer ``name`` (the accumulator's snapshot) on the rows' device, in the dtype they
        are multiplied in: the snapshot itself when it has both (float32 W, float32 or bf16 rows),
        else cast for this block only (bf16 W: a float32 copy while the block is projected, O(D M)
        against the product's O(rows D M)); a copy to another device is cached."""
        snapshot = cast(torch.Tensor, self._stats[name].projection)  # a projected layer's accumulator
        if snapshot.device == rows.device:
            return snapshot.to(work_dtype(rows))
        key = (name, rows.device)
        if key not in self._projection_copies:
            self._projection_copies[key] = snapshot.to(rows.device)
        return self._projection_copies[key].to(work_dtype(rows))

    def _minimum_rows(self, width: int, seen: int, calls: int) -> int:
        """Rows this call must keep for "auto" to reach WARMUP_FACTOR x ``width`` rows: the rows
        still missing shared evenly over the calls still expected (one per expected batch; the
        share grows when earlier batches were too small to give theirs, e.g. a short last batch or
        a second loader's larger batches), else all that are missing (from the first batches)."""
        missing = self.WARMUP_FACTOR * width - seen
        if self.expected_batches is None or missing <= 0:
            return missing
        return -(-missing // max(1, self.expected_batches - calls))

    def _generator(self, key: str) -> torch.Generator:
        """The random stream of accumulator ``key``: a function of the seed and the key alone."""
        if key not in self._generators:
            self._generators[key] = torch.Generator().manual_seed(self._seed * 1_000_003 + zlib.crc32(key.encode()))
        return self._generators[key]

    def _sample_rows(self, key: str, total: int, want: int, images: int) -> torch.Tensor:
        """``want`` random row indices out of ``total``. For convolutions the rows come from a random
        subset of about twice as many images as needed, so that only those images are padded."""
        per_image = total // images
        k = min(images, 2 * -(-want // per_image))
        generator = self._generator(key)
        if k >= images:
            return torch.randperm(total, generator=generator)[:want]
        chosen = torch.randperm(images, generator=generator)[:k]
        pos = torch.randperm(k * per_image, generator=generator)[:want]
        return chosen[pos // per_image] * per_image + pos % per_image

    def samples(self) -> dict[str, int]:
        """Rows in each layer's statistics (after a DDP ``all_reduce_``: of every process)."""
        out = {}
        for name, key in self._stream.items():
            waiting = self._buffered_rows[(key, False)] + self._buffered_rows[(key, True)]
            rnd = self._round.get(key)
            waiting += rnd.rows.shape[0] if rnd is not None and name in rnd.seen else 0
            out[name] = self._dropped.get(key, self._stats[key].num_samples) + self.holdout.rows(key) + waiting
        return out

    def check_nonempty(self) -> None:
        """Raises if any layer saw no samples (e.g. its hook was bypassed by ``torch.compile``)."""
        empty = sorted(name for name, n in self.samples().items() if n == 0)
        if empty:
            raise RuntimeError(
                f"no activations were recorded for layer(s) {empty}: they did not run during collection, or "
                "their hooks were bypassed (torch.compile skips hooks added after compilation; call "
                "torch._dynamo.reset() or collect on the uncompiled model). "
                "Refusing to factorize from empty statistics."
            )
