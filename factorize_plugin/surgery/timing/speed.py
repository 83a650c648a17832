"""The speed guard: keep a layer dense unless its low-rank pair is measurably faster.

Fewer multiply-adds do not always mean less time: small layers, few rows per batch, the optimizer
step and the device decide. ``SpeedGuard`` times the dense layer against the candidate pair on the
inputs the layer really gets (shape, dtype, device, autocast, rows of a training batch), for a
training step (forward + backward + the optimizer's step on the layer's parameters) or for
inference (forward only), and allows a rank only where the pair is at least ``margin`` times as
fast. Each decision times the dense layer and the pair in alternating rounds until a confidence
interval on the speedup clears the margin one way or the other (``paired_timing``: an undecided
comparison keeps the layer as it is), and is cached by (layer shape, rank, dtype, device, input
shape, step), so many layers of a few shapes cost a few comparisons.

``SpeedCheck`` binds a guard to one refactorization (the layers' recorded inputs, the optimizers,
and under DDP a broadcast: one process measures, every process gets its decisions).
Timings depend on the machine: switch the guard off (``speed_guard=False``) where the same
structure must come out on every machine.

This is the guard's per-layer scope (``SpeedGuard(scope="layer")``, what ``factorize_model``
uses). The callback's default scope, ``"model"``, times the model's whole training step instead
(``model_speed.ModelSpeedCheck``): layers alone are host-bound on a GPU, the whole model is not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence, cast

import torch
import torch.nn as nn

from ...core.checks import is_int, is_real
from ...core.conv import ConvGeometry, conv_output_size
from ...layers.adapters import LayerView
from ...layers.factorized import FactorizedConv2d, FactorizedLinear
from ..ranks.candidates import LayerCandidate, max_rank
from . import paired_timing
from .paired_timing import Comparison

MODES = ("train", "inference")
SCOPES = ("model", "layer")
MIN_TIME = {"layer": 0.003, "model": 0.05}  # seconds a timed sample lasts at least, by default


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``device`` at this moment, None without autocast."""
    dev = device.type
    if dev in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


@dataclasses.dataclass(frozen=True)
class LayerInput:
    """What a layer receives: the input's shape, dtype and device, whether it requires grad, and
    the autocast dtype in force at the call (None: no autocast)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    requires_grad: bool = False
    autocast: Optional[torch.dtype] = None
    channels_last: bool = False

    @classmethod
    def of(cls, x: torch.Tensor) -> "LayerInput":
        last = x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return cls(tuple(x.shape), x.dtype, str(x.device), bool(x.requires_grad), autocast_dtype(x.device), last)

    def with_batch(self, batch: Optional[int]) -> "LayerInput":
        """The same input with ``batch`` samples (first dimension), e.g. a training batch's size."""
        if batch is None or len(self.shape) < 2 or batch < 1:
            return self
        return dataclasses.replace(self, shape=(int(batch),) + self.shape[1:])

    def rows(self, view: LayerView) -> int:
        """Solver rows of this input: tokens for a Linear, output positions for a Conv2d."""
        if view.geometry is None:
            return math.prod(self.shape) // view.in_dim
        n = self.shape[0] if len(self.shape) == 4 else 1
        h, w = conv_output_size(tuple(self.shape[-2:]), view.geometry)
        return n * h * w

    def describe(self) -> str:
        dtype = _dtype_name(self.dtype) if self.autocast is None else f"{_dtype_name(self.autocast)}-autocast"
        return f"{torch.device(self.device).type}/{dtype}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer class and hyperparameters of the group holding a layer's weights; equal (and
    cached alike) when class and implementation flags (foreach, fused) agree."""

    cls: type
    kwargs: tuple = dataclasses.field(compare=False, default=())
    flags: tuple = ()

    @classmethod
    def of(cls, optimizers: Sequence[Any], param: nn.Parameter) -> Optional["OptimizerSpec"]:
        for opt in optimizers:
            opt = getattr(opt, "optimizer", opt)  # Lightning wraps optimizers
            for group in getattr(opt, "param_groups", ()):
                if any(p is param for p in group["params"]):
                    kw = tuple((k, group[k]) for k in getattr(opt, "defaults", {}) if k in group)
                    flags = tuple(
                        (k, group.get(k)) for k in ("foreach", "fused", "capturable", "differentiable") if k in group
                    )
                    return cls(type(opt), kw, flags)
        return None

    def __hash__(self) -> int:
        return hash((self.cls, self.flags))

    def build(self, params: list) -> Optional[torch.optim.Optimizer]:
        try:
            opt = self.cls(params, **dict(self.kwargs))
            opt.step()  # fails now, not in the timing loop, for optimizers needing a closure
            opt.zero_grad(set_to_none=True)
            return opt
        except Exception:  # an exotic optimizer: time the step without it (conservative for pairs)
            return None


@dataclasses.dataclass(frozen=True)
class TimingCase:
    """One measurement: a layer of ``view``'s shape, dense (``rank=None``) or a pair at ``rank``,
    on ``inputs``, for one ``mode`` step. ``bias``/``dtype``/``trainable``: the layer's own."""

    view: LayerView
    rank: Optional[int]
    inputs: LayerInput
    mode: str
    bias: bool = True
    dtype: torch.dtype = torch.float32
    trainable: bool = True
    optimizer: Optional[OptimizerSpec] = None

    @property
    def dense(self) -> "TimingCase":
        return dataclasses.replace(self, rank=None)


