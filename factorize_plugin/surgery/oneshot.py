"""``factorize_model``: compress a PyTorch model in one call, without Lightning.

    reports = factorize_model(model, calibration_batches, param_budget=0.3)
    print(format_reports(reports))

Calibration batches go through ``calling.call_model``: a tuple/list batch gives the model its
first element (``(x, y)`` from a labelled loader), a dict is passed as keyword arguments, anything
else as it is; ``input_fn`` overrides that.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Iterable, Literal, Optional, Sized, Union

import torch
import torch.nn as nn

from ..layers.sharded import check_units, is_sharded
from . import settings
from .arguments import default, renamed
from .calling import InputFn, call_model, evaluating, model_device, output_tensor, to_device
from .pipeline import collect_with, finish, leave_out_silent, prepare
from .ranks.policies import RankLike, RankPolicy, make_policy
from .ranks.sensitivity import OutputProbe
from .report.blame import naming_failures
from .report.reports import LayerReport, Reports
from .select.preflight import check_not_compiled, check_not_meta, uncompiled
from .specs import Patterns, Statistics, Targets, statistics_from, targets_from
from .statistics.collector import ActivationCollector
from .statistics.passes import collect_in_passes, plan_passes, solve_pass
from .statistics.sharding import Sharding, default_group_sum
from .swap.refactorize import refactorize
from .timing.speed import SpeedCheck, SpeedGuard, resolve_guard


class _Prepared:
    """The calibration batches moved to ``device``, afresh on every iteration."""

    def __init__(self, source: Iterable, device: Optional[torch.device]) -> None:
        self.source, self.device = source, device

    def __iter__(self):
        for b in self.source:
            yield to_device(b, self.device)


def _advise(message: Optional[str]) -> None:
    if message is not None:
        # stacklevel 4: the user's call, past the inference_mode(False) wrapper
        warnings.warn(f"factorize_model: {message}", UserWarning, stacklevel=4)


def _print_progress(i: int, n: int, name: str) -> None:
    print(f"[factorize_model] solving layer {i + 1}/{n}: {name}", file=sys.stderr, flush=True)


def _collect(
    model: nn.Module, collector: ActivationCollector, batches: Iterable, input_fn: Optional[InputFn]
) -> ActivationCollector:
    with evaluating(model), collector, naming_failures(model):
        n_batches = 0
        for batch in batches:
            call_model(model, batch, input_fn)
            n_batches += 1
    if n_batches == 0:
        raise ValueError("the calibration data yielded no batches")
    return collector


def _sum_over_processes(collector: ActivationCollector) -> None:
    """An FSDP2-sharded model in a ``torch.distributed`` job: every process's statistics summed
    (the default process group), so that all of them solve the same problem."""
    collector.all_reduce_(default_group_sum)


def _rank_zero_choice(ranks: dict) -> dict:
    """The ranks process 0 chose, on every process."""
    box = [ranks]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@torch.inference_mode(False)  # works under torch.inference_mode(): new parameters are normal tensors
def factorize_model(
    model: nn.Module,
    calibration: Iterable,
    policy: Optional[RankPolicy] = None,
    *,
    rank: Optional[RankLike] = None,
    max_nmse: Optional[float] = None,
    param_budget: Optional[float] = None,
    targets: Union[Patterns, Targets] = None,
    statistics: Optional[Statistics] = None,
    regularization: float = 0.0,
    device: Optional[Union[torch.device, str]] = None,
    input_fn: Optional[InputFn] = None,
    output_fn: Callable[[Any], torch.Tensor] = output_tensor,
    budget_batches: Optional[int] = default("budget_batches", "one_shot"),
    progress: Union[bool, Callable[[int, int, str], None]] = False,
    speed_guard: Union[bool, Literal["auto"], SpeedGuard] = "auto",
    exclude: Patterns = None,  # the deprecated names (arguments.MOVED, RENAMED), until the next release
    min_params: int = 1024,
    min_features: int = 32,
    max_samples: Optional[int] = default("max_samples", "one_shot"),
    sample_fraction: Union[float, str] = default("sample_fraction", "one_shot"),
    space: str = "auto",
    max_statistics_bytes: Optional[int] = None,
    sensitivity_batches: Optional[int] = None,
) -> list[LayerReport]:
    """Factorizes the model's Linear / Conv2d layers in place from statistics of their inputs on
    ``calibration`` data, and returns one report per targeted layer.

    Exactly one rank policy must be given (how much to compress is the caller's decision): a
    ``policy`` object (``FixedRank``, ``MaxNMSE``, ``ParamBudget``, or your own ``RankPolicy``), or
    one scalar shortcut:

    * ``rank``: the same rank everywhere, an int or a float in (0, 1) as a fraction of each
      layer's min(in, out) (channels for a convolution). This is the model-level meaning of a
      fraction; the core ``factorize_matrix`` / ``factorize_conv2d`` follow the reference
      implementation's meaning instead (a fraction of the input features D);
    * ``max_nmse``: per layer, the smallest rank whose NMSE on the calibration data is at most this;
    * ``param_budget``: ``ParamBudget(param_budget)``: keep this fraction in (0, 1] of the targeted
      layers' dense weights in total, allocated by each layer's measured effect on the model's
      output on the calibration batches (``ParamBudget(..., metric="macs")`` counts multiply-adds,
      ``sensitivity=False`` skips the measurement).

    A layer is left as it is where the chosen rank would not save multiply-adds (or would not
    lower an already-factorized layer's rank), and, with the speed guard on (the default), where
    its pair does not measure ``margin`` (1.15) x as fast as the dense layer on this machine for
    the calibration batches' shape, dtype and device (its report's ``note`` says so). If anything
    fails, the model is left unchanged. It may be called under ``torch.inference_mode()`` (with
    batches made there): it runs with inference mode off, so the new parameters are ordinary
    tensors that can be trained on afterwards.

    Args:
        model: any ``nn.Module``. It runs in eval mode during calibration (dropout off, batch-norm
            statistics frozen); afterwards every submodule has its own training mode back. A
            ``torch.compile``'d model: the module it wraps is calibrated (eagerly) and changed (the
            compiled model recompiles on its next call); a compiled submodule or a parameter on
            the meta device is refused (ValueError) before anything runs. A model sharded by FSDP2
            (``fully_shard``, each targeted layer its own unit) in a ``torch.distributed`` job:
            every process calls this with its own calibration batches (as many batches each); the
            statistics are summed over the processes, each layer is gathered for its solve one at
            a time, and the new pairs are sharded like the layers they replace.
        calibration: an iterable of batches (see the module docstring for how they are called).
            With a measuring ``ParamBudget`` it is iterated again (a one-shot iterator is first
            copied into a list).
        targets: which layers: fnmatch patterns over qualified module names (``"encoder.*.fc1"``;
            a single string is one pattern), or a ``Targets`` (with ``exclude``, ``min_params``
            (1024) and ``min_features`` (32), as the callback's: by default a 10-class head is left
            alone). Every pattern must match something (ValueError), and a layer named exactly
            must be factorizable (TypeError); an ``exclude`` pattern that matches nothing only
            warns (UserWarning). Default: every Linear and Conv2d (groups=1) with at least 1024
            weights and 32 features.
        statistics: a ``Statistics`` (rows per layer, share of each batch's rows, ``max_bytes``,
            ``space``). Unlike the callback's (100_000, ``"auto"``), the default rows keep every
            row, up to 200_000: the calibration set is read once and chosen for this, so
            statistics cost little here (``arguments.DEFAULTS``). ``space="auto"`` accumulates
            x @ W for layers with fewer outputs than inputs, exact here since the weights do not
            change before solving. With ``max_bytes``, when the statistics of every targeted
            layer would exceed it (``passes.statistics_bound``, from the shapes: sharing not
            counted, held-out halves counted 3x), the calibration batches are run once per group
            of consecutive layers that fits, each group solved and its statistics dropped before
            the next (``surgery/statistics/passes.py``); the factors are those of one pass. A
            one-shot iterator is first copied into a list.
        regularization: alpha >= 0 of the solver (0: the exact data-optimal fit; large values
            tend to the plain truncated SVD of the weights).
        device: where calibration batches are moved (default: the device of the model's first
            parameter). The model is not moved.
        input_fn: turns a calibration batch into the model's input (default ``calling.default_inputs``).
        output_fn: picks the tensor the model's output is judged by (default: the output, its
            ``logits``, or its first tensor); used by a measuring ``ParamBudget``.
        budget_batches: a measuring ``ParamBudget`` uses only the first so many batches (None: all;
            0: it allocates by the layers' NMSE alone), as the callback's ``budget_batches``.
        progress: True prints one line per solved layer to stderr; a callable gets (i, n, name).
        speed_guard: ``"auto"`` (default): True, except on an FSDP2-sharded model, where it is off
            (an explicit guard is refused there). True: ``SpeedGuard(mode="inference")``, forward-only timings at the
            calibration batches' rows; pass ``SpeedGuard(mode="train", ...)`` for a model that is
            trained on afterwards (the rows of a training batch then matter: calibrate with
            batches of that size), or False for the same structure on every machine (the guard's
            decisions depend on the machine's timings). Layers are timed alone here (scope
            ``"layer"``; ``scope="model"`` is refused: there is no training step to time).
        exclude: deprecated, ``Targets.exclude`` (as are ``min_params`` and ``min_features``:
            the old flat names, with a ``DeprecationWarning``, going in the next release).
        max_samples: deprecated, ``Statistics.max_samples`` (as are ``sample_fraction``, ``space``
            and ``max_statistics_bytes``, now ``Statistics.max_bytes``).
        sensitivity_batches: the old name of ``budget_batches`` (a ``DeprecationWarning``; it goes in
            the next release).

    Returns:
        ``LayerReport`` per targeted layer, in the model's order (``format_reports`` prints them),
        as a list with ``statistics_bytes`` (the peak bytes of the float64 statistics collected,
        over the passes) and ``statistics_passes``.

    Raises:
        ValueError: not exactly one policy, a bad policy value, a ``targets`` pattern that matches
            no module (an ``exclude`` pattern that matches none is not an error: it warns,
            UserWarning), a layer named in ``targets`` that is unsafe to swap, no layer selected,
            no calibration data, or NaN/inf in a layer's inputs (naming the layer).
        TypeError: a layer named in ``targets`` has a type that cannot be factorized.
        NotImplementedError: a layer named in ``targets`` is a grouped convolution.
        RuntimeError: a layer named in ``targets`` never ran on the calibration data (a default
            target that never ran is left out, its report's ``note`` says why).
    """
    policy = make_policy(rank=rank, max_nmse=max_nmse, param_budget=param_budget, policy=policy)
    model = uncompiled(model)
    check_not_compiled(model, "factorize_model")
    check_not_meta(model, "factorize_model")
    # every setting checked before the calibration data is read (the callback's checkers)
    where = "factorize_model"
    targets = targets_from(where, targets, exclude=exclude, min_params=min_params, min_features=min_features)
    statistics = statistics_from(
        where, statistics, "one_shot", max_samples=max_samples, sample_fraction=sample_fraction, space=space,
        max_statistics_bytes=max_statistics_bytes,
    )
    regularization = settings.check_regularization(regularization)
    device = settings.check_device(device)
    input_fn = settings.check_callable("input_fn", input_fn)
    output_fn = settings.check_callable("output_fn", output_fn, optional=False)
    budget_batches = renamed("sensitivity_batches", sensitivity_batches, budget_batches, "factorize_model")
    budget_batches = settings.check_optional_whole("budget_batches", budget_batches, 0, "all batches")
    progress = settings.check_progress(progress)
    sharded = is_sharded(model)
    distributed = sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    guard = resolve_guard(speed_guard, "inference", sharded=sharded)
    if guard is not None and guard.scope == "model":
        raise ValueError(
            "factorize_model times layers alone: SpeedGuard(scope='model') needs a training step to time (the "
            "LowRankFactorization callback); pass SpeedGuard(scope='layer') or leave scope unset"
        )
    selection = prepare(model, targets, {"": policy})
    check_units(model, selection.layers)
    for message in selection.advice:
        _advise(message)
    groups = plan_passes({n: model.get_submodule(n) for n in selection.layers}, statistics.max_bytes, statistics.space)
    if (policy.uses_probe or len(groups) > 1) and iter(calibration) is calibration:
        calibration = list(calibration)
    batches = _Prepared(calibration, torch.device(device) if device is not None else model_device(model))
    progress_fn = _print_progress if progress is True else (progress or None)
    expected = len(calibration) if isinstance(calibration, Sized) else None

    def collect(i: int, names: list[str]) -> ActivationCollector:
        c = collect_with(model, selection, statistics, expected_batches=expected, names=names, holdout=not distributed)
        return _collect(model, c, batches, input_fn)

    def solve(collector: ActivationCollector, names: list[str], sharding: Optional[Sharding]) -> dict:  # never sharded
        leave_out = lambda silent: leave_out_silent(model, selection, targets, silent, "calibration")  # noqa: E731
        return solve_pass(model, collector, names, selection.layers, leave_out, regularization, progress_fn)

    solved = collect_in_passes(groups, collect, solve, _sum_over_processes if distributed else None)
    layers = selection.layers
    if not layers:
        raise RuntimeError(f"no targeted layer ran on the calibration data: {selection.skipped}")
    measuring = policy.uses_probe and budget_batches != 0
    probe = OutputProbe(model, layers, batches, input_fn, output_fn, budget_batches) if measuring else None
    reports = refactorize(
        model, layers, None, policy, probe=probe, candidates=solved.candidates,
        agree=_rank_zero_choice if distributed else None,
        speed=None if guard is None else SpeedCheck(guard, solved.inputs),
    )
    reports, advice = finish(model, selection, reports, solved.positions, f"factorize_model({policy!r})")
    for message in advice:
        _advise(message)
    plan = getattr(policy, "last_plan", None)
    if progress_fn is not None and plan is not None and plan.errors:
        errs = ", ".join(f"{k}: {v.relative:.4g}" for k, v in plan.errors.items())
        print(f"[factorize_model] relative output error on the calibration data: {errs}; keeping the {plan.chosen} "
              "allocation", file=sys.stderr, flush=True)
    return Reports(reports, statistics_bytes=max(solved.peak_bytes), statistics_passes=solved.passes)
