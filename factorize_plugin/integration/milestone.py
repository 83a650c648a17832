"""The mechanics of one milestone of ``LowRankFactorization`` (kept out of the hooks, which only
decide when and where): the plan of collection passes under ``max_statistics_bytes``, the
calibration pass over the validation batches, the solve pass by pass (statistics summed over the
DDP ranks), the output probe of a ``ParamBudget``, and the milestone's history entry, metrics and
log lines. Each function takes the trainer, the module and the callback's settings explicitly.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ..surgery.blame import naming_failures
from ..surgery.calling import InputFn, evaluating
from ..surgery.collector import ActivationCollector
from ..surgery.model_speed import ModelSpeedCheck
from ..surgery.passes import PassResults, collect_in_passes, plan_passes, solve_pass
from ..surgery.pipeline import Selection, TargetSpec, collect_with
from ..surgery.reports import LayerReport, format_reports, milestone_metrics
from ..surgery.sensitivity import OutputProbe
from .distributed import reduce_statistics
from .lightning_internals import first_validation_batches, preserved_metric_states, silenced_logging, validation_loaders
from .output_shift import OutputShift
from .schedule import Mode, ScheduleValue, describe, plain_value


def _single(trainer: Optional[Trainer]) -> bool:
    """Held-out halves are kept on one process only."""
    return trainer is None or trainer.world_size == 1


def new_collector(
    trainer: Optional[Trainer],
    pl_module: LightningModule,
    selection: Selection,
    spec: TargetSpec,
    batch_limits: list,
    names: Optional[list[str]] = None,
) -> ActivationCollector:
    """A collector (of layers ``names``, default all) for a run over loaders of ``batch_limits``
    batches (inf where unknown)."""
    finite = [n for n in batch_limits if n < float("inf")]
    return collect_with(
        pl_module, selection, spec, expected_batches=int(sum(finite)) or None, holdout=_single(trainer), names=names,
    )


def plan(
    trainer: Optional[Trainer],
    layers: Mapping[str, torch.nn.Module],
    max_statistics_bytes: Optional[int],
    factorized: bool = False,
) -> list[list[str]]:
    """The layers of each collection pass under ``max_statistics_bytes`` (one pass without it);
    ``factorized``: with the layers' bounds once they are pairs (the check at setup)."""
    return plan_passes(layers, max_statistics_bytes, space="auto", holdout=_single(trainer), factorized=factorized)


def calibrate(
    trainer: Trainer,
    pl_module: LightningModule,
    selection: Selection,
    spec: TargetSpec,
    names: Optional[list[str]] = None,
) -> ActivationCollector:
    """Runs the validation batches through ``validation_step`` (no logging, no grad, metric states
    kept), collecting the statistics of layers ``names`` (default: all)."""
    loaders, limits = validation_loaders(trainer)
    collector = new_collector(trainer, pl_module, selection, spec, limits, names)
    with evaluating(pl_module), collector, silenced_logging(pl_module), preserved_metric_states(pl_module), \
            naming_failures(pl_module, "a validation batch"):
        for dl_idx, (loader, limit) in enumerate(zip(loaders, limits, strict=True)):
            extra = {"dataloader_idx": dl_idx} if len(loaders) > 1 else {}
            for i, batch in enumerate(loader):
                if i >= limit:
                    break
                batch = trainer.strategy.batch_to_device(batch, dataloader_idx=dl_idx)
                with trainer.precision_plugin.val_step_context():
                    pl_module.validation_step(batch, i, **extra)
                if spec.max_samples is not None and min(collector.samples().values()) >= spec.max_samples:
                    break
    return collector


def solve_in_passes(
    trainer: Trainer,
    pl_module: LightningModule,
    selection: Selection,
    spec: TargetSpec,
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
    progress = _progress_printer(trainer) if len(selection.layers) >= 8 else None

    def collect(i: int, names: list[str]) -> ActivationCollector:
        if pending:
            return pending.pop()  # (popped: its statistics go with the pass)
        if i == 0:
            return calibrate(trainer, pl_module, selection, spec, names)
        with torch.random.fork_rng(devices=[]):  # another pass must not move the training run's RNG
            return calibrate(trainer, pl_module, selection, spec, names)

    def solve(collector: ActivationCollector, names: list[str], sharding: Optional[Any]) -> dict:
        return solve_pass(
            pl_module, collector, names, selection.layers, leave_out_silent, regularization, progress, sharding
        )

    loads: list[float] = []  # solve work per rank over the passes: owners balanced over all of them
    reduce = lambda c: reduce_statistics(trainer, c, shard, loads)  # noqa: E731
    return collect_in_passes(groups, collect, solve, reduce), source


def output_measures(
    trainer: Trainer,
    pl_module: LightningModule,
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
    batches = first_validation_batches(trainer, need) if need else []
    shift = OutputShift(trainer, pl_module, batches[:output_batches], input_fn) if output_batches else None
    probe = None
    if probe_batches:
        context = trainer.precision_plugin.val_step_context
        probe = OutputProbe(pl_module, layers, batches[:probe_batches], input_fn, context=context)
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
    trainer: Trainer,
    pl_module: LightningModule,
    reports: list[LayerReport],
    table: list[LayerReport],
    value: ScheduleValue,
    mode: Mode,
    verbose: bool,
) -> None:
    """The milestone's per-layer metrics, and its summary table on rank zero when ``verbose``."""
    pl_module.log_dict(
        milestone_metrics(reports), on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1
    )  # identical on every rank; sync_dist only keeps Lightning from warning about epoch-level logs
    if verbose:
        rank_zero_info(
            f"LowRankFactorization, epoch {trainer.current_epoch}, step {trainer.global_step} "
            f"({describe(value, mode)}):\n" + format_reports(table)
        )


def record_costs(
    entry: dict[str, Any],
    trainer: Trainer,
    pl_module: LightningModule,
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
    sync = trainer.world_size > 1
    if isinstance(speed, ModelSpeedCheck) and speed.result is not None:  # the whole model's ratio
        entry.update(speedup_model=speed.result.speedup, speed_trials=speed.result.history())
        pl_module.log("factorize/speedup", speed.result.speedup, on_step=False, on_epoch=True, sync_dist=sync)
        if verbose:
            rank_zero_info(f"LowRankFactorization: {speed.result.describe()}")
    if shift is not None:  # every rank: the metric's compute() is a collective under DDP
        entry.update(output_nmse=shift.after(), output_nmse_seconds=shift.seconds)
        pl_module.log("factorize/output_nmse", entry["output_nmse"], on_step=False, on_epoch=True, sync_dist=sync)


def _progress_printer(trainer: Trainer) -> Callable[[int, int, str], None]:
    def progress(i: int, n: int, name: str) -> None:
        if trainer.is_global_zero:
            rank_zero_info(f"LowRankFactorization: solving layer {i + 1}/{n} ({name})")

    return progress
