"""Warnings for settings that are valid but almost certainly not what the user meant.

Each function returns the message (or None); the caller warns in its own way (``warnings.warn`` in
``factorize_model``, ``rank_zero_warn`` in the Lightning callback). Plain PyTorch.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch.nn as nn

from ...layers.adapters import layer_view
from ..ranks.policies import FixedRank, RankPolicy
from ..select.modules import match_names
from .reports import LayerReport


def unmatched_excludes(model: nn.Module, exclude: Optional[Sequence[str]]) -> Optional[str]:
    """A message naming the ``exclude`` patterns that match no module of ``model``, else None."""
    if not exclude:
        return None
    names = [n for n, _ in model.named_modules() if n]
    unmatched = [p for p in exclude if not match_names(names, [p], None)]
    if not unmatched:
        return None
    return (
        f"exclude pattern(s) {unmatched} match no module of {type(model).__name__}, so they leave nothing out "
        f"(a typo?); module names look like {names[:6]}"
    )


def oversized_ranks(policy: RankPolicy, layers: Mapping[str, nn.Module], label: str = "") -> Optional[str]:
    """For an int ``FixedRank``: a message naming the layers whose min(in, out) is at most that rank
    (a pair of that rank cannot be smaller than the dense layer: they stay as they are), else None."""
    if not isinstance(policy, FixedRank) or not isinstance(policy.rank, int):
        return None
    sizes = {name: min(v.in_dim, v.out_dim) for name, v in ((n, layer_view(m)) for n, m in layers.items())}
    big = {name: size for name, size in sizes.items() if policy.rank >= size}
    if not big:
        return None
    where = f"{label}: " if label else ""
    return (
        f"{where}rank={policy.rank} is at or above the size min(in, out) of layer(s) {big}: they stay dense. "
        "Give a smaller int rank, or a float in (0, 1) for a fraction of each layer's size"
    )


def no_change(reports: Sequence[LayerReport], label: str = "") -> Optional[str]:
    """A message when a refactorization changed no layer at all (each layer's reason), else None."""
    if not reports or any(r.changed for r in reports):
        return None
    reasons = []
    for r in reports[:6]:
        d, m = r.shape
        useful = max(0, (d * m - 1) // (d + m))
        cap = useful if r.old_rank is None else min(useful, r.old_rank - 1)
        reasons.append(f"{r.name}: {r.note or f'largest rank that saves multiply-adds {cap}'}")
    where = f"{label} " if label else ""
    if all("model's training step measured" in r.note for r in reports):  # the whole-model decision
        return (
            f"{where}changed no layer: the speed guard measured the model's training step no faster with the "
            f"candidates, down to the single change saving most multiply-adds ({'; '.join(reasons)}). Lower the "
            "ranks, or pass speed_guard=False to factorize for size alone"
        )
    if all("measured" in r.note for r in reports):  # every layer kept dense by the speed guard
        return (
            f"{where}changed no layer: the speed guard measured every candidate pair slower than its dense layer "
            f"({'; '.join(reasons)}). Lower the ranks, time on the rows you train with, or pass speed_guard=False "
            "to factorize for size alone"
        )
    return (
        f"{where}changed no layer: at the chosen ranks no targeted layer would get cheaper (a pair of rank r costs "
        "r * (in + out) against in * out dense, so e.g. a rank of 0.5 on a square layer saves nothing), or every "
        f"layer is already at or below it, or a layer's note says why it stayed ({'; '.join(reasons)}). Choose lower "
        "ranks"
    )


def optimistic_fits(reports: Sequence[LayerReport], label: str = "") -> Optional[str]:
    """A message naming the layers whose held-out NMSE is much above the fitted one (few rows for
    their width: the fitted NMSE is optimistic), else None."""
    bad = {
        r.name: (round(r.nmse, 3), round(r.heldout_nmse, 3), r.samples)
        for r in reports
        if r.heldout_nmse is not None and r.heldout_nmse > 2 * r.nmse + 0.02 and r.heldout_nmse - r.nmse > 0.05
    }
    if not bad:
        return None
    where = f"{label}: " if label else ""
    return (
        f"{where}the fitted NMSE is optimistic for layer(s) {{name: (fitted, held-out, rows)}} = {bad}: the statistics "
        "hold few rows for the layers' input width, so the fit is measured on the rows it was fitted to. Collect "
        "more rows (more or larger calibration / validation batches, sample_fraction=1.0) or raise regularization"
    )
