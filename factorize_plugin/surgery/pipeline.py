"""One target specification and one prepare / finish path, shared by both entry points.

The Lightning callback (at each milestone) and ``factorize_model`` (once) run the same pipeline:

    spec = TargetSpec(targets, exclude, min_params, min_features, max_samples, sample_fraction)
    selection = prepare(model, spec, policies)      # which layers, notes, advice (before any data)
    collector = collect_with(model, selection, spec)  # the caller runs its batches through it
    leave_out_silent(model, selection, spec, silent)   # layers that never ran
    reports = refactorize(model, selection.layers, collector.stats, policy, ...)
    reports, advice = finish(model, selection, reports, collector.positions, label)

Only *when* (a milestone, a validation run or a calibration pass) and *where* (DDP, logging) differ;
they stay in the callback. Plain PyTorch: no Lightning.

Defaults: which layers are chosen (``min_params=1024``, ``min_features=32``) is the same for both
entry points: it depends on the model only (a layer with fewer weights saves nothing worth a pair;
a 10-class head is left alone). How many rows of statistics are kept differs, for one reason:
collection cost. The callback collects at every milestone during training, on a validation set
that can be large, so by default it subsamples (``TRAINING_STATISTICS``: ``sample_fraction="auto"``,
at most 100_000 rows per layer); ``factorize_model`` collects once, on a calibration set chosen for
it (usually small), so by default it keeps every row (``ONE_SHOT_STATISTICS``: ``1.0``, 200_000).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch.nn as nn

from . import settings
from .ranks.policies import RankPolicy
from .report.advice import no_change, optimistic_fits, oversized_ranks, unmatched_excludes
from .report.reports import LayerReport
from .select.sharing import explicit_targets, resolve_silent, skip_report
from .select.targets import select_layers
from .statistics.collector import ActivationCollector

TRAINING_STATISTICS: dict[str, Any] = {"max_samples": 100_000, "sample_fraction": "auto"}  # the callback's defaults
ONE_SHOT_STATISTICS: dict[str, Any] = {"max_samples": 200_000, "sample_fraction": 1.0}  # factorize_model's defaults


@dataclass(frozen=True)
class TargetSpec:
    """Which layers to factorize and how many rows of their inputs to keep; every field is checked
    (and normalized) when the spec is built, by the shared checkers of ``settings``.

    Args:
        targets: fnmatch patterns over qualified module names (one string is one pattern); None: every
            Linear / Conv2d passing ``min_params`` and ``min_features``. Each must match a module.
        exclude: patterns of module names to leave dense.
        min_params: layers with fewer weights stay dense.
        min_features: layers whose min(in, out) (C_in * k_h * k_w and C_out for a convolution) is
            smaller stay dense.
        max_samples: cap on the rows of statistics per layer (None: no cap).
        sample_fraction: share in (0, 1] of each batch's rows kept, or ``"auto"`` (see
            ``ActivationCollector``).

    The defaults are the callback's; ``TargetSpec.one_shot(...)`` gives ``factorize_model``'s
    (the same layers, every row: see the module docstring).
    """

    targets: Optional[Union[str, Sequence[str]]] = None
    exclude: Optional[Union[str, Sequence[str]]] = None
    min_params: int = 1024
    min_features: int = 32
    max_samples: Optional[int] = TRAINING_STATISTICS["max_samples"]
    sample_fraction: Union[float, str] = TRAINING_STATISTICS["sample_fraction"]

    def __post_init__(self) -> None:
        checked = {
            "targets": settings.check_patterns("targets", self.targets),
            "exclude": settings.check_patterns("exclude", self.exclude),
            "min_params": settings.check_min_params(self.min_params),
            "min_features": settings.check_min_features(self.min_features),
            "max_samples": settings.check_max_samples(self.max_samples),
            "sample_fraction": settings.check_sample_fraction(self.sample_fraction),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def one_shot(cls, **fields) -> "TargetSpec":
        """A spec with ``factorize_model``'s statistics defaults (``ONE_SHOT_STATISTICS``)."""
        return cls(**{**ONE_SHOT_STATISTICS, **fields})

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))


@dataclass
class Selection:
    """What ``prepare`` chose: ``layers`` by qualified name (the modules as they were then), the
    layers left out with why (``skipped``: shown as reports), and warnings to give (``advice``)."""

    layers: dict[str, nn.Module]
    skipped: dict[str, str] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)


def prepare(model: nn.Module, spec: TargetSpec, policies: Mapping[str, RankPolicy] = {}) -> Selection:
    """Selects the layers of ``model`` by ``spec`` (raises if none), before any data is read.

    ``policies``: ``{label: policy}`` whose int ranks are checked against the layers' sizes (advice).
    Raises what ``select_layers`` raises, and ValueError when no layer is left.
    """
    skipped: dict[str, str] = {}
    layers = select_layers(
        model, spec.targets, spec.exclude, min_params=spec.min_params, min_features=spec.min_features, notes=skipped
    )
    if not layers:
        raise ValueError(
            f"no layer to factorize in {type(model).__name__}: targets={spec.targets}, exclude={spec.exclude}, "
            f"min_params={spec.min_params}, min_features={spec.min_features} leave none; lower them or widen the "
            "patterns"
        )
    advice = [unmatched_excludes(model, spec.exclude)]
    advice += [oversized_ranks(policy, layers, label) for label, policy in policies.items()]
    return Selection(layers, skipped, [a for a in advice if a])


def collect_with(
    model: nn.Module,
    selection: Selection,
    spec: TargetSpec,
    *,
    expected_batches: Optional[int] = None,
    space: str = "auto",
    holdout: bool = True,
    names: Optional[Sequence[str]] = None,
) -> ActivationCollector:
    """A collector (not attached) over the modules now under the selected layers' names (an earlier
    milestone may have swapped them for pairs), or those of ``names`` only (one pass of several:
    ``passes.plan_passes``), counting the calls of the skipped ones."""
    names = list(selection.layers) if names is None else names
    return ActivationCollector(
        {n: model.get_submodule(n) for n in names}, spec.max_samples, sample_fraction=spec.sample_fraction,
        space=space, holdout=holdout, expected_batches=expected_batches,
        counted={n: model.get_submodule(n) for n in selection.skipped},
    )


def leave_out_silent(
    model: nn.Module, selection: Selection, spec: TargetSpec, silent: Sequence[str], when: str
) -> dict[str, str]:
    """Layers never called during ``when``: an error if named explicitly in ``spec.targets``, else
    moved from ``selection.layers`` to ``selection.skipped``; returns their notes."""
    if not silent:
        return {}
    notes = resolve_silent(model, silent, explicit_targets(model, spec.targets), when)
    selection.skipped.update(notes)
    for name in notes:
        selection.layers.pop(name, None)
    return notes


def finish(
    model: nn.Module,
    selection: Selection,
    reports: list[LayerReport],
    positions: Mapping[str, float],
    label: str = "",
) -> tuple[list[LayerReport], list[str]]:
    """The transaction's reports followed by one report per skipped layer, and the warnings to give
    about the transaction's outcome (no layer changed; optimistic fits), labelled with ``label``."""
    skipped = [
        skip_report(n, model.get_submodule(n), note, positions.get(n, 1.0)) for n, note in selection.skipped.items()
    ]
    advice = [no_change(reports, label), optimistic_fits(reports, label)]
    return reports + skipped, [a for a in advice if a]


__all__ = [
    "ONE_SHOT_STATISTICS", "Selection", "TRAINING_STATISTICS", "TargetSpec", "collect_with", "finish",
    "leave_out_silent", "prepare",
]
