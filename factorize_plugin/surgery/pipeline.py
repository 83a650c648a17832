"""One prepare / collect / finish path, shared by every door (the targets and statistics specs: ``specs.py``).

The Lightning callback (at each milestone) and ``factorize_model`` (once) run the same pipeline:

    targets, statistics = Targets(...), Statistics(...).at(door)   # specs.py: checked when built
    selection = prepare(model, targets, policies)       # which layers, notes, advice (before any data)
    collector = collect_with(model, selection, statistics)  # the caller runs its batches through it
    leave_out_silent(model, selection, targets, silent)    # layers that never ran
    reports = refactorize(model, selection.layers, collector.stats, policy, ...)
    reports, advice = finish(model, selection, reports, collector.positions, label)

Only *when* (a milestone, a validation run or a calibration pass) and *where* (DDP, logging) differ;
they stay in the callback. Plain PyTorch: no Lightning.

Defaults: which layers are chosen (``Targets``) is the same for both entry points: it depends on
the model only. How many rows of statistics are kept differs, for one reason: collection cost
(``arguments.DEFAULTS``, which ``Statistics.at(door)`` reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, cast

import torch.nn as nn

from .ranks.policies import RankPolicy
from .report.advice import no_change, optimistic_fits, oversized_ranks, unmatched_excludes
from .report.reports import LayerReport
from .select.sharing import explicit_targets, resolve_silent, skip_report
from .select.targets import select_layers
from .specs import Statistics, Targets
from .statistics.collector import ActivationCollector


@dataclass
class Selection:
    """What ``prepare`` chose: ``layers`` by qualified name (the modules as they were then), the
    layers left out with why (``skipped``: shown as reports), and warnings to give (``advice``)."""

    layers: dict[str, nn.Module]
    skipped: dict[str, str] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)


def prepare(model: nn.Module, targets: Targets, policies: Mapping[str, RankPolicy] = {}) -> Selection:
    """Selects the layers of ``model`` by ``targets`` (raises if none), before any data is read.

    ``policies``: ``{label: policy}`` whose int ranks are checked against the layers' sizes (advice).
    Raises what ``select_layers`` raises, and ValueError when no layer is left.
    """
    skipped: dict[str, str] = {}
    layers = select_layers(
        model, targets.include, targets.exclude, min_params=targets.min_params, min_features=targets.min_features,
        notes=skipped,
    )
    if not layers:
        raise ValueError(
            f"no layer to factorize in {type(model).__name__}: {targets.describe()} leave none; lower them or "
            "widen the patterns"
        )
    advice = [unmatched_excludes(model, targets.exclude)]
    advice += [oversized_ranks(policy, layers, label) for label, policy in policies.items()]
    return Selection(layers, skipped, [a for a in advice if a])


def collect_with(
    model: nn.Module,
    selection: Selection,
    statistics: Statistics,
    *,
    expected_batches: Optional[int] = None,
    holdout: bool = True,
    names: Optional[Sequence[str]] = None,
) -> ActivationCollector:
    """A collector (not attached) over the modules now under the selected layers' names (an earlier
    milestone may have swapped them for pairs), or those of ``names`` only (one pass of several:
    ``passes.plan_passes``), counting the calls of the skipped ones."""
    names = list(selection.layers) if names is None else names
    return ActivationCollector(
        {n: model.get_submodule(n) for n in names}, cast(Optional[int], statistics.max_samples),  # (resolved: .at)
        sample_fraction=statistics.sample_fraction, space=statistics.space, holdout=holdout,
        expected_batches=expected_batches,
        counted={n: model.get_submodule(n) for n in selection.skipped},
    )


def leave_out_silent(
    model: nn.Module, selection: Selection, targets: Targets, silent: Sequence[str], when: str
) -> dict[str, str]:
    """Layers never called during ``when``: an error if named explicitly in ``targets.include``, else
    moved from ``selection.layers`` to ``selection.skipped``; returns their notes."""
    if not silent:
        return {}
    notes = resolve_silent(model, silent, explicit_targets(model, targets.include), when)
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


__all__ = ["Selection", "collect_with", "finish", "leave_out_silent", "prepare"]
