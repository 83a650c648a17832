"""The Lightning callback: progressive low-rank factorization during training.

It orchestrates and owns no math: statistics come from ``ActivationCollector``, solutions from
``planner`` (over the exact solver), swaps from ``layers``; this module decides *when*, keeps the
optimizer and DDP wrapper consistent, logs, and checkpoints its own state.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal, Mapping, Optional, Union

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .budget import ParamBudget, plan_budget
from .checkpoint import enable_factorized_loading, loading_enabled
from .collector import ActivationCollector
from .layers.factorized import FactorizedConv2d, FactorizedLinear
from .modules import set_submodule
from .optim import param_group_names, replace_in_optimizer, restore_param_group_order
from .planner import LayerReport, apply_ranks, build_candidates, format_reports
from .policies import make_policy
from .targets import select_layers

log = logging.getLogger(__name__)

RankLike = Union[int, float]
Mode = Literal["rank", "max_nmse", "param_budget"]

_PARAM_COPY_CALLBACKS = ("StochasticWeightAveraging", "WeightAveraging", "EMAWeightAveraging", "EMA", "EMACallback")
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA", "Horovod", "Colossal", "Bagua")


def validate_schedule(schedule: Mapping[int, RankLike], mode: str) -> dict[int, RankLike]:
    """Checks a milestone schedule (epoch -> value) and returns it sorted by epoch.

    Ranks only go down: for ``mode="rank"`` ints and fractions must each be non-increasing (an
    int may follow a fraction and vice versa; the layer's size decides then); ``param_budget``
    fractions non-increasing; ``max_nmse`` targets non-decreasing.
    """
    if mode not in ("rank", "max_nmse", "param_budget"):
        raise ValueError(f"mode must be 'rank', 'max_nmse' or 'param_budget', got {mode!r}")
    if not schedule:
        raise ValueError("schedule is empty: give at least one milestone {epoch: value}")
    out: dict[int, RankLike] = {}
    for epoch, value in sorted((int(e), v) for e, v in schedule.items()):
        if epoch < 0:
            raise ValueError(f"schedule key {epoch}: epochs are 0-based and cannot be negative")
        make_policy(**{mode: value})  # validates the value itself
        out[epoch] = value
    items = list(out.items())
    for kind in (int, float):
        same = [(e, v) for e, v in items if type(v) is kind]
        for (e0, v0), (e1, v1) in zip(same, same[1:]):
            bad = v1 < v0 if mode == "max_nmse" else v1 > v0
            if bad:
                what = "error targets may only go up" if mode == "max_nmse" else "ranks may only go down"
                raise ValueError(
                    f"schedule goes back up at epoch {e1} ({v0} at epoch {e0}, then {v1}): {what}; "
                    "sort the values so that every milestone is at least as small as the one before"
                )
    return out


class LowRankFactorization(Callback):
    """Factorizes (and then re-factorizes at lower ranks) Linear/Conv2d layers during ``fit``.

    Args:
        schedule: ``{epoch: value}``. From the start of ``epoch`` (0-based, as
            ``trainer.current_epoch``) the chosen layers run at the new rank, fitted to the inputs
            they saw during the validation run just before that epoch (key 0: a calibration pass over
            validation batches before training starts). With ``mode="rank"`` a value is an int rank
            or a float in (0, 1) = fraction of each original layer's min(in, out).
        mode: how schedule values are read: ``"rank"``, ``"max_nmse"`` (per layer, the smallest rank
            whose NMSE is at most the value) or ``"param_budget"`` (keep that fraction of the targeted
            layers' original dense weights in total, allocated across layers).
        targets / exclude: fnmatch patterns over qualified module names (default: every Linear and
            Conv2d with at least ``min_params`` weights).
        min_params / min_features: skip layers with fewer weights, or whose min(in, out) features
            is smaller (C_in * k_h * k_w and C_out for a convolution; by default a 10-class head is
            left alone). Layers whose rank
            would not save multiply-adds stay dense.
        max_samples: cap on rows (tokens / output pixels) of statistics per layer and milestone.
        sample_fraction: share of each validation batch's rows used for statistics; ``"auto"`` keeps
            their cost near 10% of the layer's forward cost (see ``ActivationCollector``).
        budget_batches: validation batches on which ``mode="param_budget"`` measures each layer's
            effect on the network's output (the model's forward on the batch's inputs: the first
            element of a tuple batch); 0 allocates by the layers' NMSE alone.
        regularization: >= 0; moves the fit toward the plain SVD of the weights (few samples).
        verbose: print a summary table on rank zero after each milestone.

    Behaviour worth knowing:

    * Statistics are collected only during the validation run(s) of the epoch before a milestone
      (the last run wins, e.g. with ``val_check_interval=0.5``), never during the sanity check or
      ``trainer.validate``. Without such a run after the epoch's last optimizer step (key 0,
      ``check_val_every_n_epoch > 1``, a validation run that training steps followed, a resumed
      run) the callback runs the validation batches itself before the swap (``validation_step``
      with logging silenced and torchmetrics states left as they were); ``history`` records which.
    * The swap happens in ``on_train_epoch_start``: no forward or backward is in flight and
      gradient accumulation is at a boundary. If solving or swapping fails, the model is left as
      it was before the milestone.
    * Optimizer: the same optimizer and LR-scheduler objects continue (the schedule goes on); a
      new parameter takes the param group and place of the one it replaces and starts with empty
      state (Adam moments at zero); the old parameters' state is dropped; untouched parameters
      keep theirs.
    * DDP (``strategy="ddp"``, multi-node included: nothing assumes one machine): statistics are
      summed over all ranks before solving (one collective per layer, in name order), so every
      rank computes the same factors from the union of all ranks' validation data; the
      ``DistributedDataParallel`` wrapper is then rebuilt. ``ddp_spawn`` (and other start
      methods that copy weights back into the main process) needs
      ``enable_factorized_loading(model)`` in the main process before ``fit``, so that the main
      process's model takes the factorized structure of the workers.
    * Checkpoints hold the factorized structure (in each pair's extra state), the callback's own
      state (milestones done, ranks, history) and the optimizer's param groups by name:
      ``trainer.fit(fresh_dense_model, ckpt_path=...)`` rebuilds the structure before the weights
      load, puts the optimizer state on the right parameters and neither repeats nor skips a
      milestone. A milestone that was missed (a run resumed past it) is applied at the next epoch
      start, with a warning. For inference use ``load_factorized_checkpoint(cls, path)``.
    """

    def __init__(
        self,
        schedule: dict[int, Union[int, float]],
        mode: Mode = "rank",
        targets: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        min_params: int = 1024,
        min_features: int = 32,
        max_samples: Optional[int] = 100_000,
        sample_fraction: Union[float, str] = "auto",
        budget_batches: int = 4,
        regularization: float = 0.0,
        verbose: bool = True,
    ) -> None:
        self.mode = mode
        self.schedule = validate_schedule(schedule, mode)
        if regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.targets = None if targets is None else list(targets)
        self.exclude = None if exclude is None else list(exclude)
        self.min_params = int(min_params)
        self.min_features = int(min_features)
        self.max_samples = max_samples
        self.sample_fraction = sample_fraction
        if budget_batches < 0:
            raise ValueError(f"budget_batches must be >= 0, got {budget_batches}")
        self.budget_batches = int(budget_batches)
        self.regularization = float(regularization)
        self.verbose = verbose
        # state (checkpointed)
        self.done: list[int] = []
        self.ranks: dict[str, Optional[int]] = {}
        self.history: list[dict[str, Any]] = []
        self._restored_groups: Optional[list[list[list[str]]]] = None
        # transient
        self._target_names: list[str] = []
        self._collector: Optional[ActivationCollector] = None
        self._collected_for: Optional[int] = None
        self._collected_at_step: Optional[int] = None  # trainer.global_step when that run ended
        self._trainer: Optional[Trainer] = None
        self._pl_module: Optional[LightningModule] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=self.schedule, mode=self.mode, targets=self.targets, exclude=self.exclude)

    # ----------------------------------------------------------------- checks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer.strategy)
        _check_callbacks(trainer.callbacks)
        if _copies_weights_back(trainer.strategy) and not loading_enabled(pl_module):
            raise RuntimeError(
                f"with strategy='{_strategy_label(trainer.strategy)}' Lightning copies the trained weights back into the "
                "main process's model, which stays dense unless it can rebuild the factorized structure: call "
                "factorize_plugin.enable_factorized_loading(model) on the model in the main process before "
                "trainer.fit (or use strategy='ddp')"
            )
        enable_factorized_loading(pl_module)  # a resumed checkpoint rebuilds the structure before weights load
        self._target_names = list(self._select(pl_module))
        self._trainer, self._pl_module = trainer, pl_module

    def _select(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        layers = select_layers(
            pl_module, self.targets, self.exclude, min_params=self.min_params, min_features=self.min_features
        )
        if not layers:
            raise ValueError(
                f"no layer to factorize in {type(pl_module).__name__}: targets={self.targets}, exclude={self.exclude}, "
                f"min_params={self.min_params}, min_features={self.min_features} leave none; lower them or widen the patterns"
            )
        return layers

    def _layers(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        return {name: pl_module.get_submodule(name) for name in self._target_names}

    def _due(self, epoch: int) -> list[int]:
        """Milestones in force at ``epoch`` that have not been applied yet (normally just ``epoch``)."""
        return [e for e in self.schedule if e <= epoch and e not in self.done]

    # ------------------------------------------------------------- collection
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        upcoming = trainer.current_epoch + 1
        if not self._due(upcoming):
            return
        if self._collector is not None:
            self._collector.detach()
        # a fresh collector per validation run: the last run before the milestone wins
        # Projected (x @ W) statistics ("auto") are exact only while W stays as it was during the
        # run. If any optimizer step follows the run (e.g. val_check_interval=0.5 over an odd number
        # of batches, or an int val_check_interval), on_train_epoch_start sees it (global_step
        # moved) and collects again instead of solving from stale statistics.
        self._collector = ActivationCollector(
            self._layers(pl_module), self.max_samples, sample_fraction=self.sample_fraction, space="auto"
        ).attach()
        self._collected_for = upcoming
        self._collected_at_step = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._collector is not None and self._collector.attached:
            self._collector.detach()
            self._collected_at_step = trainer.global_step

    def _calibrate(self, trainer: Trainer, pl_module: LightningModule) -> ActivationCollector:
        """Runs the validation batches through the model (no logging, no grad, metric states kept)."""
        loaders, limits = _val_loaders(trainer)
        collector = ActivationCollector(
            self._layers(pl_module), self.max_samples, sample_fraction=self.sample_fraction, space="auto"
        )
        was_training = pl_module.training
        pl_module.eval()
        try:
            with collector, torch.no_grad(), _silenced_logging(pl_module), _preserved_metric_states(pl_module):
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
        finally:
            pl_module.train(was_training)
        return collector

    # ------------------------------------------------------------------ swaps
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        due = self._due(epoch)
        if not due:
            return
        milestone = due[-1]
        if due != [epoch]:
            rank_zero_warn(
                f"LowRankFactorization: milestone(s) {due} were not applied when due (a run resumed past them?); "
                f"applying milestone {milestone} ({self.mode}={self.schedule[milestone]}) now, at epoch {epoch}"
            )
        fresh = self._collected_for == epoch and self._collected_at_step == trainer.global_step
        collector = self._collector if fresh else None  # identical decision on every rank (same step)
        self._collector, self._collected_for, self._collected_at_step = None, None, None
        source = "validation"
        if collector is None:  # no validation run since the last optimizer step: collect now
            collector = self._calibrate(trainer, pl_module)
            source = "calibration"
        layers = self._layers(pl_module)
        stats = collector.stats
        if trainer.world_size > 1:
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
            for name in sorted(stats):  # same collectives, same order, on every rank
                stats[name].all_reduce_(reduce)
        collector.check_nonempty()

        progress = _progress_printer(trainer) if len(layers) >= 8 else None
        candidates = build_candidates(layers, stats, collector.positions, self.regularization, progress)
        ranks = self._choose(trainer, pl_module, layers, candidates, self.schedule[milestone])

        old_params = {name: dict(m.named_parameters()) for name, m in layers.items()}
        snapshot = _snapshot(layers)
        try:
            reports = apply_ranks(pl_module, layers, candidates, ranks)
        except BaseException:
            _restore(pl_module, snapshot)  # all or nothing: the model stays as it was before the milestone
            raise
        new_params = {name: dict(pl_module.get_submodule(name).named_parameters()) for name in layers}
        swapped = [
            (old_params[n], new_params[n])
            for n in layers
            if [id(p) for p in old_params[n].values()] != [id(p) for p in new_params[n].values()]
        ]
        for opt in trainer.optimizers:
            replace_in_optimizer(opt, swapped)
        _rewrap_ddp(trainer)  # a collective under DDP: every rank gets here, whatever changed

        self.done.extend(due)
        self.ranks = {r.name: r.new_rank for r in reports}
        self.history.append(
            {
                "epoch": epoch,
                "milestone": milestone,
                "value": self.schedule[milestone],
                "ranks": dict(self.ranks),
                "nmse": {r.name: r.nmse for r in reports},
                "samples": {r.name: r.samples for r in reports},
                "statistics": source,
            }
        )
        self._log(trainer, pl_module, reports)
        if self.verbose:
            rank_zero_info(
                f"LowRankFactorization, epoch {epoch} ({self.mode}={self.schedule[milestone]}):\n" + format_reports(reports)
            )

    def _choose(self, trainer: Trainer, pl_module: LightningModule, layers, candidates, value: RankLike):
        """The new ranks. A parameter budget is judged on the network's output: each layer's
        measured effect on it over a few validation batches (``plan_budget``), never worse than a
        uniform rank at the same size on those batches; rank 0's choice is broadcast so every
        process installs the same structure."""
        policy = self._policy(value, candidates)
        if not isinstance(policy, ParamBudget) or self.budget_batches == 0:
            return policy.choose(candidates)
        loaders, limits = _val_loaders(trainer)
        batches = []
        for i, batch in enumerate(loaders[0]):
            if i >= min(self.budget_batches, limits[0]):
                break
            batches.append(trainer.strategy.batch_to_device(batch))
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.val_step_context():
                plan = plan_budget(pl_module, layers, candidates, batches, policy, forward=_forward_inputs)
        finally:
            pl_module.train(was_training)
        return trainer.strategy.broadcast(plan.ranks, src=0)

    def _policy(self, value: RankLike, candidates: Mapping[str, Any]):
        if self.mode != "param_budget":
            return make_policy(**{self.mode: value})
        # the schedule's fraction is of the original dense weights; the budget policy counts the
        # layers as they are now
        dense = sum(c.view.params(None) for c in candidates.values())
        now = sum(c.view.current_params for c in candidates.values())
        fraction = float(value) * dense / max(now, 1)
        if fraction >= 1.0:
            return _Unchanged()
        return make_policy(param_budget=fraction)

    def _log(self, trainer: Trainer, pl_module: LightningModule, reports: list[LayerReport]) -> None:
        metrics: dict[str, float] = {}
        for r in reports:
            metrics[f"factorize/{r.name}/nmse"] = r.nmse
            metrics[f"factorize/{r.name}/rank"] = float(r.new_rank if r.new_rank is not None else min(r.shape))
        changed = [r.nmse for r in reports if r.changed] or [0.0]
        metrics["factorize/mean_nmse"] = sum(changed) / len(changed)
        metrics["factorize/params_kept"] = sum(r.params_after for r in reports) / max(1, sum(r.params_dense for r in reports))
        metrics["factorize/macs_kept"] = sum(r.macs_after for r in reports) / max(1, sum(r.macs_dense for r in reports))
        # identical on every rank; sync_dist only keeps Lightning from warning about epoch-level logs
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)

    # ------------------------------------------------------- state and resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "done": list(self.done),
            "ranks": dict(self.ranks),
            "history": copy.deepcopy(self.history),
            "param_groups": self._param_groups_by_name(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = list(state_dict.get("done", []))
        self.ranks = dict(state_dict.get("ranks", {}))
        self.history = list(state_dict.get("history", []))
        self._restored_groups = state_dict.get("param_groups")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pl_module = pl_module
        self._trainer = trainer
        if self._restored_groups:
            # configure_optimizers ran on the rebuilt model; put its parameters back in the saved
            # order so that the optimizer state (loaded next) lands on the right tensors
            named = dict(pl_module.named_parameters())
            if len(self._restored_groups) != len(trainer.optimizers):
                raise RuntimeError(
                    f"the checkpoint holds {len(self._restored_groups)} optimizer(s), configure_optimizers built "
                    f"{len(trainer.optimizers)}: cannot restore the optimizer state onto the factorized parameters"
                )
            for opt, groups in zip(trainer.optimizers, self._restored_groups):
                restore_param_group_order(opt, groups, named)
            self._restored_groups = None
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            late = [e for e in self.schedule if e >= max_epochs and e not in self.done]
            if late:
                rank_zero_warn(f"LowRankFactorization: milestone(s) {late} are at or after max_epochs={max_epochs}: they will not run")

    def _param_groups_by_name(self) -> Optional[list[list[list[str]]]]:
        trainer = self._trainer
        if trainer is None or self._pl_module is None or not self.done:
            return None
        return [param_group_names(opt, self._pl_module) for opt in trainer.optimizers]

    def _drop_collector(self) -> None:
        if self._collector is not None:
            self._collector.detach()
            self._collector = None
            self._collected_for = None
            self._collected_at_step = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drop_collector()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._drop_collector()  # no hook stays attached to the model after a failed fit


class _Unchanged:
    def choose(self, layers: Mapping[str, Any]) -> dict[str, Optional[int]]:
        return {name: None for name in layers}


def _forward_inputs(model: nn.Module, batch: Any) -> Any:
    """``model.forward`` on a validation batch's inputs: the first element of a tuple/list batch
    (``(x, y)``), the keyword arguments of a dict batch, or the batch itself."""
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


# ------------------------------------------------------------------ refusals
def _class_names(obj: Any) -> list[str]:
    return [k.__name__ for k in type(obj).__mro__]


def _check_strategy(strategy: Any) -> None:
    names = _class_names(strategy)
    bad = [s for s in _UNSUPPORTED_STRATEGIES if any(s.lower() in n.lower() for n in names)]
    if bad:
        raise NotImplementedError(
            f"LowRankFactorization does not support {type(strategy).__name__} yet: it shards or replicates parameters "
            "in ways that do not survive layers whose shapes change during training; use strategy='ddp' (or "
            "'ddp_spawn' / a single device)"
        )


def _check_callbacks(callbacks: list) -> None:
    copies = [type(c).__name__ for c in callbacks if set(_class_names(c)) & set(_PARAM_COPY_CALLBACKS)]
    if copies:
        raise ValueError(
            f"LowRankFactorization cannot run with {copies}: they keep copies of the parameters, whose shapes "
            "change at each milestone. Remove one of the two callbacks."
        )


def _copies_weights_back(strategy: Any) -> bool:
    """Whether the strategy trains in worker processes and copies the weights back into the main
    process's model (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``: Lightning's multiprocessing launcher)."""
    try:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    except ImportError:  # pragma: no cover - moved in some other Lightning version
        _MultiProcessingLauncher = ()  # type: ignore[assignment]
    launcher = getattr(strategy, "_launcher", None)
    if _MultiProcessingLauncher and isinstance(launcher, _MultiProcessingLauncher):
        return True
    return getattr(strategy, "_start_method", None) in ("spawn", "fork", "forkserver")


def _strategy_label(strategy: Any) -> str:
    method = getattr(strategy, "_start_method", None)
    return f"ddp_{method}" if method in ("spawn", "fork", "forkserver") else type(strategy).__name__


# ---------------------------------------------------------- swap machinery
def _snapshot(layers: Mapping[str, nn.Module]) -> dict[str, tuple[nn.Module, dict, Optional[int]]]:
    """What ``_restore`` needs to undo ``apply_ranks``: the module objects, a pair's children and rank
    (a pair is resized by giving it new children; the old ones, with their parameters, stay intact)."""
    return {name: (m, dict(m._modules), getattr(m, "_rank", None)) for name, m in layers.items()}


def _restore(root: nn.Module, snapshot: Mapping[str, tuple[nn.Module, dict, Optional[int]]]) -> None:
    for name, (module, children, rank) in snapshot.items():
        if root.get_submodule(name) is not module:
            set_submodule(root, name, module)
        if isinstance(module, (FactorizedLinear, FactorizedConv2d)):
            for child_name, child in children.items():
                setattr(module, child_name, child)
            module._rank = rank


def _rewrap_ddp(trainer: Trainer) -> None:
    """After parameters changed, rebuild the DistributedDataParallel wrapper (a collective)."""
    strategy = trainer.strategy
    if not hasattr(strategy, "configure_ddp") or not isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
        return
    old = strategy.model
    strategy.model = strategy.lightning_module
    del old
    strategy.configure_ddp()


# --------------------------------------------------------------- calibration
def _val_loaders(trainer: Trainer) -> tuple[list, list]:
    """The validation loaders exactly as Lightning's validation loop uses them (distributed sampler
    under DDP, ``limit_val_batches`` applied) and their batch limits."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.setup_data()  # idempotent: the loop reuses what it built here
    combined = getattr(val_loop, "_combined_loader", None)
    if combined is None:
        raise RuntimeError(
            "LowRankFactorization needs validation data to fit the factors: give the Trainer a val_dataloader "
            "(or a datamodule with one), define validation_step, and keep limit_val_batches > 0"
        )
    loaders = list(combined.flattened)
    limits = list(trainer.num_val_batches) or [float("inf")] * len(loaders)
    return loaders, limits