Timer = Callable[[Sequence[TimingCase]], list]
"""Seconds per step of each case (``SpeedGuard(timer=...)`` replaces the clock, e.g. in tests)."""


def _modules_for(case: TimingCase) -> nn.Module:
    v = case.view
    kw: dict[str, Any] = dict(device=torch.device(case.inputs.device), dtype=case.dtype)
    if v.geometry is None:
        if case.rank is None:
            return nn.Linear(v.in_dim, v.out_dim, bias=case.bias, **kw)
        return FactorizedLinear(v.in_dim, v.out_dim, case.rank, bias=case.bias, **kw)
    g: ConvGeometry = v.geometry
    c_in = case.inputs.shape[-3]
    args: dict[str, Any] = dict(
        stride=g.stride, padding=g.padding, dilation=g.dilation, padding_mode=g.padding_mode, bias=case.bias
    )
    if case.rank is None:
        return nn.Conv2d(c_in, v.out_dim, g.kernel_size, **args, **kw)
    return FactorizedConv2d(c_in, v.out_dim, g.kernel_size, case.rank, **args, **kw)


def _runner(case: TimingCase) -> Callable[[], None]:
    """One step of ``case`` as a closure (modules and inputs built once, with a private RNG)."""
    dev = torch.device(case.inputs.device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.inference_mode(False):
        torch.manual_seed(0)
        module = _modules_for(case)
        x = torch.randn(case.inputs.shape, device=dev, dtype=case.inputs.dtype)
    if case.inputs.channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit it
        x = x.contiguous(memory_format=torch.channels_last)
    train = case.mode == "train"
    module.requires_grad_(train and case.trainable)
    x.requires_grad_(train and case.inputs.requires_grad)
    auto = case.inputs.autocast
    autocast = lambda: torch.autocast(dev.type, dtype=auto, enabled=auto is not None)  # noqa: E731
    needs_backward = train and (case.trainable or case.inputs.requires_grad)
    params = list(module.parameters())
    opt = case.optimizer.build(params) if (needs_backward and case.trainable and case.optimizer is not None) else None

    def step() -> None:
        if not needs_backward:
            with torch.inference_mode(), autocast():
                module(x)
            return
        with torch.enable_grad(), autocast():
            y = module(x)
        y.backward(torch.ones_like(y))
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            for p in params:
                p.grad = None
        x.grad = None

    return step


def sampler(case: TimingCase, min_time: float = 0.003) -> Callable[[], float]:
    """One timed sample of ``case`` per call: seconds per step over enough steps to last about
    ``min_time`` seconds (CUDA synchronized around it; ``paired_timing.step_clock``). The first
    call warms the case up."""
    run = _runner(case)
    dev = torch.device(case.inputs.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    clock = paired_timing.step_clock(on_gpu=dev.type == "cuda")
    count = 0

    def sample() -> float:
        nonlocal count
        if count == 0:
            for _ in range(2):
                run()
        secs, count = paired_timing.seconds_per_step(run, sync, min_time, count, cap=10_000, now=clock)
        return secs

    return sample


class SpeedGuard:
    """Allows a layer's rank only where the pair is measurably at least ``margin`` x as fast.

    Args:
        margin: required speedup (today's seconds / the candidate's), at least 1 (a margin below 1
            would apply changes that measured slower). The default 1.15 leaves changes near
            break-even alone: they gain little and cost a re-factorization.
        mode: ``"train"`` times forward + backward + the optimizer's step on the layer's
            parameters (what training with a factorized layer costs); ``"inference"`` times forward
            only (for a model that is factorized and then deployed).
        scope: what is timed to decide. ``"model"``: the model's own training step (forward +
            backward on a recorded training batch, the optimizer's step on copies) with today's
            structure and with the candidate one; the candidates saving the fewest multiply-adds
            are dropped until the whole step is ``margin`` x as fast, or none remain
            (``model_speed.ModelSpeedCheck``; the callback only: it has a training step).
            ``"layer"``: each layer alone, dense against its pair (right for large layers and for
            one-shot inference; pessimistic on a GPU for mid-sized layers, whose isolated step is
            bound by host-side work). None (default): where the guard is used decides: ``"model"``
            in ``LowRankFactorization``, ``"layer"`` in ``factorize_model``.
        confidence: every decision times today's structure and the candidate in alternating rounds
            until a confidence interval at this level on the median speedup lies wholly above the
            margin (applied) or wholly below it (not applied), see ``paired_timing.compare``.
        budget: seconds one comparison may take before it stops undecided; an undecided
            comparison keeps today's structure (the fixed rule: a timing that cannot tell changes
            nothing). At least ``paired_timing.rounds_needed(confidence)`` rounds (6 at 0.95)
            are always taken.
        repeats: the most rounds one comparison takes (an int >= 1; fewer than the confidence
            needs are raised to that number).
        min_time: seconds each timed sample lasts at least (it repeats the step as needed). None
            (default): 0.003 for a layer alone, 0.05 for the model's whole training step, whose
            samples a busy machine's preemptions would otherwise spread widely (``MIN_TIME``).
        timer: replaces the per-layer clock: called with the cases to time, returns seconds per
            step of each (deterministic: the ratio decides alone; tests use one).
        clock: replaces the whole-model clock: ``clock(step, model)`` returns seconds per training
            step of ``model`` as it is now, ``step()`` runs one (see ``model_speed.ModelClock``;
            deterministic like ``timer``).

    ``cache`` keeps every per-layer comparison; the same guard object reuses it across milestones.
    """

    def __init__(
        self, margin: float = 1.15, mode: str = "train", repeats: int = 60, min_time: Optional[float] = None,
        timer: Optional[Timer] = None, scope: Optional[str] = None, clock: Optional[Callable] = None,
        confidence: float = 0.95, budget: float = 5.0,
    ) -> None:
        if not (is_real(margin) and math.isfinite(margin) and margin >= 1):
            raise ValueError(
                f"margin (the speedup a change must reach) must be a number >= 1, got {margin!r}: below 1 the guard "
                "would apply changes that measured slower; pass speed_guard=False to factorize for size alone"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if scope is not None and scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES} or None (the caller's default), got {scope!r}")
        if not (is_int(repeats) and repeats >= 1):
            raise ValueError(f"repeats (the most timing rounds per decision) must be an int >= 1, got {repeats!r}")
        if not (is_real(confidence) and 0.5 <= confidence < 1):
            raise ValueError(f"confidence must be a number in [0.5, 1), got {confidence!r}")
        if not (is_real(budget) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget (seconds per timing decision) must be a positive number, got {budget!r}")
        if min_time is not None and not (is_real(min_time) and math.isfinite(min_time) and min_time >= 0):
            raise ValueError(f"min_time must be None or a number >= 0 (seconds), got {min_time!r}")
        self.margin, self.mode, self.repeats = float(margin), mode, int(repeats)
        self.min_time = None if min_time is None else float(min_time)
        self.confidence, self.budget = float(confidence), float(budget)
        self.timer, self.scope, self.clock = timer, scope, clock
        self.cache: dict[tuple[TimingCase, TimingCase], Comparison] = {}

    def __repr__(self) -> str:
        return f"SpeedGuard(margin={self.margin}, mode={self.mode!r}, scope={self.scope!r})"

    def sample_seconds(self, scope: str) -> float:
        """The seconds a timed sample lasts at least in ``scope`` (``min_time`` or its default)."""
        return MIN_TIME[scope] if self.min_time is None else self.min_time

    def compare(self, base: Callable[[], float], candidate: Callable[[], float]) -> Comparison:
        """``paired_timing.compare`` of two samplers with this guard's margin, confidence and budget."""
        return paired_timing.compare(
            base, candidate, self.margin, self.confidence, max_rounds=self.repeats, budget=self.budget
        )

    def comparisons(self, pairs: Sequence[tuple[TimingCase, TimingCase]]) -> list[Comparison]:
        """Today's case against the candidate's, for each pair (cached). With ``timer`` the cases
        are timed in one call and compared exactly; otherwise each pair in alternating rounds."""
        todo = list(dict.fromkeys(p for p in pairs if p not in self.cache))
        if todo and self.timer is not None:
            cases = list(dict.fromkeys(c for p in todo for c in p))
            secs = {}
            for c, t in zip(cases, self.timer(cases), strict=True):
                t = float(t)
                if not (math.isfinite(t) and t > 0):
                    raise ValueError(f"the speed guard's timer returned {t} seconds: expected a positive number ({c})")
                secs[c] = t
            for base, cand in todo:
                self.cache[base, cand] = Comparison.exact(secs[base], secs[cand], self.margin)
        for base, cand in todo if self.timer is None else ():
            seconds = self.sample_seconds("layer")
            self.cache[base, cand] = self.compare(sampler(base, seconds), sampler(cand, seconds))
        return [self.cache[p] for p in pairs]


@dataclasses.dataclass
class SpeedVerdict:
    """The guard's decision on one layer at one milestone (plain data: broadcast under DDP)."""

    rank: Optional[int]  # the rank that was measured (None: nothing to decide)
    allowed: bool
    comparison: Optional[Comparison] = None  # what was timed (None: nothing was)
    note: str = ""

    @property
    def speedup(self) -> Optional[float]:
        return None if self.comparison is None else self.comparison.ratio

    @property
    def dense_seconds(self) -> Optional[float]:
        return None if self.comparison is None else self.comparison.base_seconds

    @property
    def pair_seconds(self) -> Optional[float]:
        return None if self.comparison is None else self.comparison.candidate_seconds


def _describe_step(mode: str, optimizer: Optional[OptimizerSpec]) -> str:
    if mode == "inference":
        return "forward"
    return f"train step with {optimizer.cls.__name__}" if optimizer is not None else "forward+backward"


class SpeedCheck:
    """A ``SpeedGuard`` bound to one refactorization.

    Args:
        guard: the guard (its cache lives on).
        inputs: name -> ``LayerInput`` the layer gets in the run being sped up (training batches
            for the callback, calibration batches for ``factorize_model``).
        optimizers: where a layer's optimizer is looked up (train mode).
        broadcast: under DDP, ``broadcast(obj)`` returns the measuring process's ``obj`` on every
            process (called by all of them in the same order); None in a single process.
        measure_here: whether this process measures (rank 0); the others wait for its decisions.
    """

    def __init__(
        self, guard: SpeedGuard, inputs: Mapping[str, LayerInput], optimizers: Sequence[Any] = (),
        broadcast: Optional[Callable[[Any], Any]] = None, measure_here: bool = True,
    ) -> None:
        self.guard, self.inputs, self.optimizers = guard, dict(inputs), list(optimizers)
        self.broadcast, self.measure_here = broadcast, measure_here
        self.refused: dict[str, SpeedVerdict] = {}  # layers ``caps`` allowed no rank, and why

    def _case(self, name: str, module: nn.Module, view: LayerView, rank: Optional[int]) -> Optional[TimingCase]:
        inputs = self.inputs.get(name)
        if inputs is None:
            return None
        weight = next(module.parameters())
        bias = getattr(module.second if hasattr(module, "second") else module, "bias", None) is not None
        opt = OptimizerSpec.of(self.optimizers, weight) if self.guard.mode == "train" else None
        return TimingCase(view, rank, inputs, self.guard.mode, bias, weight.dtype, weight.requires_grad, opt)

    def _agreed(self, compute: Callable[[], Any]) -> Any:
        value = compute() if self.measure_here or self.broadcast is None else None
        return value if self.broadcast is None else self.broadcast(value)

    def _dense_view(self, c: LayerCandidate) -> LayerView:
        return dataclasses.replace(c.view, rank=None)

    def _compare(self, asks: Mapping[str, tuple[TimingCase, int]]) -> dict[str, Comparison]:
        """The dense case against the pair at the asked rank, per layer."""
        pairs = [(case.dense, dataclasses.replace(case, rank=rank)) for case, rank in asks.values()]
        return dict(zip(asks, self.guard.comparisons(pairs), strict=True))

    def caps(
        self, layers: Mapping[str, nn.Module], candidates: Mapping[str, LayerCandidate]
    ) -> dict[str, Optional[int]]:
        """Per layer, the largest rank (up to what it may take) whose pair the guard allows: 0 if
        none, None if it cannot be measured. Speed falls roughly monotonically with the rank, so
        this is a bisection (to within 1/8 of the rank), all layers' probes of a round measured
        together; ``check`` still verifies the rank finally chosen."""

        def compute() -> tuple[dict[str, Optional[int]], dict[str, SpeedVerdict]]:
            cases = {n: self._case(n, layers[n], self._dense_view(c), None) for n, c in candidates.items()}
            out: dict[str, Optional[int]] = {n: (None if cases[n] is None else 0) for n in candidates}
            refused: dict[str, SpeedVerdict] = {}
            bounds = {
                n: (0, max_rank(c) + 1) for n, c in candidates.items() if cases[n] is not None and max_rank(c) >= 1
            }
            first = True
            while bounds:
                # bounds holds only the layers that have a case
                asks = {
                    n: (cast(TimingCase, cases[n]), hi - 1 if first else (lo + hi) // 2)
                    for n, (lo, hi) in bounds.items()
                }
                for n, comparison in self._compare(asks).items():
                    lo, hi = bounds[n]
                    r = asks[n][1]
                    if comparison.passes:
                        lo = r
                    else:
                        hi = r
                        refused[n] = self._verdict(candidates[n], asks[n][0], r, comparison)
                    bounds[n] = (lo, hi)
                first = False
                for n, (lo, hi) in list(bounds.items()):
                    if hi - lo <= max(1, lo // 8):
                        out[n] = lo
                        del bounds[n]
            return out, {n: v for n, v in refused.items() if out[n] == 0}

        caps, self.refused = self._agreed(compute)
        return caps

    def _verdict(self, c: LayerCandidate, case: TimingCase, rank: int, comparison: Comparison) -> SpeedVerdict:
        note = ""
        if not comparison.passes:
            keep = "kept dense" if c.view.rank is None else f"kept at rank {c.view.rank}"
            how = "measured" if comparison.verdict != paired_timing.UNDECIDED else "could not be told apart, at"
            note = (
                f"{keep}: rank {rank} {how} {comparison.describe()} the dense layer's speed "
                f"(needs {self.guard.margin:.2f}x) on {case.inputs.describe()} at {case.inputs.rows(case.view)} rows, "
                f"{_describe_step(case.mode, case.optimizer)}"
            )
        return SpeedVerdict(rank, comparison.passes, comparison, note)

    def check(
        self,
        layers: Mapping[str, nn.Module],
        candidates: Mapping[str, LayerCandidate],
        ranks: Mapping[str, Optional[int]],
        install: Any = None,
    ) -> tuple[dict[str, Optional[int]], dict[str, SpeedVerdict]]:
        """Times every changing layer at its chosen rank; ranks whose pair is not ``margin`` x as
        fast as the dense layer become None (the layer stays as it is) with a note saying why.
        ``install`` (the swap, used by the whole-model check) is not needed here."""

        def compute() -> dict[str, SpeedVerdict]:
            asks, verdicts = {}, {}
            for n, r in ranks.items():
                if r is None:
                    continue
                case = self._case(n, layers[n], self._dense_view(candidates[n]), None)
                if case is None:
                    verdicts[n] = SpeedVerdict(
                        r, False, note="kept as it is: speed not measured (no input was recorded for it)"
                    )
                else:
                    asks[n] = (case, r)
            for n, comparison in self._compare(asks).items():
                verdicts[n] = self._verdict(candidates[n], *asks[n], comparison)
            return verdicts

        verdicts = self._agreed(compute)
        for n, v in self.refused.items():  # no rank was allowed: they stay as they are, said why
            if ranks.get(n) is None:
                verdicts.setdefault(n, v)
        out = {n: (r if r is None or verdicts[n].allowed else None) for n, r in ranks.items()}
        return out, verdicts


class InputRecorder:
    """Records the first input each layer gets (``LayerInput``), then removes its hook from that
    layer. ``training_only``: record only calls made with grad enabled on a module in training mode
    (training steps, not validation)."""

    def __init__(self, layers: Mapping[str, nn.Module], training_only: bool = True) -> None:
        self.layers, self.training_only = dict(layers), training_only
        self.inputs: dict[str, LayerInput] = {}
        self._handles: dict[str, Any] = {}

    def attach(self) -> "InputRecorder":
        for name, module in self.layers.items():
            if name not in self.inputs and name not in self._handles:
                self._handles[name] = module.register_forward_pre_hook(self._hook(name))
        return self

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            if self.training_only and not (module.training and torch.is_grad_enabled()):
                return
            self.inputs[name] = LayerInput.of(args[0])
            handle = self._handles.pop(name, None)
            if handle is not None:
                handle.remove()

        return hook

    def detach(self) -> None:
        for h in self._handles.values():
            h.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)


def resolve_guard(
    speed_guard: Any, mode: str, scope: Optional[str] = None, sharded: bool = False
) -> Optional[SpeedGuard]:
    """``"auto"`` (the entry points' default) -> as ``True``, except on a model sharded by FSDP2
    (``sharded``): None, as every timed step there would need collectives on every process.
    ``True`` -> ``SpeedGuard(mode=mode, scope=scope)``, ``False``/None -> None, a ``SpeedGuard``
    as it is.

    Raises:
        ValueError: a guard asked for explicitly on a sharded model.
    """
    if isinstance(speed_guard, str) and speed_guard == "auto":
        speed_guard = not sharded
    if sharded and speed_guard is not False and speed_guard is not None:
        raise ValueError(
            "speed_guard: the speed decision does not run under FSDP2 (timing a sharded model's step needs "
            "collectives on every process); pass speed_guard=False, or leave the default ('auto', off under FSDP2)"
        )
    if speed_guard is True:
        return SpeedGuard(mode=mode, scope=scope)
    if speed_guard is False or speed_guard is None:
        return None
    if isinstance(speed_guard, SpeedGuard):
        return speed_guard
    raise TypeError(f"speed_guard must be 'auto', True, False or a SpeedGuard, got {speed_guard!r}")
