"""The mechanics of one milestone (kept out of the engine, which decides when): the plan of
collection passes under ``Statistics.max_bytes``, the calibration pass over the evaluation batches,
the solve pass by pass (statistics summed over the processes), the output probe of a
``ParamBudget``, and the milestone's history entry, metrics and log lines. Each function takes the
``Host``, the model and the settings explicitly.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from ..surgery.calling import InputFn, evaluating
from ..surgery.pipeline import Selection, collect_with
from ..surgery.ranks.sensitivity import OutputProbe
from ..surgery.report.blame import naming_failures
from ..surgery.report.reports import LayerReport, format_reports, milestone_metrics
from ..surgery.specs import Statistics
from ..surgery.statistics.collector import ActivationCollector
from ..surgery.statistics.passes import PassResults, collect_in_passes, plan_passes, solve_pass
from ..surgery.timing.model_speed import ModelSpeedCheck
from .distributed import reduce_statistics
from .host import Host
from .output_shift import OutputShift, first_batches
from .schedule import Mode, ScheduleValue, describe, plain_value


def _single(host: Optional[Host]) -> bool:
    """Held-out halves are kept on one process only."""
    return host is None or host.world_size == 1


def new_collector(
    host: Optional[Host],
    model: nn.Module,
    selection: Selection,
    statistics: Statistics,
    batch_limits: list,
    names: Optional[list[str]] = None,
) -> ActivationCollector:
    """A collector (of layers ``names``, default all) for a run over loaders of ``batch_limits``
    batches (inf where unknown)."""
    finite = [n for n in batch_limits if n < float("inf")]
    return collect_with(
        model, selection, statistics, expected_batches=int(sum(finite)) or None, holdout=_single(host), names=names,
    )


def plan(
    host: Optional[Host],
    layers: Mapping[str, torch.nn.Module],
    statistics: Statistics,
    factorized: bool = False,
) -> list[list[str]]:
    """The layers of each collection pass under ``statistics.max_bytes`` (one pass without it);
    ``factorized``: with the layers' bounds once they are pairs (the check at setup)."""
    return plan_passes(
        layers, statistics.max_bytes, space=statistics.space, holdout=_single(host), factorized=factorized
    )


def calibrate(
    host: Host,
    model: nn.Module,
    selection: Selection,
    statistics: Statistics,
    names: Optional[list[str]] = None,
) -> ActivationCollector:
    """Runs the evaluation batches through the host's evaluation step (logging silenced, no grad,
    metric states kept), collecting the statistics of layers ``names`` (default: all)."""
    loaders, limits = host.evaluation_loaders()
    collector = new_collector(host, model, selection, statistics, limits, names)
    with evaluating(model), collector, host.quiet(), naming_failures(model, "a validation batch"):
        for dl_idx, (loader, limit) in enumerate(zip(loaders, limits, strict=True)):
            for i, batch in enumerate(loader):
                if i >= limit:
                    break
                batch = host.to_device(batch, dl_idx)
                with host.eval_context():
                    host.evaluation_step(batch, i, dl_idx, len(loaders))
                if collector.max_samples is not None and min(collector.samples().values()) >= collector.max_samples:
                    break
    return collector


def solve_in_passes(
    host: Host,
    model: nn.Module,
    selection: Selection,
    statistics: Statistics,
    groups: list[list[str]],
    first: Optional[ActivationCollector],
    regularization: float,
    shard: bool,
    leave_out_silent: Callable[[list[str]], None],
) -> tuple[PassResults, str]:
    """Every layer solved from its statistics, one pass (group of layers ``groups``) at a time.
    The first pass's statistics are those of ``first`` (the last validation run's, when no
    optimizer step followed it) or else of a calibration pass now; further passes run the
    validation batches again (``calibrate``) with the RNG left as it was. ``leave_out_silent``
    gets the layers a pass never saw called. Returns the results and where the first pass's
    statistics came from (``"validation"`` or ``"calibration"``)."""
    pending = [first] if first is not None else []
    source = "validation" if pending else "calibration"
    progress = _progress_printer(host) if len(selection.layers) >= 8 else None

    def collect(i: int, names: list[str]) -> ActivationCollector:
        if pending:
            return pending.pop()  # (popped: its statistics go with the pass)
        if i == 0:
            return calibrate(host, model, selection, statistics, names)
        with torch.random.fork_rng(devices=[]):  # another pass must not move the training run's RNG
            return calibrate(host, model, selection, statistics, names)

    def solve(collector: ActivationCollector, names: list[str], sharding: Optional[Any]) -> dict:
        return solve_pass(
            model, collector, names, selection.layers, leave_out_silent, regularization, progress, sharding
        )

    loads: list[float] = []  # solve work per rank over the passes: owners balanced over all of them
    reduce = lambda c: reduce_statistics(host, c, shard, loads)  # noqa: E731
    return collect_in_passes(groups, collect, solve, reduce), source


