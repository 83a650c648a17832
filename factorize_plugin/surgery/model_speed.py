"""The whole-model speed decision: keep a swap only where the model's training step gains.

A layer timed alone (``speed.SpeedCheck``) is a per-layer estimate: on a GPU a mid-sized layer's
isolated step is bound by host-side work (dispatch, autocast casts, a per-layer optimizer step)
that a real model hides behind the device's queue, so the per-layer guard keeps layers dense that
make the whole model faster. ``ModelSpeedCheck`` times the model's own training step instead
(forward + backward on a real batch, the same optimizer's step on copies: fresh optimizers of the
same class and param-group hyperparameters over the structure being timed), with today's
structure and with the candidate one, and drops the candidates that save the fewest
multiply-adds until the whole step is at least ``margin`` times as fast, or none remain (a
bisection over how many to keep: 1 + log2(n) timings at most).

Nothing of the run changes: parameters' values and ``.grad`` (the same tensors, None stays None),
buffers (BatchNorm running statistics and ``num_batches_tracked``), modules' training flags, the
CPU and CUDA random streams and the real optimizers' state are put back bit for bit
(``preserved_training_state``); candidate pairs are installed for the timing and removed again.
Plain PyTorch: the caller gives the step's forward (``forward()`` returns the loss) and the
context it runs in (``integration.speed_step`` does it for a LightningModule).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import statistics
import time
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .candidates import LayerCandidate
from .speed import SpeedVerdict

ModelClock = Callable[[Callable[[], None], nn.Module], float]
"""``clock(step, model)``: seconds per training step of ``model`` as it is now; ``step()`` runs
one (``SpeedGuard(clock=...)`` replaces the default ``measure_model_step``, e.g. in tests)."""

Install = Callable[[Mapping[str, Optional[int]]], Callable[[], None]]
"""Installs ranks into the model and returns what undoes it (``refactorize`` passes its swap)."""


def _cuda_devices(model: nn.Module) -> list[torch.device]:
    return sorted(
        {t.device for t in list(model.parameters()) + list(model.buffers()) if t.device.type == "cuda"}, key=str
    )


def measure_model_step(
    step: Callable[[], None], model: nn.Module, repeats: int = 7, warmup: int = 2, min_time: float = 0.003
) -> float:
    """Median seconds of ``step()`` over ``repeats`` samples after ``warmup`` steps (CUDA
    synchronized around each sample); a sample runs enough steps to last about ``min_time``."""
    devices = _cuda_devices(model)

    def sync() -> None:
        for d in devices:
            torch.cuda.synchronize(d)

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    count = max(1, min(1000, math.ceil(min_time / max(time.perf_counter() - t0, 1e-7))))
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(count):
            step()
        sync()
        samples.append((time.perf_counter() - t0) / count)
    return statistics.median(samples)


class preserved_training_state:
    """Puts back, bit for bit, what training steps change: parameters' values and ``.grad`` (the
    same tensor objects; grads are None meanwhile), buffers, modules' training flags, and the CPU
    and CUDA random streams. ``reset()`` restores values and buffers early (between timings)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> "preserved_training_state":
        m = self.model
        with torch.no_grad():
            self.params = [(p, p.detach().clone(), p.grad) for p in m.parameters()]
            self.buffers = [(b, b.detach().clone()) for b in m.buffers()]
        self.modes = [(mod, mod.training) for mod in m.modules()]
        for p, _, _ in self.params:
            p.grad = None
        self._rng = torch.random.fork_rng(devices=_cuda_devices(m))
        self._rng.__enter__()
        return self

    def reset(self) -> None:
        with torch.no_grad():
            for p, value, _ in self.params:
                p.copy_(value)
                p.grad = None
            for b, value in self.buffers:
                b.copy_(value)
        for mod, training in self.modes:
            mod.training = training

    def __exit__(self, *exc) -> None:
        try:
            self.reset()
            for p, _, grad in self.params:
                p.grad = grad
        finally:
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


def _loss(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, Mapping):
        out = out.get("loss")
    return out if isinstance(out, torch.Tensor) and out.requires_grad else None


@dataclasses.dataclass
class ModelTrial:
    """One timing of the model's training step with the ``layers`` candidates that save most."""

    layers: int
    seconds: float
    speedup: float  # today's seconds / these


@dataclasses.dataclass
class ModelSpeedResult:
    """What the whole-model check measured and decided (plain data: broadcast under DDP)."""

    margin: float
    order: list[str]  # candidates, most multiply-adds saved first
    seconds_before: Optional[float] = None  # today's structure
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

    def history(self) -> list[dict[str, float]]:
        return [dataclasses.asdict(t) for t in self.trials]

    def describe(self) -> str:
        """One line: what was timed and decided."""
        tried = ", ".join(f"{t.layers} of {len(self.order)}: {t.speedup:.2f}x" for t in self.trials)
        step = "forward + backward + optimizer step" if self.optimizer_timed else "forward + backward"
        return (
            f"the model's training step ({step}) took {self.seconds_before * 1e3:.3g} ms with today's structure; "
            f"with the candidates saving most multiply-adds: {tried} (needs {self.margin:.2f}x); applied {self.kept} "
            f"of {len(self.order)}, {self.speedup:.2f}x today's speed"
        )


