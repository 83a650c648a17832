"""The Lightning callback: progressive low-rank factorization during ``fit``.

A thin driver of ``engine.FactorizationEngine`` (plain PyTorch: the schedule, the statistics, the
milestone, the re-warm, the speed decision and their state): each hook translates one of
Lightning's moments into an engine call through ``LightningHost``. What only Lightning knows stays
here: the fit's checks (strategy, callbacks, validation data, start method), ``schedule="auto"``
(its latest switch is planned from the Trainer's limits), FSDP2's units and checkpoint loading,
the sanity check's call counts, and the state key.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from ..engine.engine import FactorizationEngine
from ..engine.schedule import Interval, Mode, ScheduleValue
from ..engine.state import STATE_VERSION
from ..layers.sharded import check_units
from ..surgery import settings
from ..surgery.arguments import DOOR_ARGUMENT, MOVED, default, with_argument_help
from ..surgery.progressive import Progressive
from ..surgery.select.preflight import check_not_meta
from ..surgery.select.sharing import CallCounter
from ..surgery.specs import Auto, Patterns, Statistics, Targets, auto_from, statistics_from, targets_from
from ..surgery.swap.checkpoint import enable_factorized_loading
from ..surgery.swap.optim import check_parameter_caches
from ..surgery.swap.sharded_resume import restore_sharded_structure
from ..surgery.timing.speed import SpeedGuard
from .auto_schedule import Readiness, read_any_schedule
from .batch_layout import BatchLayoutCheck
from .fit_checks import (
    check_callbacks,
    check_resumed_targets,
    check_start_method,
    check_validation,
    output_measurable,
    warn_late_milestones,
    warn_late_steps,
)
from .lightning_host import LightningHost
from .lightning_internals import before_checkpoint_load, check_strategy, distributed_checkpoint_shapes, is_fsdp2

_SETTINGS = ("speed_guard", "mode", "interval", "targets", "statistics", "budget_batches", "input_fn", "regularization",
             "verbose", "output_batches")  # fmt: skip


def _engine_attribute(name: str, doc: str = "") -> property:
    return property(lambda self: getattr(self.engine, name), lambda self, v: setattr(self.engine, name, v), doc=doc)


@with_argument_help
class LowRankFactorization(Callback):
    """Factorizes (and then re-factorizes at lower ranks) Linear/Conv2d layers during ``fit``.

    ``schedule`` maps epochs (with ``interval="step"``: optimizer steps) to rank policies
    (``FixedRank(16)``, ``MaxNMSE(0.05)``, ``ParamBudget(0.3)``, or a scalar read by ``mode``);
    ``progressive(target, keys)`` writes one that reaches ``target`` in equal-ratio steps, and
    ``"auto"`` / ``Auto(target, readiness)`` switches once when the layers' stable ranks settle. At
    each milestone the chosen layers are refitted, exactly, to the inputs they saw during the
    validation run just before it (or a calibration pass over the validation batches), swapped for
    pairs of the new rank, the optimizers edited in place (Adam's or SGD's state carried onto the new
    factors; otherwise the learning rate re-warms over ``rewarm_steps``) and each layer's NMSE logged as
    ``factorize/<layer>/nmse``. A speed decision (``speed_guard``) keeps a milestone only where the
    training step gets faster. DDP sums the statistics over the ranks and every rank installs the
    same factors; FSDP2 needs each targeted layer to be its own ``fully_shard`` unit. Checkpoints
    hold the structure, the callback's state and the optimizers' parameters by name, so a resumed
    fit neither repeats nor skips a milestone.

    Which layers: ``targets`` (patterns or ``Targets``); their statistics: ``statistics``
    (``Statistics``). Every argument, with its default and meaning: ``docs/callback.md`` (and
    ``docs/arguments.md`` beside ``factorize_model``'s). ``history`` holds one plain-data entry per
    applied milestone (and, with ``"auto"``, per validation run watched).
    """

    STATE_VERSION = STATE_VERSION  # of ``state_dict``; ``load_state_dict`` migrates older ones

    def __init__(
        self,
        schedule: Union[dict[int, ScheduleValue], Progressive, Auto, str],
        mode: Mode = "rank",
        targets: Union[Patterns, Targets] = None,
        *,
        interval: Interval = "epoch",
        statistics: Optional[Statistics] = None,
        budget_batches: int = default("budget_batches", "training"),
        input_fn: Optional[Callable[[Any], Any]] = None,
        regularization: float = 0.0,
        speed_guard: Union[bool, Literal["auto"], SpeedGuard] = "auto",
        rewarm_steps: Union[int, str] = "auto",
        output_batches: int = 2,
        verbose: bool = True,
        name: Optional[str] = None,
        exclude: Patterns = None,  # the deprecated flat names (arguments.MOVED), until the next release
        min_params: int = 1024,
        min_features: int = 32,
        max_samples: Optional[int] = default("max_samples", "training"),
        sample_fraction: Union[float, str] = default("sample_fraction", "training"),
        max_statistics_bytes: Optional[int] = None,
        target: Optional[ScheduleValue] = None,
        readiness: Optional[Readiness] = None,
    ) -> None:
        where = "LowRankFactorization"
        schedule = auto_from(where, schedule, target, readiness)
        values, _, self._auto = read_any_schedule(schedule, mode, interval)
        self.engine = FactorizationEngine(
            values, mode=mode, interval=interval,
            targets=targets_from(where, targets, exclude=exclude, min_params=min_params, min_features=min_features),
            statistics=statistics_from(where, statistics, "training", max_samples=max_samples,
                                       sample_fraction=sample_fraction, max_statistics_bytes=max_statistics_bytes),
            budget_batches=budget_batches, input_fn=input_fn, regularization=regularization, verbose=verbose,
            speed_guard=speed_guard, output_batches=output_batches, rewarm_steps=rewarm_steps,
        )  # fmt: skip
        self.name = settings.check_name(name)
        self._trainer: Optional[Trainer] = None
        self._pl_module: Optional[LightningModule] = None
        self._counter: Optional[CallCounter] = None  # calls per layer during the sanity check
        self._layout = BatchLayoutCheck()  # a validation batch forward cannot take: refused before training

    schedule = _engine_attribute("schedule")
    _policies = _engine_attribute("policies")
    done = _engine_attribute("done", "milestones applied (their keys)")
    ranks = _engine_attribute("ranks", "each layer's rank after the last milestone (None: dense)")
    history = _engine_attribute("history", "one plain-data entry per applied milestone (and watched run)")
    skipped = property(lambda self: self.engine.selection.skipped, doc="layers left out, with why")

    def __getattr__(self, name: str) -> Any:
        """The engine's settings, read-only (``cb.interval``, ``cb.targets``, ...)."""
        engine = self.__dict__.get("engine")
        if engine is not None and name in _SETTINGS:
            return getattr(engine, name)
        if engine is not None and name in MOVED and MOVED[name][0] != "Auto":  # an old flat name: its object's field
            return getattr(getattr(engine, DOOR_ARGUMENT[MOVED[name][0]]), MOVED[name][1])
        if engine is not None and name == "rewarm_steps":
            return engine.rewarm.setting
        raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")

    _train_batch = property(lambda self: self.engine.watch.batch)  # [] while watching, until the batch is kept

    @property
    @override
    def state_key(self) -> str:
        if self.name is not None:
            return self._generate_state_key(name=self.name)
        return self._generate_state_key(targets=self.targets.include, exclude=self.targets.exclude)  # (keys as before)

    def _host(self, trainer: Trainer, pl_module: LightningModule) -> LightningHost:
        return LightningHost(trainer, pl_module)

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
        if self.engine.speed_setting == "auto" and fsdp2:
            rank_zero_info("LowRankFactorization: the speed decision is off under FSDP2 (speed_guard='auto')")
        check_callbacks(trainer.callbacks)  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
        check_validation(trainer, pl_module)
        check_not_meta(pl_module, "LowRankFactorization")
        planned = self._policies if self._auto is None else {"auto": self._auto.target}
        measurable = output_measurable(pl_module, planned, self.budget_batches, self.output_batches)
        self.engine.measured_output_batches = self.output_batches if measurable else 0
        probing = self.budget_batches > 0 and any(p.uses_probe for p in planned.values())
        self._layout.arm(self.engine.measured_output_batches, probing, self.budget_batches)
        check_start_method(trainer, pl_module)
        enable_factorized_loading(pl_module)  # a resumed checkpoint rebuilds the structure before weights load
        self._trainer, self._pl_module = trainer, pl_module
        labels = {f"milestone {e}": p for e, p in planned.items()}
        self.engine.setup(pl_module, self._host(trainer, pl_module), sharded=fsdp2, planned=labels)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer, self._pl_module = trainer, pl_module
        for opt in trainer.optimizers:
            check_parameter_caches(opt)  # refused before training, not at the first milestone
        if is_fsdp2(trainer.strategy):  # configure_model sharded the model; a checkpoint loads after this hook
            check_units(pl_module, self.engine.layers(pl_module))
            before_checkpoint_load(
                trainer.strategy,
                lambda path: restore_sharded_structure(
                    trainer.lightning_module, distributed_checkpoint_shapes(path), trainer.optimizers
                ),
            )  # the checkpoint's pairs, sharded, before its weights and optimizer state load
        else:  # the optimizers as the checkpointed run left them (the re-warm ramp going on)
            self.engine.resume_optimizers(self._host(trainer, pl_module), pl_module)
        if self.interval == "epoch":
            warn_late_milestones(trainer, self.schedule, self.done)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        host = self._host(trainer, pl_module)
        if is_fsdp2(trainer.strategy):  # its checkpoint (with this callback's state) loaded after on_fit_start
            self.engine.resume_optimizers(host, pl_module, reorder=False)  # (FSDP2 loads optimizer state by name)
        self._layout.before_training(trainer, pl_module, self.input_fn)  # no sanity check showed a batch
        if self._auto is not None:  # the epoch's length is known from here on: auto's latest switch, warned now
            self._auto.plan(trainer)
        if self.interval == "step":  # the run's optimizer steps are known from here on
            warn_late_steps(trainer, self.schedule, self.done)
            self.engine.watch_training_inputs(host, pl_module, upcoming=self.engine.pending())

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fitting = trainer.state.fn == "fit"
        if trainer.sanity_checking and fitting and self._counter is None:
            self._counter = CallCounter(self.engine.layers(pl_module)).attach()  # finds never-called layers early
        if self._auto is not None and not trainer.sanity_checking and fitting:
            self._auto.before_validation(trainer, self.engine.layers(pl_module), self.schedule, self._policies)
        if fitting and not trainer.sanity_checking:  # the next milestone moment: the next epoch start, or with
            # interval="step" the next training batch, which starts at this same optimizer step
            upcoming = trainer.global_step if self.interval == "step" else trainer.current_epoch + 1
            self.engine.begin_evaluation(
                self._host(trainer, pl_module), pl_module, upcoming, list(trainer.num_val_batches)
            )

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counter is not None and self._counter.attached:
            self._counter.detach()
            self.engine.leave_out_silent(
                self._host(trainer, pl_module), pl_module, self._counter.silent(), "the sanity check"
            )
        self.engine.end_evaluation(self._host(trainer, pl_module))
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
        self.engine.start_batch(self._host(trainer, pl_module), pl_module, batch)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.engine.end_batch()

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        undecided = self._auto is not None and self._auto.switch_epoch is None  # auto may still switch next epoch
        self.engine.start_epoch(self._host(trainer, pl_module), pl_module, trainer.current_epoch, undecided)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.engine.pause()  # a ramp cut off here goes on in this callback's next fit on this model

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.engine.pause()  # no hook stays on the model or the optimizers; the ramp's progress is kept
        if self._counter is not None:
            self._counter.detach()

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == "fit":
            check_resumed_targets(self.state_key, self.engine.target_names, checkpoint)

    # ------------------------------------------------------- state and resume
    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data only (loadable with torch's safe ``weights_only`` unpickler), with a ``version``."""
        trainer, module = self._trainer, self._pl_module
        host = self._host(trainer, module) if trainer is not None and module is not None else None
        state = self.engine.state_dict(host, module)
        state["auto"] = None if self._auto is None else self._auto.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = self.engine.load_state_dict(state_dict)
        if self._auto is not None:
            self._auto.load_state_dict(state.get("auto"))
            self._auto.restore(self.schedule, self._policies)

    def _reset_state(self) -> None:
        self.engine.reset()
        if self._auto is not None:
            self.schedule, self._policies = {}, {}
            self._auto.reset()