def output_measures(
    host: Host,
    model: nn.Module,
    layers: Mapping[str, torch.nn.Module],
    output_batches: int,
    probe_batches: int,
    input_fn: Optional[InputFn],
) -> tuple[list, Optional[OutputShift], Optional[OutputProbe]]:
    """One fetch of the first validation batches serves both measurements of the network's output:
    the shift a milestone causes (``OutputShift`` on ``output_batches`` of them: its outputs before
    the swap are taken now) and the probe judging a policy's choices (``OutputProbe`` on
    ``probe_batches``); 0 switches either off. Returns the batches, the shift and the probe."""
    need = max(output_batches, probe_batches)
    batches = first_batches(host, need) if need else []
    shift = OutputShift(host, model, batches[:output_batches], input_fn) if output_batches else None
    probe = None
    if probe_batches:
        probe = OutputProbe(model, layers, batches[:probe_batches], input_fn, context=host.eval_context)
    return batches, shift, probe


def milestone_entry(
    epoch: int,
    milestone: int,
    value: ScheduleValue,
    reports: list[LayerReport],
    source: str,
    skipped: Mapping[str, str],
    global_step: int,
) -> dict[str, Any]:
    """The ``history`` entry of a milestone (key ``milestone``: an epoch, or a step with
    ``interval="step"``) applied in ``epoch`` at optimizer step ``global_step`` (plain data)."""
    return {
        "epoch": epoch,
        "global_step": global_step,
        "milestone": milestone,
        "value": plain_value(value),
        "ranks": {r.name: r.new_rank for r in reports},
        "nmse": {r.name: r.nmse for r in reports},
        "samples": {r.name: r.samples for r in reports},
        "speedup": {r.name: r.speedup for r in reports if r.speedup is not None},
        "notes": {**{r.name: r.note for r in reports if r.note}, **skipped},
        "statistics": source,
        "event": "milestone",
    }


def log_milestone(
    host: Host,
    reports: list[LayerReport],
    table: list[LayerReport],
    value: ScheduleValue,
    mode: Mode,
    verbose: bool,
) -> None:
    """The milestone's per-layer metrics, and its summary table on rank zero when ``verbose``."""
    host.log(milestone_metrics(reports))
    if verbose:
        host.info(
            f"LowRankFactorization, epoch {host.epoch}, step {host.global_step} "
            f"({describe(value, mode)}):\n" + format_reports(table)
        )


def record_costs(
    entry: dict[str, Any],
    host: Host,
    solved: PassResults,
    speed: Optional[Any],
    shift: Optional[OutputShift],
    verbose: bool,
) -> None:
    """What the milestone cost and measured, into its history ``entry`` (and logged)."""
    entry["statistics_bytes"] = max(solved.peak_bytes, default=0)  # peak float64 statistics, this process
    entry["statistics_bytes_reduced"] = max(solved.held_bytes, default=0)
    entry["statistics_passes"] = solved.passes
    sharding = solved.sharding
    if sharding is not None:
        entry.update(
            solve_seconds=sharding.solve_seconds, solve_cpu_seconds=sharding.solve_cpu_seconds,
            owners=dict(sharding.owners),
        )
    if isinstance(speed, ModelSpeedCheck) and speed.result is not None:  # the whole model's ratio
        entry.update(speedup_model=speed.result.speedup, speed_trials=speed.result.history())
        host.log({"factorize/speedup": speed.result.speedup})
        if verbose:
            host.info(f"LowRankFactorization: {speed.result.describe()}")
    if shift is not None:  # every rank: the metric's compute() is a collective under DDP
        entry.update(output_nmse=shift.after(), output_nmse_seconds=shift.seconds)
        host.log({"factorize/output_nmse": entry["output_nmse"]})


def _progress_printer(host: Host) -> Callable[[int, int, str], None]:
    def progress(i: int, n: int, name: str) -> None:
        host.info(f"LowRankFactorization: solving layer {i + 1}/{n} ({name})")

    return progress
