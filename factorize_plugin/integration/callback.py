"""The Lightning callback: progressive low-rank factorization during training.

It owns no math and no model surgery. Its hooks decide *when* (milestones, which validation run's
statistics) and *where* (which layers, which process): they collect statistics
(``ActivationCollector``), sum them over the DDP ranks (``distributed.py``), call the one
transaction ``refactorize`` (solve, choose ranks, swap, edit the optimizers), rebuild the DDP
wrapper, log, and checkpoint the callback's own state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ..surgery import settings
from ..surgery.blame import naming_failures
from ..surgery.calling import InputFn, evaluating
from ..surgery.checkpoint import enable_factorized_loading, loading_enabled
from ..surgery.collector import ActivationCollector
from ..surgery.model_speed import ModelSpeedCheck
from ..surgery.optim import check_parameter_caches, param_group_names, restore_param_group_order
from ..surgery.passes import PassResults, collect_in_passes, plan_passes
from ..surgery.pipeline import Selection, TargetSpec, collect_with, finish, leave_out_silent, prepare
from ..surgery.preflight import check_not_meta
from ..surgery.refactorize import build_candidates, refactorize
from ..surgery.reports import LayerReport, format_reports, milestone_metrics
from ..surgery.sensitivity import OutputProbe
from ..surgery.sharing import CallCounter
from ..surgery.speed import InputRecorder, LayerInput, SpeedCheck, SpeedGuard, resolve_guard
from .auto_schedule import Readiness, read_any_schedule
from .callback_state import STATE_VERSION, migrate_state, plain
from .distributed import reduce_statistics
from .lightning_internals import (
    check_strategy,
    first_validation_batches,
    preserved_metric_states,
    rewrap_ddp,
    silenced_logging,
    start_method,
    validation_loaders,
)
from .schedule import Mode, ScheduleValue, describe, plain_value
from .speed_step import model_speed_check
from .workflow import OutputShift, check_callbacks, check_resumed_targets, check_validation, output_measurable


class LowRankFactorization(Callback):
    """Factorizes (and then re-factorizes at lower ranks) Linear/Conv2d layers during ``fit``.

    Args:
        schedule: ``{epoch: value}``. From the start of ``epoch`` (0-based, as
            ``trainer.current_epoch``) the chosen layers run at the new rank, fitted to the inputs
            they saw during the validation run just before that epoch (key 0: a calibration pass over
            validation batches before training starts). A value is a ``RankPolicy``
            (``FixedRank(16)``, ``MaxNMSE(0.05)``, ``ParamBudget(0.3)``; in YAML a ``class_path`` /
            ``init_args`` mapping) or a scalar read by ``mode``. With ``mode="rank"`` a scalar is an
            int rank or a float in (0, 1) = fraction of each original layer's min(in, out) (the
            model-level meaning of a fraction, as in ``factorize_model``; the core
            ``factorize_matrix`` follows the reference implementation's instead). Or ``"auto"``:
            one switch to ``target``, at the epoch after the validation run where every targeted
            layer's stable rank has settled (``Readiness``; see ``integration/auto_schedule.py``).
        target: with ``schedule="auto"`` only: a ``RankPolicy`` or a scalar read by ``mode``
            (default ``ParamBudget(0.5, metric="macs")``: keep half the targeted multiply-adds).
        readiness: with ``schedule="auto"`` only: when to switch (default ``Readiness()``). Each
            validation run of ``fit`` appends ``{"event": "watch", ...}`` to ``history`` (stable
            ranks, ``stable_rank_change``, ``ready``, ``reason``, ``watch_cost`` = signal seconds /
            validation seconds) and logs ``factorize/ready``, ``factorize/stable_rank_change``,
            ``factorize/watch_cost``, ``factorize/<layer>/stable_rank``.
        mode: how scalar schedule values are read: ``"rank"``, ``"max_nmse"`` (per layer, the
            smallest rank whose NMSE is at most the value) or ``"param_budget"`` (keep that fraction
            of the targeted layers' original dense weights in total, allocated across layers).
        targets / exclude / min_params / min_features / max_samples / sample_fraction: the
            ``TargetSpec`` (``surgery/pipeline.py``) shared with ``factorize_model``: the same
            layers by default; the statistics defaults here subsample (collected at every milestone,
            on a validation set that may be large), ``factorize_model``'s keep every row.
        targets: fnmatch patterns over qualified module names of the layers to factorize, e.g.
            ``["encoder.*.fc?"]`` (default: every Linear and Conv2d passing ``min_params`` and
            ``min_features``); a single string is one pattern; each must match some module.
        exclude: fnmatch patterns of module names to leave dense (a pattern matching nothing
            warns); a single string is one pattern.
        min_params: skip layers with fewer weights than this. Layers whose rank would not save
            multiply-adds stay dense.
        min_features: skip layers whose min(in, out) features is smaller (C_in * k_h * k_w and
            C_out for a convolution; by default a 10-class head is left alone).
        max_samples: cap on rows (tokens / output pixels) of statistics per layer and milestone.
        sample_fraction: share of each validation batch's rows used for statistics; ``"auto"`` keeps
            their cost near 5% of the layer's forward cost, with at least 2x the statistics' width
            in rows, drawn evenly over the run's batches (see ``ActivationCollector``).
        budget_batches: validation batches on which a ``ParamBudget`` measures each layer's effect
            on the network's output; 0 allocates by the layers' NMSE alone (needed for a module
            without ``forward``: otherwise refused before training).
        input_fn: turns a validation batch into the model's input for those measurements (default:
            the first element of a tuple/list batch, a dict as keyword arguments, else the batch).
        regularization: >= 0; moves the fit toward the plain SVD of the weights (few samples).
        name: distinguishes two instances in a checkpoint (their ``state_key``); default: derived
            from ``targets`` and ``exclude``, never from the schedule, so a schedule can be edited
            between a run and its resume.
        verbose: print a summary table on rank zero after each milestone.
        speed_guard: True (default): ``SpeedGuard(scope="model")``: after the ranks are chosen and
            agreed, the model's own training step (``training_step`` forward + backward on the
            first training batch of the epoch before the milestone, a validation batch where there
            is none, under the trainer's precision context and device, plus the optimizer's step
            on copies of the optimizers) is timed with today's structure and with the candidate
            one; the candidates saving the fewest multiply-adds are dropped (a bisection) until the
            whole step is ``margin`` (1.15) x as fast as today's, or none remain. Weights,
            ``.grad``, buffers (BatchNorm statistics), the RNG streams, torchmetrics states and the
            optimizers' state are left bit-identical; logging is silenced meanwhile. Under DDP rank
            0 measures (on the LightningModule, outside the DDP wrapper: no collective) and every
            rank applies its decision. ``factorize/speedup`` logs the whole-model ratio of the
            applied structure to the one before (1.0: nothing changed), also in
            ``history[-1]["speedup_model"]`` with each timing in ``"speed_trials"``; a dropped
            layer's note says why. ``SpeedGuard(scope="layer")`` times each layer alone instead
            (dense layer vs pair, forward + backward + the optimizer's step, on the inputs of a
            training batch) and keeps a layer dense unless its pair is ``margin`` x as fast; a
            ``ParamBudget`` then spends its budget only on ranks it allows, and ``history``'s
            ``"speedup"`` holds each layer's ratio. Manual optimization uses the per-layer scope
            (its ``training_step`` steps the real optimizers). False switches the guard off: the
            same structure on every machine, at the risk of a model that runs slower than dense.
        output_batches: validation batches (of the first loader) run before and after each
            milestone's swap to measure how much the network's output moved: logged as
            ``factorize/output_nmse`` = sum (after - before)^2 / sum (before - mean before)^2 over
            the outputs (logits), summed over all ranks under DDP (a torchmetrics ``Metric``);
            costs 2 forward passes per batch per milestone. 0 switches it off. A module without
            ``forward`` (all logic in the steps) cannot be measured: skipped, with a warning.
        max_statistics_bytes: a budget in bytes for the float64 statistics a process holds at once.
            When those of every targeted layer would exceed it (``passes.statistics_bound``, from
            the shapes: shared inputs counted per layer, held-out halves 3x on one process), they
            are collected in several passes over the validation batches, one group of consecutive
            layers per pass, each group solved (reduced to its owners under DDP) and its
            statistics dropped before the next: the validation run before the milestone collects
            the first group; each further group runs the validation batches through
            ``validation_step`` again at the milestone (as a calibration pass: eval mode, no grad,
            the trainer's precision, logging silenced, metric states and the RNG left as they
            were). The factors are those of one pass, given a validation loader that yields the
            same batches each time (no shuffling). A layer alone over the budget is refused at
            setup. None (default): one pass.

    Behaviour worth knowing:

    * Statistics are collected only during the validation run(s) of the epoch before a milestone
      (the last run wins, e.g. with ``val_check_interval=0.5``), never during the sanity check or
      ``trainer.validate``. Without such a run after the epoch's last optimizer step (key 0,
      ``check_val_every_n_epoch > 1``, a validation run that training steps followed, a resumed
      run) the callback runs the validation batches itself before the swap (``validation_step``
      with logging silenced and torchmetrics states left as they were); ``history`` records which.
    * The swap happens in ``on_train_epoch_start``: no forward or backward is in flight and
      gradient accumulation is at a boundary. If solving or swapping fails, the model and the
      optimizers are left as they were before the milestone.
    * Optimizer: the same optimizer and LR-scheduler objects continue (the schedule goes on); a
      new parameter takes the param group and place of the one it replaces and starts with empty
      state (Adam moments at zero); the old parameters' state is dropped; untouched parameters
      keep theirs.
    * DDP (``strategy="ddp"``, multi-node included: nothing assumes one machine): each layer's
      statistics are summed over all ranks into one owner rank (``torch.distributed.reduce``, in
      name order; owners chosen from the layers' shapes to balance the solve work), which alone
      solves it; the NMSE curves are gathered to every rank, every rank chooses the same ranks
      (rank 0's are broadcast), and the factors at those ranks are broadcast from their owners, so
      every rank installs the same factors, fitted to the union of all ranks' validation data
      (``surgery/sharding.py``). A ``ParamBudget`` with an output probe (``budget_batches > 0``)
      runs the model at trial ranks: there the statistics are all-reduced and every rank solves
      every layer. The ``DistributedDataParallel`` wrapper is then rebuilt. ``ddp_spawn`` (and other start
      methods that copy weights back into the main process) needs
      ``enable_factorized_loading(model)`` in the main process before ``fit``.
    * Checkpoints hold the factorized structure (in each pair's extra state), the callback's own
      state (milestones done, ranks, history) and the optimizer's param groups by name:
      ``trainer.fit(fresh_dense_model, ckpt_path=...)`` rebuilds the structure before the weights
      load, puts the optimizer state on the right parameters and neither repeats nor skips a
      milestone. A milestone that was missed (a run resumed past it) is applied at the next epoch
      start, with a warning. For inference use ``load_factorized_checkpoint(cls, path)``.
    * ``history``: one dict per applied milestone: ``epoch``, ``milestone``, ``value`` (a number, or
      a policy as its ``{"class_path": ..., "init_args": ...}``: plain data, so checkpoints load
      under torch's safe ``weights_only`` unpickler), ``ranks``
      and ``nmse`` and ``samples`` per layer, and ``statistics`` (``"validation"`` or
      ``"calibration"``: where the statistics came from), ``heldout_nmse`` per layer (small
      statistics only: a fit on half the rows measured on the other half; ``max_nmse`` uses the
      fitted ``nmse``), ``output_nmse`` and ``output_nmse_seconds`` (see ``output_batches``),
      ``statistics_bytes`` (peak bytes of this process's float64 statistics, an accumulator shared
      by layers reading the same input counted once) and ``statistics_bytes_reduced`` (those held
      after the DDP reduce: about 1/N of them on each of N ranks), each the largest over the
      collection passes, and ``statistics_passes`` (see ``max_statistics_bytes``); under DDP with owners also
      ``owners`` (layer -> rank that solved it), ``solve_seconds`` and ``solve_cpu_seconds`` (this
      rank's solving time: wall, and the process's CPU time).
    """

    STATE_VERSION = STATE_VERSION  # of ``state_dict``; ``load_state_dict`` migrates older ones

    def __init__(
        self,
        schedule: Union[dict[int, ScheduleValue], str],
        mode: Mode = "rank",
        targets: Optional[Union[str, list[str]]] = None,
        exclude: Optional[Union[str, list[str]]] = None,
        min_params: int = 1024,
        min_features: int = 32,
        max_samples: Optional[int] = 100_000,
        sample_fraction: Union[float, str] = "auto",
        budget_batches: int = 4,
        input_fn: Optional[Callable[[Any], Any]] = None,
        regularization: float = 0.0,
        name: Optional[str] = None,
        verbose: bool = True,
        speed_guard: Union[bool, SpeedGuard] = True,
        output_batches: int = 2,
        max_statistics_bytes: Optional[int] = None,
        target: Optional[ScheduleValue] = None,
        readiness: Optional[Readiness] = None,
    ) -> None:
        # every setting checked here, before any training (one shared checker per setting)
        self.schedule, self._policies, self._auto = read_any_schedule(schedule, mode, target, readiness)
        self.mode = mode
        self.output_batches = settings.check_whole("output_batches", output_batches, 0)
        self.speed_guard: Optional[SpeedGuard] = resolve_guard(speed_guard, "train", scope="model")
        self.spec = TargetSpec(targets, exclude, min_params, min_features, max_samples, sample_fraction)
        self.budget_batches = settings.check_whole("budget_batches", budget_batches, 0)
        self.input_fn: Optional[InputFn] = settings.check_callable("input_fn", input_fn)
        self.regularization = settings.check_regularization(regularization)
        self.name = settings.check_name(name)
        self.verbose = settings.check_flag("verbose", verbose)
        self.max_statistics_bytes = settings.check_max_statistics_bytes(max_statistics_bytes)
        # state (checkpointed)
        self.done: list[int] = []
        self.ranks: dict[str, Optional[int]] = {}
        self.history: list[dict[str, Any]] = []
        self._restored_groups: Optional[list[list[list[str]]]] = None
        # transient
        self._selection = Selection({})  # which layers (by name) and which were left out, with why
        self._collector: Optional[ActivationCollector] = None
        self._collected_for: Optional[int] = None
        self._collected_at_step: Optional[int] = None  # trainer.global_step when that run ended
        self._trainer: Optional[Trainer] = None
        self._pl_module: Optional[LightningModule] = None
        self._train_inputs: Optional[InputRecorder] = None  # first training batch's input per layer
        self._counter: Optional[CallCounter] = None  # calls per layer during the sanity check
        self._output_batches = output_batches  # 0 for a module without forward (see output_measurable)

    _train_batch: Optional[list] = None  # while watching: [] until the epoch's first training batch is kept

    targets = property(lambda self: self.spec.targets)
    exclude = property(lambda self: self.spec.exclude)
    min_params = property(lambda self: self.spec.min_params)
    min_features = property(lambda self: self.spec.min_features)
    max_samples = property(lambda self: self.spec.max_samples)
    sample_fraction = property(lambda self: self.spec.sample_fraction)
    skipped = property(lambda self: self._selection.skipped, doc="layers left out, with why (shown in the report)")
    _target_names = property(lambda self: list(self._selection.layers))

    @property
    @override
    def state_key(self) -> str:
        if self.name is not None:
            return self._generate_state_key(name=self.name)
        return self._generate_state_key(targets=self.targets, exclude=self.exclude)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            # validate/test/predict(ckpt_path=...) may load a checkpoint whose structure differs from
            # the live model's: rebuild it from the state dict before the weights load
            enable_factorized_loading(pl_module)
            return
        if self._pl_module is not None and pl_module is not self._pl_module and (self.done or self.history):
            rank_zero_info(
                f"LowRankFactorization: a new fit on another model ({type(pl_module).__name__}): the schedule starts "
                f"over (the previous fit's milestones {self.done} and history are dropped)"
            )
            self._reset_state()
        check_strategy(trainer.strategy)
        check_callbacks(trainer.callbacks)
        check_validation(trainer, pl_module)
        check_not_meta(pl_module, "LowRankFactorization")
        planned = self._policies if self._auto is None else {"auto": self._auto.target}
        measurable = output_measurable(pl_module, planned, self.budget_batches, self.output_batches)
        self._output_batches = self.output_batches if measurable else 0
        method = start_method(trainer.strategy)
        if method is not None and not loading_enabled(pl_module):
            raise RuntimeError(
                f"with strategy='ddp_{method}' Lightning copies the trained weights back into the main process's "
                "model, which stays dense unless it can rebuild the factorized structure: call "
                "factorize_plugin.enable_factorized_loading(model) on the model in the main process before "
                "trainer.fit (or use strategy='ddp')"
            )
        enable_factorized_loading(pl_module)  # a resumed checkpoint rebuilds the structure before weights load
        self._selection = prepare(pl_module, self.spec, {f"milestone {e}": p for e, p in planned.items()})
        self._trainer, self._pl_module = trainer, pl_module
        self._plan(pl_module, factorized=True)  # a layer over max_statistics_bytes (at any milestone): refused now
        for message in self._selection.advice:
            self._advise(message)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer, self._pl_module = trainer, pl_module
        for opt in trainer.optimizers:
            check_parameter_caches(opt)  # refused before training, not at the first milestone
        if self._restored_groups:
            self._restore_optimizer_order(trainer, pl_module)
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            late = [e for e in self.schedule if e >= trainer.max_epochs and e not in self.done]
            if late:
                rank_zero_warn(
                    f"LowRankFactorization: milestone(s) {late} are at or after max_epochs={trainer.max_epochs}: "
                    "they will not run"
                )

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking and trainer.state.fn == "fit" and self._counter is None:
            self._counter = CallCounter(self._layers(pl_module)).attach()  # finds never-called layers early
        if self._auto is not None and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._auto.before_validation(trainer, self._layers(pl_module), self.schedule, self._policies)
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self._due(trainer.current_epoch + 1):
            return
        self._drop_collector()
        # A fresh collector per validation run: the last run before the milestone wins. Projected
        # (x @ W) statistics are exact only while W stays as it was during the run: if an optimizer
        # step follows it, on_train_epoch_start sees global_step moved and collects again.
        first = self._plan(pl_module)[0]  # the validation run collects the first pass's layers
        self._collector = self._new_collector(pl_module, list(trainer.num_val_batches), first).attach()
        self._collected_for = trainer.current_epoch + 1

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counter is not None and self._counter.attached:
            self._counter.detach()
            self._leave_out_silent(pl_module, self._counter.silent(), "the sanity check")
        if self._collector is not None and self._collector.attached:
            self._collector.detach()
            self._collected_at_step = trainer.global_step
        if self._auto is not None:
            self._auto.after_validation(trainer, pl_module, self.history)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._train_batch is not None and not self._train_batch:
            self._train_batch.append(batch)  # on the device: the whole-model speed check's batch

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        due = self._due(epoch)
        if not due:
            self._watch_training_inputs(pl_module, epoch)
            return
        milestone = due[-1]
        if due != [epoch]:
            rank_zero_warn(
                f"LowRankFactorization: milestone(s) {due} were not applied when due (a run resumed past them?); "
                f"applying milestone {milestone} ({describe(self.schedule[milestone], self.mode)}) now, "
                f"at epoch {epoch}"
            )
        policy = self._policies[milestone]
        probing = policy.uses_probe and self.budget_batches > 0
        # DDP: each layer's statistics summed into one owner, which alone solves it; a probe runs the
        # model at trial ranks whose factors every rank would need: statistics all-reduced for it
        solved, source = self._solve_in_passes(trainer, pl_module, epoch, shard=not probing)
        layers = self._layers(pl_module)
        # one fetch of the first validation batches serves the budget probe and the output shift
        need = max(self._output_batches, self.budget_batches if probing else 0)
        batches = first_validation_batches(trainer, need) if need else []
        shift = (
            OutputShift(trainer, pl_module, batches[: self._output_batches], self.input_fn)
            if self._output_batches
            else None
        )
        speed = self._speed_check(trainer, pl_module, solved.inputs, batches)
        reports = refactorize(
            pl_module, layers, None, policy, optimizers=trainer.optimizers,
            probe=self._probe(trainer, pl_module, layers, batches[: self.budget_batches]) if probing else None,
            agree=(lambda r: trainer.strategy.broadcast(r, src=0)) if trainer.world_size > 1 else None,
            speed=speed, sharding=solved.sharding, candidates=solved.candidates,
        )
        rewrap_ddp(trainer)  # a collective under DDP: every rank gets here, whatever changed
        label = f"milestone {milestone} ({describe(self.schedule[milestone], self.mode)})"
        table, advice = finish(pl_module, self._selection, reports, solved.positions, label)
        self._record(trainer, pl_module, due, milestone, reports, source, table)
        self._record_costs(trainer, pl_module, solved, speed, shift)
        for message in advice:
            self._advise(message)
        self.history[-1]["heldout_nmse"] = {r.name: r.heldout_nmse for r in reports if r.heldout_nmse is not None}
        self._watch_training_inputs(pl_module, epoch)

    def _record_costs(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        solved: PassResults,
        speed: Optional[Any],
        shift: Optional[OutputShift],
    ) -> None:
        """What the milestone cost and measured, into the last history entry (and logged)."""
        entry = self.history[-1]
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
            if self.verbose:
                rank_zero_info(f"LowRankFactorization: {speed.result.describe()}")
        if shift is not None:  # every rank: the metric's compute() is a collective under DDP
            entry.update(output_nmse=shift.after(), output_nmse_seconds=shift.seconds)
            pl_module.log("factorize/output_nmse", entry["output_nmse"], on_step=False, on_epoch=True, sync_dist=sync)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drop_collector()
        self._drop_training_inputs()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._drop_collector()  # no hook stays attached to the model after a failed fit
        self._drop_training_inputs()
        if self._counter is not None:
            self._counter.detach()

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == "fit":
            check_resumed_targets(self.state_key, self._target_names, checkpoint)

    # ------------------------------------------------------- state and resume
    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data only (loadable with torch's safe ``weights_only`` unpickler), with a ``version``."""
        return {
            "version": STATE_VERSION,
            "done": list(self.done),
            "ranks": dict(self.ranks),
            "history": plain(self.history, "history"),
            "param_groups": self._param_groups_by_name(),
            "targets": list(self._target_names),
            "auto": None if self._auto is None else self._auto.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = migrate_state(state_dict)  # a state written by an earlier release, brought up to date
        self.done = list(state_dict.get("done", []))
        self.ranks = dict(state_dict.get("ranks", {}))
        self.history = list(state_dict.get("history", []))
        self._restored_groups = state_dict.get("param_groups")
        if self._auto is not None:
            self._auto.load_state_dict(state_dict.get("auto"))
            self._auto.restore(self.schedule, self._policies)

    # ---------------------------------------------------------------- helpers
    def _advise(self, message: Optional[str]) -> None:
        if message is not None:
            rank_zero_warn(f"LowRankFactorization: {message}")

    def _reset_state(self) -> None:
        self.done, self.ranks, self.history, self._restored_groups = [], {}, [], None
        if self._auto is not None:
            self.schedule, self._policies = {}, {}
            self._auto.reset()
        self._drop_collector()

    def _leave_out_silent(self, pl_module: LightningModule, silent: list[str], when: str) -> None:
        """Layers never called during ``when``: an error if named explicitly, else left out with a note."""
        notes = leave_out_silent(pl_module, self._selection, self.spec, silent, when)
        if notes:
            self._advise("leaving out " + "; ".join(f"layer '{n}' ({note})" for n, note in notes.items()))

    def _layers(self, pl_module: LightningModule) -> dict[str, torch.nn.Module]:
        return {name: pl_module.get_submodule(name) for name in self._target_names}

    def _due(self, epoch: int) -> list[int]:
        """Milestones in force at ``epoch`` that have not been applied yet (normally just ``epoch``)."""
        return [e for e in self.schedule if e <= epoch and e not in self.done]

    def _new_collector(
        self, pl_module: LightningModule, batch_limits: list, names: Optional[list[str]] = None
    ) -> ActivationCollector:
        """A collector (of layers ``names``, default all) for a run over loaders of ``batch_limits``
        batches (inf where unknown)."""
        single = self._trainer is None or self._trainer.world_size == 1  # held-out halves: one process only
        finite = [n for n in batch_limits if n < float("inf")]
        return collect_with(
            pl_module, self._selection, self.spec, expected_batches=int(sum(finite)) or None, holdout=single,
            names=names,
        )

    def _plan(self, pl_module: LightningModule, factorized: bool = False) -> list[list[str]]:
        """The layers of each collection pass under ``max_statistics_bytes`` (one pass without it);
        ``factorized``: with the layers' bounds once they are pairs (the check at setup)."""
        single = self._trainer is None or self._trainer.world_size == 1
        layers = self._layers(pl_module)
        return plan_passes(layers, self.max_statistics_bytes, space="auto", holdout=single, factorized=factorized)

    def _solve_in_passes(
        self, trainer: Trainer, pl_module: LightningModule, epoch: int, shard: bool
    ) -> tuple[PassResults, str]:
        """Every layer solved from its statistics, one pass (group of layers) at a time. The first
        pass's statistics are those of the last validation run before ``epoch`` if no optimizer
        step followed it (the same decision on every rank: same step), else those of a calibration
        pass now; further passes run the validation batches again (``_calibrate``)."""
        fresh = self._collected_for == epoch and self._collected_at_step == trainer.global_step
        groups = self._plan(pl_module)
        first = [self._collector] if fresh and list(self._collector.layers) == groups[0] else []
        self._collector, self._collected_for, self._collected_at_step = None, None, None
        source = "validation" if first else "calibration"
        progress = _progress_printer(trainer) if len(self._target_names) >= 8 else None

        def collect(i: int, names: list[str]) -> ActivationCollector:
            if first:
                return first.pop()  # (popped: its statistics go with the pass)
            if i == 0:
                return self._calibrate(trainer, pl_module, names)
            with torch.random.fork_rng(devices=[]):  # another pass must not move the training run's RNG
                return self._calibrate(trainer, pl_module, names)

        def solve(collector: ActivationCollector, names: list[str], sharding: Optional[Any]) -> dict:
            self._leave_out_silent(pl_module, [n for n, k in collector.samples().items() if k == 0], "validation")
            layers = {n: pl_module.get_submodule(n) for n in names if n in self._selection.layers}
            return build_candidates(
                layers, collector.stats, collector.positions, self.regularization, progress,
                collector.holdout.pairs(), sharding,  # no halves under DDP: the collector keeps none there
            )

        loads: list[float] = []  # solve work per rank over the passes: owners balanced over all of them
        reduce = lambda c: reduce_statistics(trainer, c, shard, loads)  # noqa: E731
        return collect_in_passes(groups, collect, solve, reduce), source

    def _calibrate(
        self, trainer: Trainer, pl_module: LightningModule, names: Optional[list[str]] = None
    ) -> ActivationCollector:
        """Runs the validation batches through ``validation_step`` (no logging, no grad, metric states
        kept), collecting the statistics of layers ``names`` (default: all)."""
        loaders, limits = validation_loaders(trainer)
        collector = self._new_collector(pl_module, limits, names)
        with evaluating(pl_module), collector, silenced_logging(pl_module), preserved_metric_states(pl_module), \
                naming_failures(pl_module, "a validation batch"):
            for dl_idx, (loader, limit) in enumerate(zip(loaders, limits)):
                extra = {"dataloader_idx": dl_idx} if len(loaders) > 1 else {}
                for i, batch in enumerate(loader):
                    if i >= limit:
                        break
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=dl_idx)
                    with trainer.precision_plugin.val_step_context():
                        pl_module.validation_step(batch, i, **extra)
                    if self.max_samples is not None and min(collector.samples().values()) >= self.max_samples:
                        break
        return collector

    def _watch_training_inputs(self, pl_module: LightningModule, epoch: int) -> None:
        """Before an epoch that precedes a milestone: keep its first training batch (whole-model
        scope) or record each layer's first training input (per-layer scope: a forward pre-hook
        that removes itself after one call) for the speed guard."""
        self._drop_training_inputs()
        if self.speed_guard is None or not self._due(epoch + 1):
            return
        if self._model_scope(pl_module):
            self._train_batch = []
        else:
            self._train_inputs = InputRecorder(self._layers(pl_module), training_only=True).attach()

    def _drop_training_inputs(self) -> None:
        if self._train_inputs is not None:
            self._train_inputs.detach()
        self._train_inputs, self._train_batch = None, None

    def _model_scope(self, pl_module: LightningModule) -> bool:
        """Whether the whole model's training step decides (manual optimization: its training_step
        steps the real optimizers, so layers are timed alone)."""
        return self.speed_guard is not None and self.speed_guard.scope != "layer" and pl_module.automatic_optimization

    def _speed_check(
        self, trainer: Trainer, pl_module: LightningModule, collected: Mapping[str, LayerInput], batches: list
    ) -> Optional[Union[SpeedCheck, ModelSpeedCheck]]:
        """The guard bound to this milestone (rank 0 measures under DDP). Whole-model scope: the
        training step on the epoch's first training batch, else on a validation batch. Per layer:
        training inputs where they were recorded, else the validation inputs at the training
        loader's batch size."""
        if self.speed_guard is None:
            return None
        if self._model_scope(pl_module):
            if self._train_batch:
                batch = self._train_batch[0]
            else:
                batch = batches[0] if batches else first_validation_batches(trainer, 1)[0]
            self._drop_training_inputs()
            return model_speed_check(trainer, pl_module, self.speed_guard, batch)
        seen = self._train_inputs.inputs if self._train_inputs is not None else {}
        self._drop_training_inputs()
        batch = getattr(trainer.train_dataloader, "batch_size", None) if trainer.train_dataloader is not None else None
        inputs = {}
        for name in self._target_names:
            if name in seen:
                inputs[name] = seen[name]
            elif name in collected:
                inputs[name] = dataclasses.replace(collected[name].with_batch(batch), requires_grad=True)
        distributed = trainer.world_size > 1
        return SpeedCheck(
            self.speed_guard, inputs, trainer.optimizers,
            broadcast=(lambda obj: trainer.strategy.broadcast(obj, src=0)) if distributed else None,
            measure_here=trainer.is_global_zero,
        )

    def _probe(self, trainer: Trainer, pl_module: LightningModule, layers, batches: list) -> OutputProbe:
        """Judges a policy's choices by the network's output on a few validation ``batches``."""
        return OutputProbe(pl_module, layers, batches, self.input_fn, context=trainer.precision_plugin.val_step_context)

    def _record(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        due: list[int],
        milestone: int,
        reports: list[LayerReport],
        source: str,
        table: list[LayerReport],
    ) -> None:
        self.done.extend(due)
        self.ranks = {r.name: r.new_rank for r in reports}
        self.history.append(
            {
                "epoch": trainer.current_epoch,
                "milestone": milestone,
                "value": plain_value(self.schedule[milestone]),
                "ranks": dict(self.ranks),
                "nmse": {r.name: r.nmse for r in reports},
                "samples": {r.name: r.samples for r in reports},
                "speedup": {r.name: r.speedup for r in reports if r.speedup is not None},
                "notes": {**{r.name: r.note for r in reports if r.note}, **self.skipped},
                "statistics": source,
                "event": "milestone",
            }
        )
        pl_module.log_dict(
            milestone_metrics(reports), on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1
        )  # identical on every rank; sync_dist only keeps Lightning from warning about epoch-level logs
        if self.verbose:
            rank_zero_info(
                f"LowRankFactorization, epoch {trainer.current_epoch} "
                f"({describe(self.schedule[milestone], self.mode)}):\n"
                + format_reports(table)
            )

    def _restore_optimizer_order(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """configure_optimizers ran on the rebuilt model: put its parameters back in the saved order
        so that the optimizer state (loaded next) lands on the right tensors."""
        named = dict(pl_module.named_parameters())
        if len(self._restored_groups) != len(trainer.optimizers):
            raise RuntimeError(
                f"the checkpoint holds {len(self._restored_groups)} optimizer(s), configure_optimizers built "
                f"{len(trainer.optimizers)}: cannot restore the optimizer state onto the factorized parameters"
            )
        for opt, groups in zip(trainer.optimizers, self._restored_groups):
            restore_param_group_order(opt, groups, named)
        self._restored_groups = None

    def _param_groups_by_name(self) -> Optional[list[list[list[str]]]]:
        if self._trainer is None or self._pl_module is None or not self.done:
            return None
        return [param_group_names(opt, self._pl_module) for opt in self._trainer.optimizers]

    def _drop_collector(self) -> None:
        if self._collector is not None:
            self._collector.detach()
        self._collector, self._collected_for, self._collected_at_step = None, None, None


def _progress_printer(trainer: Trainer) -> Callable[[int, int, str], None]:
    def progress(i: int, n: int, name: str) -> None:
        if trainer.is_global_zero:
            rank_zero_info(f"LowRankFactorization: solving layer {i + 1}/{n} ({name})")

    return progress