class _silenced_logging:
    """Makes ``pl_module.log`` / ``log_dict`` no-ops while calibration batches run."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.log = lambda *a, **k: None  # type: ignore[method-assign]
        self.module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]

    def __exit__(self, *exc) -> None:
        del self.module.log
        del self.module.log_dict


class _preserved_metric_states:
    """Puts every torchmetrics ``Metric`` of the module back as it was (calibration batches run
    through ``validation_step``, which may update metrics: they must not count)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list = []

    def __enter__(self) -> None:
        try:
            from torchmetrics import Metric
        except ImportError:  # pragma: no cover - torchmetrics is a dependency
            return
        for m in self.module.modules():
            if isinstance(m, Metric):
                state = {k: copy.deepcopy(v) for k, v in m.metric_state.items()}
                self.saved.append((m, state, getattr(m, "_update_count", None), getattr(m, "_computed", None)))

    def __exit__(self, *exc) -> None:
        for m, state, count, computed in self.saved:
            for k, v in state.items():
                setattr(m, k, v)
            if count is not None:
                m._update_count = count
            m._computed = computed
        self.saved.clear()


def _progress_printer(trainer: Trainer):
    def progress(i: int, n: int, name: str) -> None:
        if trainer.is_global_zero:
            rank_zero_info(f"LowRankFactorization: solving layer {i + 1}/{n} ({name})")

    return progress
