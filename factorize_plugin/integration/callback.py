"""The Lightning callback: progressive low-rank factorization during training.

It owns no math and no model surgery. Its hooks decide *when* (milestones, which validation run's
statistics) and *where* (which layers, which process): they collect statistics
(``ActivationCollector``), sum them over the DDP ranks (``distributed.py``), call the one
transaction ``refactorize`` (solve, choose ranks, swap, edit the optimizers), rebuild the DDP
wrapper, log, and checkpoint the callback's own state.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ..layers.sharded import check_units
from ..surgery import settings
from ..surgery.calling import InputFn
from ..surgery.checkpoint import enable_factorized_loading
from ..surgery.collector import ActivationCollector
from ..surgery.optim import check_parameter_caches
from ..surgery.passes import PassResults
from ..surgery.pipeline import Selection, TargetSpec, finish, leave_out_silent, prepare
from ..surgery.preflight import check_not_meta
from ..surgery.progressive import Progressive
from ..surgery.refactorize import refactorize
from ..surgery.sharded_resume import restore_sharded_structure
from ..surgery.sharing import CallCounter
from ..surgery.speed import SpeedGuard, resolve_guard
from .auto_schedule import Readiness, read_any_schedule
from .batch_layout import BatchLayoutCheck
from .callback_state import (
    STATE_VERSION,
    check_same_interval,
    migrate_state,
    param_groups_by_name,
    plain,
    restore_optimizer_order,
)
from .fit_checks import (
    check_callbacks,
    check_resumed_targets,
    check_start_method,
    check_validation,
    warn_late_milestones,
    warn_late_steps,
)
from .lightning_internals import (
    before_checkpoint_load,
    check_strategy,
    distributed_checkpoint_shapes,
    is_fsdp2,
    rewrap_ddp,
)
from .milestone import (
    log_milestone,
    milestone_entry,
    new_collector,
    output_measures,
    plan,
    record_costs,
    solve_in_passes,
)
from .output_shift import output_measurable
from .rewarm import LRRewarm
from .schedule import INTERVALS, Interval, Mode, ScheduleValue, describe
from .speed_step import TrainingInputWatch, model_scope, speed_check


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
            ``factorize_matrix`` follows the reference implementation's instead). With
            ``interval="step"`` the keys are ``trainer.global_step`` values instead (see
            ``interval``). ``progressive(target, keys)`` (or the mapping ``Progressive``, which
            YAML builds by ``class_path: factorize_plugin.Progressive``) writes a schedule that
            reaches ``target`` in ``len(keys)`` equal-ratio steps: ``progressive(ParamBudget(0.4),
            [0, 1, 2])`` keeps 0.737, 0.543, 0.4 of the dense weights; a fraction runs from 1, an
            int rank from each layer's min(in, out) (``GeometricRank``), ``MaxNMSE`` is refused
            (``surgery/progressive.py``). Or ``"auto"``:
            one switch to ``target``, at the epoch after the validation run where every targeted
            layer's stable rank has settled or sits well inside the rank it will keep (``Readiness``;
            see ``integration/auto_schedule.py``; epochs only: ``interval="step"`` is refused).
        interval: what the schedule's keys count (Lightning's word in LR-scheduler configs):
            ``"epoch"`` (default) or ``"step"``: ``trainer.global_step`` values, for runs of an
            epoch or less (a recovery of a trained model, say). A step milestone ``s`` applies in
            ``on_train_batch_start`` of the first training batch after the ``s``-th optimizer step
            (key 0: before the first batch), so from step ``s`` on the layers run at the new rank;
            ``global_step`` moves only at optimizer steps, so that batch is at a gradient-accumulation
            boundary. Its statistics: those of a validation run that ended at step ``s`` with no
            optimizer step since (``val_check_interval`` placing one there), else a calibration pass
            over the validation batches at the milestone (as key 0 does with epochs); ``history``
            records which. The whole-model speed guard times the training batch the milestone
            precedes; the per-layer guard the layers' first training inputs since the start of the
            fit or the last milestone. The re-warm and DDP behave as with epochs. A key at or past
            the run's last optimizer step (``trainer.estimated_stepping_batches``) warns before
            training. Resume: ``done`` counts steps and ``global_step`` comes back with the
            checkpoint, so from a checkpoint at an epoch boundary, or mid-epoch with a resumable
            training loader (one with ``state_dict`` / ``load_state_dict``), the run continues
            exactly; mid-epoch with a plain loader Lightning warns and the loader starts its epoch
            again from its first batch while the epoch's batch count (and ``global_step``) goes on,
            so the data differ from the uninterrupted run's but every milestone still applies once,
            at its step. A checkpoint's milestones counted in the other unit are refused.
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
            Where the callback calls the model (``output_batches`` or a measuring ``ParamBudget``),
            a first validation batch that ``forward``'s signature cannot take is refused before
            training (``BatchLayoutError``, saying what to pass; ``integration/batch_layout.py``).
        regularization: >= 0; moves the fit toward the plain SVD of the weights (few samples).
        name: distinguishes two instances in a checkpoint (their ``state_key``); default: derived
            from ``targets`` and ``exclude``, never from the schedule, so a schedule can be edited
            between a run and its resume.
        verbose: print a summary table on rank zero after each milestone.
        speed_guard: ``"auto"`` (default): True, except under FSDP2 (``ModelParallelStrategy``),
            where it is off with a one-line notice (an explicit guard is refused there: a timed
            step would need collectives on every process). True: ``SpeedGuard(scope="model")``:
            after the ranks are chosen and
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
        rewarm_steps: after a milestone that swapped layers in mid-training, the learning rate of
            every param group ramps from 1/n to 1 of its scheduled value over each optimizer's next
            n steps, because the new factors start with empty optimizer moments. The ramped rate
            exists only between the step's closure and the update (``training_step``, backward
            hooks, gradient clipping, schedulers, loggers and checkpoints see the scheduled rate;
            with ``LBFGS``, which reads its rate first, the closure sees it too;
            ``integration/rewarm.py``). A ramp cut off by the end of ``fit`` goes on in this
            callback's next ``fit`` on the same model. ``"auto"`` (default): a quarter of an
            epoch's optimizer steps, at most 1000; an int n in [0, 10**6]; 0: no re-warm. A
            milestone before the first optimizer step has none. On the LM trade-off benchmark's
            early schedule at its tuned rate (3 seeds) it changes nothing measurable: mean final
            validation loss 2.3903 with, 2.3910 without (``benchmarks/results/lm_tradeoff.json``).

    Behaviour worth knowing:

    * Statistics are collected only during the validation run(s) of the epoch before a milestone
      (the last run wins, e.g. with ``val_check_interval=0.5``), never during the sanity check or
      ``trainer.validate``. Without such a run after the epoch's last optimizer step (key 0,
      ``check_val_every_n_epoch > 1``, a validation run that training steps followed, a resumed
      run) the callback runs the validation batches itself before the swap (``validation_step``
      with logging silenced and torchmetrics states left as they were); ``history`` records which.
      With ``interval="step"`` the run counts only if it ended at the milestone's step.
    * The swap happens in ``on_train_epoch_start`` (``interval="step"``: ``on_train_batch_start``
      of the batch after the milestone's optimizer step): no forward or backward is in flight and
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
    * ``history``: one dict per applied milestone: ``epoch``, ``global_step`` (where it applied),
      ``milestone`` (its key: an epoch, or a step with ``interval="step"``), ``value`` (a number, or
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
      rank's solving time: wall, and the process's CPU time), and ``rewarm_steps`` (the length of
      the learning-rate ramp that followed it; see ``rewarm_steps``).
    """

    STATE_VERSION = STATE_VERSION  # of ``state_dict``; ``load_state_dict`` migrates older ones

    def __init__(
        self,
        schedule: Union[dict[int, ScheduleValue], Progressive, str],
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
        speed_guard: Union[bool, Literal["auto"], SpeedGuard] = "auto",
        output_batches: int = 2,
        max_statistics_bytes: Optional[int] = None,
        target: Optional[ScheduleValue] = None,
        readiness: Optional[Readiness] = None,
        rewarm_steps: Union[int, str] = "auto",
        interval: Interval = "epoch",
    ) -> None:
        # every setting checked here, before any training (one shared checker per setting)
        self.interval: Interval = settings.check_choice("interval", interval, INTERVALS)  # type: ignore[assignment]
        self.schedule, self._policies, self._auto = read_any_schedule(schedule, mode, target, readiness, self.interval)
        self.mode = mode
        self.output_batches = settings.check_whole("output_batches", output_batches, 0)
        self._speed_setting = speed_guard
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
        self._rewarm = LRRewarm(settings.check_rewarm_steps(rewarm_steps))  # the ramp after a swap (checkpointed)
        # transient
        self._selection = Selection({})  # which layers (by name) and which were left out, with why
        self._collector: Optional[ActivationCollector] = None
        self._collected_for: Optional[int] = None  # the epoch (or step) whose milestone it collected for
        self._collected_at_step: Optional[int] = None  # trainer.global_step when that run ended
        self._trainer: Optional[Trainer] = None
        self._pl_module: Optional[LightningModule] = None
        self._watch = TrainingInputWatch()  # the speed guard's training batch / inputs, before a milestone
        self._counter: Optional[CallCounter] = None  # calls per layer during the sanity check
        self._output_batches = output_batches  # 0 for a module without forward (see output_measurable)
        self._layout = BatchLayoutCheck()  # a validation batch forward cannot take: refused before training

    targets = property(lambda self: self.spec.targets)
    exclude = property(lambda self: self.spec.exclude)
    min_params = property(lambda self: self.spec.min_params)
    min_features = property(lambda self: self.spec.min_features)
    max_samples = property(lambda self: self.spec.max_samples)
    sample_fraction = property(lambda self: self.spec.sample_fraction)
    rewarm_steps = property(lambda self: self._rewarm.setting)
    skipped = property(lambda self: self._selection.skipped, doc="layers left out, with why (shown in the report)")
    _target_names = property(lambda self: list(self._selection.layers))
    _train_batch = property(lambda self: self._watch.batch)  # [] while watching, until the batch is kept

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
        fsdp2 = is_fsdp2(trainer.strategy)
        self.speed_guard = resolve_guard(self._speed_setting, "train", scope="model", sharded=fsdp2)
        if self._speed_setting == "auto" and fsdp2:
            rank_zero_info("LowRankFactorization: the speed decision is off under FSDP2 (speed_guard='auto')")
        check_callbacks(trainer.callbacks)  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
        check_validation(trainer, pl_module)
        check_not_meta(pl_module, "LowRankFactorization")
        planned = self._policies if self._auto is None else {"auto": self._auto.target}
        measurable = output_measurable(pl_module, planned, self.budget_batches, self.output_batches)
        self._output_batches = self.output_batches if measurable else 0
        probing = self.budget_batches > 0 and any(p.uses_probe for p in planned.values())
        self._layout.arm(self._output_batches, probing, self.budget_batches)
        check_start_method(trainer, pl_module)
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
        if is_fsdp2(trainer.strategy):  # configure_model sharded the model; a checkpoint loads after this hook
            check_units(pl_module, self._layers(pl_module))
            before_checkpoint_load(trainer.strategy, lambda path: restore_sharded_structure(
                trainer.lightning_module, distributed_checkpoint_shapes(path), trainer.optimizers
            ))  # the checkpoint's pairs, sharded, before its weights and optimizer state load
        else:
            self._resume_optimizers(trainer, pl_module)
        if self.interval == "epoch":
            warn_late_milestones(trainer, self.schedule, self.done)

    def _resume_optimizers(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The optimizers as the checkpointed run left them, once this callback's state is loaded:
        parameters in the saved order (a rebuilt model's), the re-warm ramp going on."""
        if self._restored_groups and not is_fsdp2(trainer.strategy):  # (FSDP2 loads optimizer state by name)
            restore_optimizer_order(trainer.optimizers, self._restored_groups, pl_module)
        self._restored_groups = None
        self._rewarm.resume(trainer.optimizers)  # a ramp checkpointed, or cut off by the last fit's end, goes on

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if is_fsdp2(trainer.strategy):  # its checkpoint (with this callback's state) loaded after on_fit_start
            self._resume_optimizers(trainer, pl_module)
        self._layout.before_training(trainer, pl_module, self.input_fn)  # no sanity check showed a batch
        if self._auto is not None:  # the epoch's length is known from here on: auto's latest switch, warned now
            self._auto.plan(trainer)
        if self.interval == "step":  # the run's optimizer steps are known from here on
            warn_late_steps(trainer, self.schedule, self.done)
            self._watch_training_inputs(pl_module, upcoming=self._pending())

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking and trainer.state.fn == "fit" and self._counter is None:
            self._counter = CallCounter(self._layers(pl_module)).attach()  # finds never-called layers early
        if self._auto is not None and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._auto.before_validation(trainer, self._layers(pl_module), self.schedule, self._policies)
        upcoming = self._next_position(trainer)
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self._due(upcoming):
            return
        self._drop_collector()
        # A fresh collector per validation run: the last run before the milestone wins. Projected
        # (x @ W) statistics are exact only while W stays as it was during the run: if an optimizer
        # step follows it, on_train_epoch_start sees global_step moved and collects again.
        first = self._plan(pl_module)[0]  # the validation run collects the first pass's layers
        limits = list(trainer.num_val_batches)
        self._collector = new_collector(trainer, pl_module, self._selection, self.spec, limits, first).attach()
        self._collected_for = upcoming

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
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.state.fn == "fit" and dataloader_idx == 0:
            self._layout.see(pl_module, batch, self.input_fn)  # the sanity check's first batch, before training

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.interval == "epoch":
            self._watch.keep(batch)  # on the device: the whole-model speed check's batch
            return
        # interval="step": a milestone due at this optimizer step applies before this batch trains
        # (global_step moves only at optimizer steps: its first batch is at an accumulation boundary)
        due = self._due(trainer.global_step)
        if due:
            self._watch.keep(batch)  # the whole-model speed check times the batch about to train
            self._apply(trainer, pl_module, due)
            self._watch_training_inputs(pl_module, upcoming=self._pending())

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._rewarm.release()  # the step hooks of optimizers whose ramp ended in this batch

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.interval == "step":  # milestones fall on optimizer steps (on_train_batch_start)
            return
        due = self._due(trainer.current_epoch)
        if due:
            self._apply(trainer, pl_module, due)
        self._watch_training_inputs(pl_module, upcoming=bool(self._due(trainer.current_epoch + 1)))

    def _apply(self, trainer: Trainer, pl_module: LightningModule, due: list[int]) -> None:
        """Applies the last of the ``due`` milestones: solve, measure, swap, rewrap, record."""
        epoch, position, milestone = trainer.current_epoch, self._position(trainer), due[-1]
        label = f"milestone {milestone} ({describe(self.schedule[milestone], self.mode)})"
        if due != [position]:
            rank_zero_warn(
                f"LowRankFactorization: milestone(s) {due} were not applied when due (a run resumed past them?); "
                f"applying {label} now, at {self.interval} {position}"
            )
        self._rewarm.stop()  # a ramp still running ends here (the speed check copies the optimizers)
        policy = self._policies[milestone]
        probing = policy.uses_probe and self.budget_batches > 0
        # DDP: each layer's statistics summed into one owner, which alone solves it; a probe runs the
        # model at trial ranks whose factors every rank would need: statistics all-reduced for it
        solved, source = self._solve_in_passes(trainer, pl_module, position, shard=not probing)
        layers = self._layers(pl_module)
        budget = self.budget_batches if probing else 0
        batches, shift, probe = output_measures(trainer, pl_module, layers, self._output_batches, budget, self.input_fn)
        names, guard = self._target_names, self.speed_guard
        speed = speed_check(trainer, pl_module, guard, self._watch, names, solved.inputs, batches)
        reports = refactorize(
            pl_module, layers, None, policy, optimizers=trainer.optimizers, probe=probe,
            agree=(lambda r: trainer.strategy.broadcast(r, src=0)) if trainer.world_size > 1 else None,
            speed=speed, sharding=solved.sharding, candidates=solved.candidates,
        )
        rewrap_ddp(trainer)  # a collective under DDP: every rank gets here, whatever changed
        table, advice = finish(pl_module, self._selection, reports, solved.positions, label)
        self.done.extend(due)
        self.ranks = {r.name: r.new_rank for r in reports}
        value, step = self.schedule[milestone], trainer.global_step
        self.history.append(milestone_entry(epoch, milestone, value, reports, source, self.skipped, step))
        log_milestone(trainer, pl_module, reports, table, value, self.mode, self.verbose)
        record_costs(self.history[-1], trainer, pl_module, solved, speed, shift, self.verbose)
        for message in advice:
            self._advise(message)
        self.history[-1]["heldout_nmse"] = {r.name: r.heldout_nmse for r in reports if r.heldout_nmse is not None}
        self.history[-1]["rewarm_steps"] = self._rewarm.after_swap(trainer, any(r.changed for r in reports))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drop_collector()
        self._watch.drop()
        self._rewarm.pause()  # a ramp cut off here goes on in this callback's next fit on this model

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._drop_collector()  # no hook stays attached to the model after a failed fit
        self._watch.drop()
        self._rewarm.pause()  # no hook stays on the optimizers; the ramp's progress is kept
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
            "param_groups": param_groups_by_name(self._trainer, self._pl_module) if self.done else None,
            "targets": list(self._target_names),
            "auto": None if self._auto is None else self._auto.state_dict(),
            "rewarm": self._rewarm.state_dict(),
            "interval": self.interval,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = migrate_state(state_dict)  # a state written by an earlier release, brought up to date
        check_same_interval(self.interval, state_dict)
        self.done = list(state_dict.get("done", []))
        self.ranks = dict(state_dict.get("ranks", {}))
        self.history = list(state_dict.get("history", []))
        self._restored_groups = state_dict.get("param_groups")
        self._rewarm.load_state_dict(state_dict.get("rewarm"))
        if self._auto is not None:
            self._auto.load_state_dict(state_dict.get("auto"))
            self._auto.restore(self.schedule, self._policies)

    # ---------------------------------------------------------------- helpers
    def _advise(self, message: Optional[str]) -> None:
        if message is not None:
            rank_zero_warn(f"LowRankFactorization: {message}")

    def _reset_state(self) -> None:
        self.done, self.ranks, self.history, self._restored_groups = [], {}, [], None
        self._rewarm.load_state_dict(None)
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

    def _due(self, position: int) -> list[int]:
        """Milestones in force at ``position`` (an epoch, or a step with ``interval="step"``) that
        have not been applied yet (normally just ``position``)."""
        return [e for e in self.schedule if e <= position and e not in self.done]

    def _pending(self) -> bool:
        """Whether a milestone of the schedule is still to come."""
        return any(e not in self.done for e in self.schedule)

    def _position(self, trainer: Trainer) -> int:
        """Where training stands in the schedule's unit: the epoch, or ``trainer.global_step``."""
        return trainer.global_step if self.interval == "step" else trainer.current_epoch

    def _next_position(self, trainer: Trainer) -> int:
        """At a validation run: the position of the next milestone moment (the next epoch start; with
        ``interval="step"`` the next training batch, which starts at this same optimizer step)."""
        return trainer.global_step if self.interval == "step" else trainer.current_epoch + 1

    def _plan(self, pl_module: LightningModule, factorized: bool = False) -> list[list[str]]:
        return plan(self._trainer, self._layers(pl_module), self.max_statistics_bytes, factorized=factorized)

    def _solve_in_passes(
        self, trainer: Trainer, pl_module: LightningModule, position: int, shard: bool
    ) -> tuple[PassResults, str]:
        """The first pass reuses the last validation run before ``position`` (an epoch, or a step) if
        no optimizer step followed it (the same decision on every rank: same step), else calibrates now."""
        fresh = self._collected_for == position and self._collected_at_step == trainer.global_step
        groups = self._plan(pl_module)
        collected = cast(ActivationCollector, self._collector)  # used only when fresh: collected for this position
        first = self._collector if fresh and list(collected.layers) == groups[0] else None
        self._collector, self._collected_for, self._collected_at_step = None, None, None
        leave_out = lambda silent: self._leave_out_silent(pl_module, silent, "validation")  # noqa: E731
        return solve_in_passes(
            trainer, pl_module, self._selection, self.spec, groups, first, self.regularization, shard, leave_out
        )

    def _watch_training_inputs(self, pl_module: LightningModule, upcoming: bool) -> None:
        """Before an epoch that precedes a milestone (or may: ``schedule="auto"`` still watching;
        with ``interval="step"``: from the start of training and after each milestone, while one is
        ``upcoming``): watch the training inputs for the speed guard, which then times a real
        training batch (per-layer scope: each layer's first training input from here on; whole-model
        scope: the epoch's first training batch, or with steps the batch the milestone precedes)."""
        self._watch.drop()
        undecided = self._auto is not None and self._auto.switch_epoch is None
        if self.speed_guard is not None and (upcoming or undecided):
            self._watch.start(self._layers(pl_module), model_scope(self.speed_guard, pl_module))

    def _drop_collector(self) -> None:
        if self._collector is not None:
            self._collector.detach()
        self._collector, self._collected_for, self._collected_at_step = None, None, None

