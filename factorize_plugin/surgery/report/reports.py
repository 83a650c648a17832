"""What a refactorization changed, one report per layer, and a plain-text table of them."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, cast

from ...layers.adapters import LayerView


@dataclasses.dataclass
class LayerReport:
    """One layer's change. Ranks are None for a dense layer; multiply-adds are per sample;
    ``*_dense`` are the sizes of the original dense layer; ``nmse`` is the fit's error on the
    collected statistics (0 if unchanged); ``note`` says why a layer was left alone, if it was.
    Where a speed guard timed the layer: ``dense_seconds`` / ``pair_seconds``, one step of the
    dense layer and of the pair at ``measured_rank`` (``speedup`` = their ratio)."""

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
    note: str = ""
    dense_seconds: Optional[float] = None
    pair_seconds: Optional[float] = None
    measured_rank: Optional[int] = None
    heldout_nmse: Optional[float] = None  # NMSE on held-out rows (small sets only, see surgery.holdout)

    @property
    def speedup(self) -> Optional[float]:
        """Measured dense time / pair time at ``measured_rank`` (None: not measured)."""
        if self.dense_seconds is None or self.pair_seconds is None:
            return None
        return self.dense_seconds / self.pair_seconds

    @property
    def changed(self) -> bool:
        return self.new_rank != self.old_rank

    @classmethod
    def of(
        cls, name: str, kind: str, view: LayerView, new_rank: Optional[int], nmse: float, positions: float, samples: int
    ) -> "LayerReport":
        return cls(
            name=name, kind=kind, shape=(view.in_dim, view.out_dim), old_rank=view.rank, new_rank=new_rank, nmse=nmse,
            params_before=view.params(view.rank), params_after=view.params(new_rank),
            macs_before=round(view.params(view.rank) * positions), macs_after=round(view.params(new_rank) * positions),
            params_dense=view.params(None), macs_dense=round(view.params(None) * positions), samples=samples,
        )


class Reports(list):
    """``factorize_model``'s reports (a list of ``LayerReport``) with ``statistics_bytes``: the
    peak bytes of the float64 statistics collected for them (``ActivationCollector.statistics_bytes``,
    the largest over the collection passes), and ``statistics_passes``: how many passes over the
    calibration data collected them (``Statistics.max_bytes``)."""

    def __init__(
        self, reports: Sequence[LayerReport] = (), statistics_bytes: int = 0, statistics_passes: int = 1
    ) -> None:
        super().__init__(reports)
        self.statistics_bytes = statistics_bytes
        self.statistics_passes = statistics_passes


def format_reports(reports: Sequence[LayerReport]) -> str:
    """A plain-text table of the reports plus totals against the dense layers."""
    head = f"{'layer':<28} {'shape':>11} {'rank':>11} {'nmse':>8} {'params':>17}"
    lines = [head, "-" * len(head)]
    for r in reports:
        old = "dense" if r.old_rank is None else str(r.old_rank)
        new = "dense" if r.new_rank is None else str(r.new_rank)
        line = (
            f"{r.name[:28]:<28} {f'{r.shape[0]}x{r.shape[1]}':>11} {f'{old}->{new}':>11} {r.nmse:>8.4f} "
            f"{f'{r.params_before}->{r.params_after}':>17}"
        )
        lines.append(line + (f"  ({r.note})" if r.note else ""))
    dense = sum(r.params_dense for r in reports) or 1
    macs_dense = sum(r.macs_dense for r in reports) or 1
    after = sum(r.params_after for r in reports)
    macs_after = sum(r.macs_after for r in reports)
    lines.append(
        f"kept {after / dense:.1%} of the targeted layers' dense weights and {macs_after / macs_dense:.1%} of their "
        "dense multiply-adds"
    )
    speed = measured_speedup(reports)
    if speed is not None:
        lines.append(
            f"the changed layers measured {speed:.2f}x the speed of their dense versions (speed guard timings)"
        )
    return "\n".join(lines)


def measured_speedup(reports: Sequence[LayerReport]) -> Optional[float]:
    """Total dense time / total pair time of the layers changed and timed at their new rank
    (None if none was): the wall-clock counterpart of the multiply-adds kept."""
    timed = [r for r in reports if r.changed and r.speedup is not None and r.measured_rank == r.new_rank]
    if not timed:
        return None
    # speedup is not None: both times are set
    return sum(cast(float, r.dense_seconds) for r in timed) / sum(cast(float, r.pair_seconds) for r in timed)


def milestone_metrics(reports: Sequence[LayerReport]) -> dict[str, float]:
    """What a milestone logs: per layer ``factorize/<name>/nmse`` and ``/rank`` (min(shape) when
    dense), ``factorize/mean_nmse`` of the changed layers, ``params_kept`` / ``macs_kept`` of the
    reported layers' dense sizes, and ``speedup`` where layers were timed."""
    metrics: dict[str, float] = {}
    for r in reports:
        metrics[f"factorize/{r.name}/nmse"] = r.nmse
        metrics[f"factorize/{r.name}/rank"] = float(r.new_rank if r.new_rank is not None else min(r.shape))
    changed = [r.nmse for r in reports if r.changed] or [0.0]
    metrics["factorize/mean_nmse"] = sum(changed) / len(changed)
    params_dense = sum(r.params_dense for r in reports)
    metrics["factorize/params_kept"] = sum(r.params_after for r in reports) / max(1, params_dense)
    metrics["factorize/macs_kept"] = sum(r.macs_after for r in reports) / max(1, sum(r.macs_dense for r in reports))
    speed = measured_speedup(reports)
    if speed is not None:
        metrics["factorize/speedup"] = speed  # wall-clock of the changed layers, dense / factorized
    return metrics
