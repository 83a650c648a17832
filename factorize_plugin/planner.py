"""From collected statistics to swapped layers: solve each layer, apply a rank policy, install
the factors, and report what changed. Shared by ``factorize_model`` and the Lightning callback."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch.nn as nn

from .core.solver import decompose
from .core.statistics import MomentAccumulator
from .layers.adapters import install_factors, layer_view, weight_matrix
from .modules import set_submodule
from .policies import LayerCandidate


@dataclasses.dataclass
class LayerReport:
    """One layer's change. Ranks are None for a dense layer; multiply-adds are per sample;
    ``*_dense`` are the sizes of the original dense layer."""

    name: str
    kind: str
    shape: tuple[int, int]
    old_rank: Optional[int]
    new_rank: Optional[int]
    nmse: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    params_dense: int
    macs_dense: int
    samples: int

    @property
    def changed(self) -> bool:
        return self.new_rank != self.old_rank


def build_candidates(
    layers: Mapping[str, nn.Module],
    stats: Mapping[str, MomentAccumulator],
    positions: Optional[Mapping[str, float]] = None,
    regularization: float = 0.0,
    progress=None,
) -> dict[str, LayerCandidate]:
    """Solves every layer exactly (all ranks at once). Errors name the layer."""
    out = {}
    for i, (name, module) in enumerate(layers.items()):
        if progress is not None:
            progress(i, len(layers), name)
        try:
            stats[name].check(f"inputs of layer '{name}'")
            w, b = weight_matrix(module)
            dec = decompose(stats[name], w, b, regularization)
        except ValueError as err:
            raise ValueError(f"cannot factorize layer '{name}': {err}") from err
        out[name] = LayerCandidate(
            layer_view(module), dec, float((positions or {}).get(name, 1.0)), samples=stats[name].num_samples
        )
    return out


def apply_ranks(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    candidates: Mapping[str, LayerCandidate],
    ranks: Mapping[str, Optional[int]],
) -> list[LayerReport]:
    """Installs the chosen ranks (None: unchanged) and returns one report per layer."""
    reports = []
    for name, module in layers.items():
        c = candidates[name]
        view, rank = c.view, ranks.get(name)
        new_module = module
        nmse = 0.0
        if rank is not None:
            wa, wb, bias = c.decomposition.factors(rank)
            nmse = float(c.decomposition.nmse_curve[rank])
            new_module = install_factors(module, wa, wb, bias)
            if new_module is not module:
                set_submodule(model, name, new_module)
        new_rank = view.rank if rank is None else rank
        reports.append(
            LayerReport(
                name=name,
                kind=type(module).__name__,
                shape=(view.in_dim, view.out_dim),
                old_rank=view.rank,
                new_rank=new_rank,
                nmse=nmse,
                params_before=view.params(view.rank),
                params_after=view.params(new_rank),
                macs_before=round(view.params(view.rank) * c.positions),
                macs_after=round(view.params(new_rank) * c.positions),
                params_dense=view.params(None),
                macs_dense=round(view.params(None) * c.positions),
                samples=c.samples,
            )
        )
    return reports


def format_reports(reports: list[LayerReport]) -> str:
    """A plain-text table of the reports plus totals."""
    head = f"{'layer':<28} {'shape':>11} {'rank':>11} {'nmse':>8} {'params':>17}"
    lines = [head, "-" * len(head)]
    for r in reports:
        old = "dense" if r.old_rank is None else str(r.old_rank)
        new = "dense" if r.new_rank is None else str(r.new_rank)
        lines.append(
            f"{r.name[:28]:<28} {f'{r.shape[0]}x{r.shape[1]}':>11} {f'{old}->{new}':>11} {r.nmse:>8.4f} "
            f"{f'{r.params_before}->{r.params_after}':>17}"
        )
    dense = sum(r.params_dense for r in reports) or 1
    macs_dense = sum(r.macs_dense for r in reports) or 1
    after = sum(r.params_after for r in reports)
    macs_after = sum(r.macs_after for r in reports)
    lines.append(
        f"kept {after / dense:.1%} of the targeted layers' dense weights and "
        f"{macs_after / macs_dense:.1%} of their dense multiply-adds"
    )
    return "\n".join(lines)
