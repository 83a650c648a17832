"""The whole-model speed decision: keep a swap only where the model's training step gains.

A layer timed alone (``speed.SpeedCheck``) is a per-layer estimate: on a GPU a mid-sized layer's
isolated step is bound by host-side work (dispatch, autocast casts, a per-layer optimizer step)
that a real model hides behind the device's queue, so the per-layer guard keeps layers dense that
make the whole model faster. ``ModelSpeedCheck`` times the model's own training step instead
(forward + backward on a real batch, the same optimizer's step on copies: fresh optimizers of the
same class and param-group hyperparameters over the structure being timed), with today's
structure and with the candidate one, and drops the candidates that save the fewest
multiply-adds until the whole step is at least ``margin`` times as fast, or none remain (a
bisection over how many to keep: 1 + log2(n) comparisons at most). Each comparison times the
two structures in alternating rounds until a confidence interval on the speedup clears the
margin (``paired_timing.compare``); one that cannot tell keeps today's structure.

Nothing of the run changes: parameters' values and ``.grad`` (the same tensors, None stays None),
buffers (BatchNorm running statistics and ``num_batches_tracked``; a buffer re-assigned in
``forward`` is put back as the object the module held), modules' training flags, attributes of
the model and its submodules that the step rebinds (``self.calls += 1``), the CPU and CUDA random
streams, Python's and NumPy's global random states and the real optimizers' state are put back
(``preserved_training_state``); candidate pairs are installed for each timed sample and removed
again. Not restored: objects changed in place that are not parameters or buffers (a list appended
to, a tensor attribute written in place), and effects outside the model (files, prints).
Plain PyTorch: the caller gives the step's forward (``forward()`` returns the loss) and the
context it runs in (``engine.speed`` does it through the training loop's host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import random
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional, Sequence, cast

import torch
import torch.nn as nn

from ..ranks.candidates import LayerCandidate
from . import paired_timing
from .paired_timing import Comparison
from .speed import SpeedVerdict

try:  # NumPy's global random state is put back after timing, where NumPy is installed
    import numpy as np
except ImportError:  # pragma: no cover - torch ships without a hard NumPy dependency
    np = None  # type: ignore[assignment]

ModelClock = Callable[[Callable[[], None], nn.Module], float]
"""``clock(step, model)``: seconds per training step of ``model`` as it is now; ``step()`` runs
one (``SpeedGuard(clock=...)`` replaces the default paired timing, e.g. in tests: a clock is
taken as exact, called once per structure)."""

Install = Callable[[Mapping[str, Optional[int]]], Callable[[], None]]
"""Installs ranks into the model and returns what undoes it (``refactorize`` passes its swap)."""


def _cuda_devices(model: nn.Module) -> list[torch.device]:
    return sorted(
        {t.device for t in list(model.parameters()) + list(model.buffers()) if t.device.type == "cuda"}, key=str
    )


_MODULE_DICTS = ("_parameters", "_buffers", "_modules")


class preserved_training_state:
    """Puts back what training steps change: parameters' values and ``.grad`` (the same tensor
    objects; grads are None meanwhile), buffers (the objects each module held, with their
    values), attributes each module rebinds, modules' training flags, and the CPU, CUDA, Python
    and NumPy random streams. ``reset()`` puts values, buffers and attributes back early (between
    timings)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> "preserved_training_state":
        m = self.model
        with torch.no_grad():
            self.params = [(p, p.detach().clone(), p.grad) for p in m.parameters()]
            self.buffers = [(b, b.detach().clone()) for b in m.buffers()]
        self.modules = [
            (mod, {k: v for k, v in vars(mod).items() if k not in _MODULE_DICTS}, dict(mod._buffers))
            for mod in m.modules()
        ]
        for p, _, _ in self.params:
            p.grad = None
        self._rng = torch.random.fork_rng(devices=_cuda_devices(m))
        self._rng.__enter__()
        self._python_rng = random.getstate()
        self._numpy_rng = np.random.get_state() if np is not None else None
        return self

    def reset(self) -> None:
        for mod, attrs, buffers in self.modules:
            for k in [k for k in vars(mod) if k not in attrs and k not in _MODULE_DICTS]:
                del mod.__dict__[k]
            mod.__dict__.update(attrs)
            mod._buffers.clear()
            mod._buffers.update(buffers)
        with torch.no_grad():
            for p, value, _ in self.params:
                p.copy_(value)
                p.grad = None
            for b, value in self.buffers:
                b.copy_(value)

    def __exit__(self, *exc) -> None:
        try:
            self.reset()
            for p, _, grad in self.params:
                p.grad = grad
        finally:
            random.setstate(self._python_rng)
            if self._numpy_rng is not None:
                np.random.set_state(self._numpy_rng)
            self._rng.__exit__(*exc)


