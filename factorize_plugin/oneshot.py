"""``factorize_model``: compress a PyTorch model in one call, without Lightning.

    reports = factorize_model(model, calibration_batches, param_budget=0.3)
    print(format_reports(reports))

Calibration batches are called the way the model is called: a tuple/list batch as
``model(*batch)``, a dict as ``model(**batch)``, anything else as ``model(batch)``. A labelled
DataLoader yields ``(x, y)``, which would call ``model(x, y)``: pass ``input_fn=lambda b: b[0]``
(or any function from a loader batch to the model's arguments).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .budget import ParamBudget, call_model, output_tensor, plan_budget
from .collector import ActivationCollector
from .planner import LayerReport, apply_ranks, build_candidates
from .policies import RankLike, make_policy
from .targets import select_layers


def _to_device(batch: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _model_device(model: nn.Module) -> Optional[torch.device]:
    for p in model.parameters():
        return p.device
    return None


class _Reiterable:
    """``fn(source)`` afresh on every iteration (a generator function over a re-iterable source)."""

    def __init__(self, fn: Callable[[Iterable], Iterable], source: Iterable) -> None:
        self.fn, self.source = fn, source

    def __iter__(self):
        return iter(self.fn(self.source))


def _print_progress(i: int, n: int, name: str) -> None:
    print(f"[factorize_model] solving layer {i + 1}/{n}: {name}", file=sys.stderr, flush=True)


def factorize_model(
    model: nn.Module,
    calibration: Iterable,
    *,
    targets: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    rank: Optional[RankLike] = None,
    max_nmse: Optional[float] = None,
    param_budget: Optional[float] = None,
    budget_metric: str = "params",
    max_samples: Optional[int] = 200_000,
    sample_fraction: float | str = 1.0,
    space: str = "auto",
    min_params: int = 0,
    regularization: float = 0.0,
    device: Optional[torch.device | str] = None,
    progress: bool | Callable[[int, int, str], None] = False,
    input_fn: Optional[Callable[[Any], Any]] = None,
    output_fn: Callable[[Any], torch.Tensor] = output_tensor,
    sensitivity: bool = True,
    sensitivity_batches: Optional[int] = None,
    n_probes: int = 8,
    compare_uniform: bool = True,
) -> list[LayerReport]:
    """Factorizes the model's Linear / Conv2d layers in place from statistics of their inputs on
    ``calibration`` data, and returns one report per targeted layer.

    Exactly one rank policy must be given (there is no default: how much to compress is the
    caller's decision):

    * ``rank``: the same rank everywhere, an int or a float in (0, 1) as a fraction of each
      layer's min(in, out) (channels for a convolution);
    * ``max_nmse``: per layer, the smallest rank whose NMSE on the calibration data is at most this;
    * ``param_budget``: keep this fraction in (0, 1] of the targeted layers' weights in total
      (multiply-adds with ``budget_metric="macs"``), allocated across layers by each layer's exact
      NMSE curve weighted by its measured effect on the model's output (``sensitivity``).

    A layer is left as it is where the chosen rank would not save multiply-adds (or would not
    lower an already-factorized layer's rank).

    Args:
        model: any ``nn.Module``. It runs in eval mode during calibration (dropout off, batch-norm
            statistics frozen) and its training mode is restored afterwards.
        calibration: an iterable of batches, called as ``model(*batch)`` (tuple/list),
            ``model(**batch)`` (dict) or ``model(batch)``, after ``input_fn``. With
            ``param_budget`` and ``sensitivity`` it is iterated again (a one-shot iterator is
            first copied into a list).
        targets / exclude: fnmatch patterns over qualified module names (``"encoder.*.fc1"``); every
            ``targets`` pattern must match something (ValueError), and a layer named exactly must
            be factorizable (TypeError). Default: every Linear and Conv2d (groups=1).
        max_samples: cap on rows of statistics per layer (tokens / output pixels).
        sample_fraction: passed to ``ActivationCollector``: share of each batch's rows kept, or
            ``"auto"`` (1.0: every row, up to ``max_samples``).
        space: passed to ``ActivationCollector``. ``"auto"`` (default) accumulates x @ W for layers
            with fewer outputs than inputs: O(min(D, M)^2) memory and an eigendecomposition of that
            size instead of O(D^2), exact here since the weights do not change between collection
            and solving. ``"input"`` accumulates the inputs themselves.
        min_params: skip layers with fewer weights.
        regularization: alpha >= 0 of the solver (0: the exact data-optimal fit; large values
            tend to the plain truncated SVD of the weights).
        device: where calibration batches are moved (default: the device of the model's first
            parameter). The model is not moved.
        progress: True prints one line per solved layer to stderr; a callable gets (i, n, name).
        input_fn: turns a calibration batch into the model's arguments, e.g. ``lambda b: b[0]``
            for ``(x, y)`` batches.
        output_fn: picks the tensor the model's output is judged by (default: the output, its
            ``logits``, or its first tensor); only used with ``param_budget``.
        sensitivity: with ``param_budget``, measure each layer's effect on the model's output at
            ``n_probes`` ranks (about ``n_probes`` extra forward passes per layer and batch) and
            allocate by those measured curves; False weighs every layer's NMSE equally and runs
            no extra pass.
        sensitivity_batches: use only the first so many calibration batches for those passes.
        n_probes: ranks probed per layer (geometric from 1 to the largest allowed).
        compare_uniform: with ``param_budget`` and ``sensitivity``, also measure the uniform
            allocation at no more cost (every layer keeping the same share of its weights) and keep
            whichever changes the model's output less on the calibration data (two more passes).

    Returns:
        ``LayerReport`` per targeted layer, in the model's order: name, type, matrix shape
        (D, M), old and new rank (None: dense), NMSE on the calibration data (0 if unchanged),
        weights and multiply-adds per sample before and after. ``planner.format_reports`` prints them.

    Raises:
        ValueError: not exactly one policy, a bad policy value (e.g. a budget outside (0, 1]), a
            pattern that matches nothing, no layer selected, no calibration data, or NaN/inf in a
            layer's inputs (the message names the layer).
        TypeError: a layer named in ``targets`` has a type that cannot be factorized.
        RuntimeError: a targeted layer never ran on the calibration data.
    """
    policy = make_policy(rank=rank, max_nmse=max_nmse, param_budget=param_budget)
    if isinstance(policy, ParamBudget) and budget_metric != policy.metric:
        policy = ParamBudget(policy.fraction, budget_metric)
    layers = select_layers(model, targets, exclude, min_params=min_params)
    if not layers:
        raise ValueError(
            f"no Linear/Conv2d layer of {type(model).__name__} was selected to factorize "
            f"(targets={targets!r}, exclude={exclude!r}, min_params={min_params})"
        )
    dev = torch.device(device) if device is not None else _model_device(model)
    needs_second_pass = isinstance(policy, ParamBudget) and sensitivity
    if needs_second_pass and iter(calibration) is calibration:
        calibration = list(calibration)

    def prepared(batches: Iterable):
        for b in batches:
            yield _to_device(input_fn(b) if input_fn is not None else b, dev)

    if progress is True:
        progress_fn: Optional[Callable[[int, int, str], None]] = _print_progress
    else:
        progress_fn = progress or None

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), ActivationCollector(
            layers, max_samples=max_samples, sample_fraction=sample_fraction, space=space
        ) as collector:
            n_batches = 0
            for batch in prepared(calibration):
                call_model(model, batch)
                n_batches += 1
        if n_batches == 0:
            raise ValueError("the calibration data yielded no batches")
        collector.check_nonempty()
        candidates = build_candidates(layers, collector.stats, collector.positions, regularization, progress_fn)
        if needs_second_pass:
            plan = plan_budget(
                model, layers, candidates, _Reiterable(prepared, calibration), policy, verify=compare_uniform,
                n_probes=n_probes, output_fn=output_fn, max_batches=sensitivity_batches,
            )  # fmt: skip
            ranks = plan.ranks
            if progress_fn is not None and plan.errors:
                errs = ", ".join(f"{k}: {v.relative:.4g}" for k, v in plan.errors.items())
                print(f"[factorize_model] relative output error on the calibration data: {errs}; "
                      f"keeping the {plan.chosen} allocation", file=sys.stderr, flush=True)  # fmt: skip
        else:
            ranks = policy.choose(candidates)
        return apply_ranks(model, layers, candidates, ranks)
    finally:
        model.train(was_training)