class ModelSpeedCheck:
    """Decides which changing layers to apply from the model's whole training step.

    Args:
        model: the model whose layers are swapped (in place, undone after each timing).
        forward: runs the model's forward on one training batch (in its precision context) and
            returns the loss (a tensor, or a mapping with ``"loss"``); backward runs outside it.
        optimizers: their classes and param groups are copied for the timed optimizer step.
        margin: the whole step must be at least this many times as fast as today's.
        clock: ``clock(step, model)`` -> seconds per step (default ``measure_model_step``).
        repeats / min_time: for the default clock.
        session: a context manager factory entered around all timings (e.g. silenced logging).
        broadcast / measure_here: under DDP, rank 0 measures and ``broadcast`` hands its decision
            to every process (called by all of them, in the same order).

    ``result`` holds the last decision (``ModelSpeedResult``), None when nothing was to decide.
    """

    def __init__(
        self, model: nn.Module, forward: Callable[[], Any], optimizers: Sequence[Any] = (), margin: float = 1.15,
        clock: Optional[ModelClock] = None, repeats: int = 7, min_time: float = 0.003,
        session: Optional[Callable[[], ContextManager]] = None,
        broadcast: Optional[Callable[[Any], Any]] = None, measure_here: bool = True,
    ) -> None:
        self.model, self.forward, self.optimizers = model, forward, list(optimizers)
        self.margin, self.repeats, self.min_time = float(margin), int(repeats), float(min_time)
        self.clock = clock
        self.session = session or contextlib.nullcontext
        self.broadcast, self.measure_here = broadcast, measure_here
        self.result: Optional[ModelSpeedResult] = None

    def caps(
        self, layers: Mapping[str, nn.Module], candidates: Mapping[str, LayerCandidate]
    ) -> dict[str, Optional[int]]:
        """No per-layer caps: a budget is spent freely, the whole model then decides."""
        return {}

    def _seconds(self, run: Callable[[], None]) -> float:
        if self.clock is not None:
            secs = float(self.clock(run, self.model))
        else:
            secs = measure_model_step(run, self.model, self.repeats, min_time=self.min_time)
        if not (math.isfinite(secs) and secs > 0):
            raise ValueError(f"the whole-model clock returned {secs} seconds: expected a positive number")
        return secs

    def _runner(self, optimizers: list) -> Callable[[], None]:
        params = list(self.model.parameters())

        def run() -> None:
            with torch.inference_mode(False), torch.enable_grad():
                loss = _loss(self.forward())
                if loss is not None:
                    loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            for p in params:
                p.grad = None

        return run

    def _time(self, layers: Mapping[str, nn.Module], old: Mapping[str, list], install: Optional[Install],
              ranks: Mapping[str, Optional[int]], state: preserved_training_state,
              result: ModelSpeedResult) -> float:
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
            return self._seconds(self._runner(optimizers))
        finally:
            undo()
            state.reset()

    def _decide(self, layers, candidates, ranks, install) -> ModelSpeedResult:
        changing = [n for n, r in ranks.items() if r is not None]

        def saved(n: str) -> float:
            c = candidates[n]
            return (c.view.params(c.view.rank) - c.view.params(ranks[n])) * c.positions

        order = sorted(changing, key=saved, reverse=True)  # stable: ties keep the layers' order
        result = ModelSpeedResult(self.margin, order)
        old = {n: list(m.parameters()) for n, m in layers.items()}
        with self.session(), preserved_training_state(self.model) as state:
            result.seconds_before = self._time(layers, old, install, {}, state, result)

            def passes(k: int) -> bool:
                secs = self._time(layers, old, install, {n: ranks[n] for n in order[:k]}, state, result)
                result.trials.append(ModelTrial(k, secs, result.seconds_before / secs))
                return result.trials[-1].speedup >= self.margin

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
        result = value if self.broadcast is None else self.broadcast(value)
        if result.error is not None:
            raise RuntimeError(
                f"the whole-model speed check failed ({result.error}); the model is unchanged. Pass "
                "speed_guard=SpeedGuard(scope='layer') to time layers alone, or speed_guard=False"
            )
        self.result = result
        kept = set(result.order[: result.kept])
        out, verdicts = {}, {}
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
        failed = [t for t in result.trials if t.layers > at and t.speedup < result.margin]
        trial = min(failed, key=lambda t: t.layers)
        return (
            f"{keep}: the model's training step measured {trial.speedup:.2f}x today's speed with the {trial.layers} "
            f"change{'s' if trial.layers > 1 else ''} saving most multiply-adds, rank {rank} here among them "
            f"(needs {result.margin:.2f}x); applied the "
            f"{result.kept} of {len(result.order)} saving most"
        )