def timing_optimizers(optimizers: Sequence[Any], replace: Mapping[int, list]) -> list[torch.optim.Optimizer]:
    """Fresh optimizers of the same classes and param-group hyperparameters, each parameter
    replaced by ``replace[id(param)]`` where given (a swapped layer's new parameters); an
    optimizer that cannot be rebuilt is left out (its step is then not timed)."""
    out = []
    for opt in optimizers:
        opt = getattr(opt, "optimizer", opt)  # Lightning wraps optimizers
        groups = []
        for g in getattr(opt, "param_groups", ()):
            params = [q for p in g["params"] for q in replace.get(id(p), [p])]
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
        if not any(g["params"] for g in groups):
            continue
        cls = type(opt)
        try:
            accepted = inspect.signature(cls.__init__).parameters
            defaults = {k: v for k, v in getattr(opt, "defaults", {}).items() if k in accepted}
            out.append(cls(groups, **defaults))
        except Exception:  # an exotic optimizer: time the step without it
            continue
    return out


def needs_closure(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` requires a closure (``torch.optim.LBFGS``: ``step(closure)``)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # Lightning wraps optimizers
    try:
        closure = inspect.signature(type(opt).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _loss(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, Mapping):
        out = out.get("loss")
    return out if isinstance(out, torch.Tensor) and out.requires_grad else None


@dataclasses.dataclass
class ModelTrial:
    """One comparison of the model's training step with the ``layers`` candidates that save most
    against today's structure: the median speedup, its confidence interval, the rounds timed and
    the verdict (``paired_timing``: only "faster" applies them)."""

    layers: int
    seconds: float  # median seconds per step with these candidates
    speedup: float  # median of today's seconds / these, over the rounds
    low: float
    high: float
    rounds: int
    verdict: str

    @classmethod
    def of(cls, layers: int, c: Comparison) -> "ModelTrial":
        return cls(layers, c.candidate_seconds, c.ratio, c.low, c.high, c.rounds, c.verdict)

    @property
    def passes(self) -> bool:
        return self.verdict == paired_timing.FASTER


@dataclasses.dataclass
class ModelSpeedResult:
    """What the whole-model check measured and decided (plain data: broadcast under DDP)."""

    margin: float
    order: list[str]  # candidates, most multiply-adds saved first
    seconds_before: Optional[float] = None  # today's structure (median over the first comparison)
    trials: list[ModelTrial] = dataclasses.field(default_factory=list)
    kept: int = 0  # the first ``kept`` of ``order`` are applied
    optimizer_timed: bool = True
    error: Optional[str] = None

    @property
    def speedup(self) -> float:
        """The applied structure's whole-model speed against today's (1.0: nothing applied)."""
        if self.kept == 0:
            return 1.0
        return next(t.speedup for t in self.trials if t.layers == self.kept)

    def history(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(t) for t in self.trials]

    def describe(self) -> str:
        """One line: what was timed and decided."""
        tried = ", ".join(f"{t.layers} of {len(self.order)}: {_trial_text(t)}" for t in self.trials)
        step = "forward + backward + optimizer step" if self.optimizer_timed else "forward + backward"
        before = cast(float, self.seconds_before)  # a decided result: set by its first comparison
        return (
            f"the model's training step ({step}) took {before * 1e3:.3g} ms with today's structure; "
            f"with the candidates saving most multiply-adds: {tried} (needs {self.margin:.2f}x); applied {self.kept} "
            f"of {len(self.order)}, {self.speedup:.2f}x today's speed"
        )


def _trial_text(t: ModelTrial) -> str:
    if t.rounds <= 1:
        return f"{t.speedup:.2f}x"
    undecided = ", undecided" if t.verdict == paired_timing.UNDECIDED else ""
    return f"{t.speedup:.2f}x ({t.low:.2f}-{t.high:.2f} over {t.rounds} rounds{undecided})"


class ModelSpeedCheck:
    """Decides which changing layers to apply from the model's whole training step.

    Args:
        model: the model whose layers are swapped (in place, undone after each timed sample).
        forward: runs the model's forward on one training batch (in its precision context) and
            returns the loss (a tensor, or a mapping with ``"loss"``); backward runs outside it.
        optimizers: their classes and param groups are copied for the timed optimizer step.
        margin: the whole step must be at least this many times as fast as today's.
        clock: ``clock(step, model)`` -> seconds per step, taken as exact (one call per
            structure); default: today's and the candidate structure timed in alternating rounds
            until the speedup's interval at ``confidence`` clears the margin, at most ``repeats``
            rounds or ``budget`` seconds per comparison (``paired_timing.compare``).
        min_time: seconds each timed sample lasts at least.
        session: a context manager factory entered around all timings (e.g. silenced logging).
        broadcast / measure_here: under DDP, rank 0 measures and ``broadcast`` hands its decision
            to every process (called by all of them, in the same order).

    ``result`` holds the last decision (``ModelSpeedResult``), None when nothing was to decide.
    """

    def __init__(
        self, model: nn.Module, forward: Callable[[], Any], optimizers: Sequence[Any] = (), margin: float = 1.15,
        clock: Optional[ModelClock] = None, repeats: int = 60, min_time: float = 0.05,
        session: Optional[Callable[[], ContextManager]] = None,
        broadcast: Optional[Callable[[Any], Any]] = None, measure_here: bool = True,
        confidence: float = 0.95, budget: float = 5.0,
    ) -> None:
        self.model, self.forward, self.optimizers = model, forward, list(optimizers)
        self.margin, self.repeats, self.min_time = float(margin), int(repeats), float(min_time)
        self.confidence, self.budget = float(confidence), float(budget)
        self.clock = clock
        self.session = session or contextlib.nullcontext
        self.broadcast, self.measure_here = broadcast, measure_here
        self.result: Optional[ModelSpeedResult] = None

    def caps(
        self, layers: Mapping[str, nn.Module], candidates: Mapping[str, LayerCandidate]
    ) -> dict[str, Optional[int]]:
        """No per-layer caps: a budget is spent freely, the whole model then decides."""
        return {}

    def _runner(self, optimizers: list) -> Callable[[], None]:
        params = list(self.model.parameters())

        def forward_backward() -> torch.Tensor:
            for p in params:  # as Lightning's closure: gradients zeroed before each backward
                p.grad = None
            with torch.inference_mode(False), torch.enable_grad():
                loss = _loss(self.forward())
                if loss is not None:
                    loss.backward()
            return loss.detach() if loss is not None else torch.zeros(())

        closured = [opt for opt in optimizers if needs_closure(opt)]

        def run() -> None:
            if closured:  # LBFGS: its step runs the forward + backward (as often as it needs), as in Lightning
                for opt in closured:
                    opt.step(forward_backward)
            else:
                forward_backward()
            for opt in optimizers:
                if not any(opt is c for c in closured):
                    opt.step()
                opt.zero_grad(set_to_none=True)
            for p in params:
                p.grad = None

        return run

    @contextlib.contextmanager
    def _installed(self, old: Mapping[str, list], install: Install, ranks: Mapping[str, Optional[int]],
                   state: preserved_training_state, result: ModelSpeedResult) -> Iterator[Callable[[], None]]:
        """The model with ``ranks`` installed, as one training step to run; undone and the
        training state put back on leaving."""
        undo = install(ranks) if ranks else (lambda: None)
        try:
            replace: dict[int, list] = {}
            for name in ranks:
                new = list(self.model.get_submodule(name).parameters())
                if [id(p) for p in new] != [id(p) for p in old[name]]:
                    for i, p in enumerate(old[name]):
                        replace[id(p)] = new if i == 0 else []
            optimizers = timing_optimizers(self.optimizers, replace)
            if len(optimizers) < len(self.optimizers):
                result.optimizer_timed = False
            yield self._runner(optimizers)
        finally:
            undo()
            state.reset()

    def _sampler(self, *installed: Any) -> Callable[[], float]:
        """One timed sample per call: the structure installed, one warm-up step (fresh modules
        and optimizer state), then enough steps to last ``min_time`` (CUDA synchronized)."""
        devices = _cuda_devices(self.model)
        clock = paired_timing.step_clock(on_gpu=bool(devices))
        count = 0

        def sync() -> None:
            for d in devices:
                torch.cuda.synchronize(d)

        def sample() -> float:
            nonlocal count
            with self._installed(*installed) as step:
                step()  # warm-up: fresh modules and optimizer state
                secs, count = paired_timing.seconds_per_step(step, sync, self.min_time, count, now=clock)
                return secs

        return sample

    def _clocked(self, *installed: Any) -> float:
        with self._installed(*installed) as step:
            secs = float(cast(ModelClock, self.clock)(step, self.model))  # called only with a clock
        if not (math.isfinite(secs) and secs > 0):
            raise ValueError(f"the whole-model clock returned {secs} seconds: expected a positive number")
        return secs

    def _decide(self, layers, candidates, ranks, install) -> ModelSpeedResult:
        changing = [n for n, r in ranks.items() if r is not None]

        def saved(n: str) -> float:
            c = candidates[n]
            return (c.view.params(c.view.rank) - c.view.params(ranks[n])) * c.positions

        order = sorted(changing, key=saved, reverse=True)  # stable: ties keep the layers' order
        result = ModelSpeedResult(self.margin, order)
        old = {n: list(m.parameters()) for n, m in layers.items()}
        with self.session(), preserved_training_state(self.model) as state:
            if self.clock is not None:
                result.seconds_before = self._clocked(old, install, {}, state, result)
            base = self._sampler(old, install, {}, state, result)

            def passes(k: int) -> bool:
                top = {n: ranks[n] for n in order[:k]}
                if self.clock is not None:
                    comparison = Comparison.exact(
                        cast(float, result.seconds_before),  # set above, with the same clock
                        self._clocked(old, install, top, state, result),
                        self.margin,
                    )
                else:
                    comparison = paired_timing.compare(
                        base, self._sampler(old, install, top, state, result), self.margin, self.confidence,
                        max_rounds=self.repeats, budget=self.budget,
                    )
                    if result.seconds_before is None:
                        result.seconds_before = comparison.base_seconds
                result.trials.append(ModelTrial.of(k, comparison))
                return comparison.passes

            lo, hi = 0, len(order)  # the top ``lo`` pass (0: trivially), the top ``hi`` do not
            if passes(hi):
                lo = hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if passes(mid):
                    lo = mid
                else:
                    hi = mid
            result.kept = lo
        return result

    def check(
        self, layers: Mapping[str, nn.Module], candidates: Mapping[str, LayerCandidate],
        ranks: Mapping[str, Optional[int]], install: Optional[Install] = None,
    ) -> tuple[dict[str, Optional[int]], dict[str, SpeedVerdict]]:
        """The ranks to install (the dropped candidates become None: the layer stays as it is) and
        a verdict per changing layer (a note on those dropped)."""
        if not any(r is not None for r in ranks.values()):
            self.result = None
            return dict(ranks), {}

        def compute() -> ModelSpeedResult:
            try:
                if install is None:
                    raise ValueError("the whole-model check needs the swap (install) to time the candidates")
                return self._decide(layers, candidates, ranks, install)
            except Exception as err:  # handed to every process, so that all of them raise alike
                return ModelSpeedResult(self.margin, [], error=f"{type(err).__name__}: {err}")

        value = compute() if self.measure_here or self.broadcast is None else None
        # without a broadcast, this process computed the result
        result = cast(ModelSpeedResult, value if self.broadcast is None else self.broadcast(value))
        if result.error is not None:
            raise RuntimeError(
                f"the whole-model speed check failed ({result.error}); the model is unchanged. Pass "
                "speed_guard=SpeedGuard(scope='layer') to time layers alone, or speed_guard=False"
            )
        self.result = result
        kept = set(result.order[: result.kept])
        out: dict[str, Optional[int]] = {}
        verdicts: dict[str, SpeedVerdict] = {}
        for n, r in ranks.items():
            if r is None:
                out[n] = None
                continue
            out[n] = r if n in kept else None
            verdicts[n] = SpeedVerdict(r, n in kept, note="" if n in kept else self._note(n, candidates[n], r, result))
        return out, verdicts

    def _note(self, name: str, c: LayerCandidate, rank: int, result: ModelSpeedResult) -> str:
        keep = "kept dense" if c.view.rank is None else f"kept at rank {c.view.rank}"
        at = result.order.index(name)
        failed = [t for t in result.trials if t.layers > at and not t.passes]
        trial = min(failed, key=lambda t: t.layers)
        return (
            f"{keep}: the model's training step measured {_trial_text(trial)} today's speed with the {trial.layers} "
            f"change{'s' if trial.layers > 1 else ''} saving most multiply-adds, rank {rank} here among them "
            f"(needs {result.margin:.2f}x); applied the "
            f"{result.kept} of {len(result.order)} saving most"
        )
