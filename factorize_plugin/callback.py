"""The Lightning callback: progressive low-rank factorization during training.

It orchestrates and owns no math: statistics come from ``ActivationCollector``, solutions from
``planner`` (over the exact solver), swaps from ``layers``; this module decides *when*, keeps the
optimizer and DDP wrapper consistent, logs, and checkpoints its own state.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping, Optional, Union

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from .checkpoint import enable_factorized_loading, loading_enabled
from .collector import ActivationCollector
from .optim import param_group_names, replace_in_optimizer, restore_param_group_order
from .planner import LayerReport, apply_ranks, build_candidates, format_reports
from .policies import make_policy
from .targets import select_layers

log = logging.getLogger(__name__)

RankLike = Union[int, float]
Mode = Literal["rank", "max_nmse", "param_budget"]

_PARAM_COPY_CALLBACKS = ("StochasticWeightAveraging", "WeightAveraging", "EMAWeightAveraging", "EMA")
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


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
            layers' weights in total, allocated across layers).
        targets / exclude: fnmatch patterns over qualified module names (default: every Linear and
            Conv2d with at least ``min_params`` weights).
        min_params: skip smaller layers. Layers whose rank would not save multiply-adds are skipped.
        max_samples: cap on rows (tokens / output pixels) of statistics per layer and milestone.
        regularization: >= 0; moves the fit toward the plain SVD of the weights (few samples).
        verbose: print a summary table on rank zero after each milestone.
    """

    def __init__(
        self,
        schedule: Mapping[int, RankLike],
        mode: Mode = "rank",
        targets: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        min_params: int = 1024,
        max_samples: Optional[int] = 100_000,
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
        self.max_samples = max_samples
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
        self._trainer: Optional[Trainer] = None
        self._pl_module: Optional[LightningModule] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=self.schedule, mode=self.mode, targets=self.targets, exclude=self.exclude)

    # ----------------------------------------------------------------- checks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in _UNSUPPORTED_STRATEGIES):
            raise NotImplementedError(
                f"LowRankFactorization does not support {strategy} yet (it shards parameters whose shapes change); "
                "use strategy='ddp' or a single device"
            )
        copies = [type(c).__name__ for c in trainer.callbacks if type(c).__name__ in _PARAM_COPY_CALLBACKS]
        if copies:
            raise ValueError(
                f"LowRankFactorization cannot run with {copies}: they keep copies of the parameters, whose shapes "
                "change at each milestone. Remove one of the two callbacks."
            )
        if getattr(trainer.strategy, "_start_method", None) == "spawn" and not loading_enabled(pl_module):
            raise RuntimeError(
                "with strategy='ddp_spawn' the main process must be able to rebuild the factorized structure: call "
                "factorize_plugin.enable_factorized_loading(model) on the model before trainer.fit (or use "
                "strategy='ddp')"
            )
        enable_factorized_loading(pl_module)  # a resumed checkpoint rebuilds the structure before weights load
        self._target_names = list(self._select(pl_module))

    def _select(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        layers = select_layers(pl_module, self.targets, self.exclude, min_params=self.min_params)
        if not layers:
            raise ValueError(
                f"no layer to factorize in {type(pl_module).__name__}: targets={self.targets}, exclude={self.exclude}, "
                f"min_params={self.min_params} leave none; lower min_params or widen the patterns"
            )
        return layers

    def _layers(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        return {name: pl_module.get_submodule(name) for name in self._target_names}

    def _pending(self, epoch: int) -> bool:
        return epoch in self.schedule and epoch not in self.done

    # ------------------------------------------------------------- collection
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        upcoming = trainer.current_epoch + 1
        if not self._pending(upcoming):
            return
        if self._collector is not None:
            self._collector.detach()
        # a fresh collector per validation run: the last run before the milestone wins
        self._collector = ActivationCollector(self._layers(pl_module), self.max_samples).attach()
        self._collected_for = upcoming

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._collector is not None:
            self._collector.detach()

    def _calibrate(self, trainer: Trainer, pl_module: LightningModule) -> ActivationCollector:
        """Runs validation batches through the model (no logging, no grad) to collect statistics."""
        loader = _val_dataloader(trainer, pl_module)
        collector = ActivationCollector(self._layers(pl_module), self.max_samples)
        was_training = pl_module.training
        pl_module.eval()
        limit = trainer.limit_val_batches
        try:
            with collector, torch.no_grad(), _silenced_logging(pl_module):
                for i, batch in enumerate(loader):
                    if isinstance(limit, int) and i >= limit:
                        break
                    batch = trainer.strategy.batch_to_device(batch)
                    with trainer.precision_plugin.val_step_context():
                        pl_module.validation_step(batch, i)
                    if self.max_samples is not None and min(collector.samples().values()) >= self.max_samples:
                        break
        finally:
            pl_module.train(was_training)
        return collector

    # ------------------------------------------------------------------ swaps
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self._pending(epoch):
            return
        collector = self._collector if self._collected_for == epoch else None
        if collector is None:
            collector = self._calibrate(trainer, pl_module)
        self._collector, self._collected_for = None, None
        layers = self._layers(pl_module)
        stats = collector.stats
        if trainer.world_size > 1:
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
            for name in sorted(stats):  # same collectives, same order, on every rank
                stats[name].all_reduce_(reduce)
        collector.check_nonempty()

        progress = _progress_printer(trainer) if len(layers) >= 8 else None
        candidates = build_candidates(layers, stats, collector.positions, self.regularization, progress)
        ranks = make_policy(**{self.mode: self.schedule[epoch]}).choose(candidates)

        old_params = {name: list(m.parameters()) for name, m in layers.items()}
        reports = apply_ranks(pl_module, layers, candidates, ranks)
        new_params = {name: list(pl_module.get_submodule(name).parameters()) for name in layers}
        swapped = {n: (old_params[n], new_params[n]) for n in layers if list(map(id, old_params[n])) != list(map(id, new_params[n]))}
        if swapped:
            for opt in trainer.optimizers:
                replace_in_optimizer(opt, swapped.values())
            _rewrap_ddp(trainer)

        self.done.append(epoch)
        self.ranks = {r.name: r.new_rank for r in reports}
        self.history.append({"epoch": epoch, "value": self.schedule[epoch], "ranks": dict(self.ranks)})
        self._log(pl_module, reports)
        if self.verbose:
            rank_zero_info(f"LowRankFactorization, epoch {epoch} ({self.mode}={self.schedule[epoch]}):\n" + format_reports(reports))

    def _log(self, pl_module: LightningModule, reports: list[LayerReport]) -> None:
        metrics: dict[str, float] = {}
        for r in reports:
            metrics[f"factorize/{r.name}/nmse"] = r.nmse
            metrics[f"factorize/{r.name}/rank"] = float(r.new_rank if r.new_rank is not None else min(r.shape))
        changed = [r.nmse for r in reports if r.changed] or [0.0]
        metrics["factorize/mean_nmse"] = sum(changed) / len(changed)
        metrics["factorize/params_kept"] = sum(r.params_after for r in reports) / max(1, sum(_dense_params(r) for r in reports))
        metrics["factorize/macs_kept"] = sum(r.macs_after for r in reports) / max(1, sum(_dense_macs(r) for r in reports))
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)

    # ------------------------------------------------------- state and resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "done": list(self.done),
            "ranks": dict(self.ranks),
            "history": list(self.history),
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
            for opt, groups in zip(trainer.optimizers, self._restored_groups):
                restore_param_group_order(opt, groups, named)
            self._restored_groups = None

    def _param_groups_by_name(self) -> Optional[list[list[list[str]]]]:
        trainer = self._trainer
        if trainer is None or not self.done:
            return None
        return [param_group_names(opt, self._pl_module) for opt in trainer.optimizers]

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._collector is not None:
            self._collector.detach()
            self._collector = None


def _dense_params(r: LayerReport) -> int:
    return r.shape[0] * r.shape[1]


def _dense_macs(r: LayerReport) -> int:
    per_position = r.macs_before / max(r.params_before, 1)
    return round(_dense_params(r) * per_position)


def _rewrap_ddp(trainer: Trainer) -> None:
    """After parameters changed, rebuild the DistributedDataParallel wrapper (a collective)."""
    strategy = trainer.strategy
    if not hasattr(strategy, "configure_ddp") or not isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
        return
    old = strategy.model
    strategy.model = strategy.lightning_module
    del old
    strategy.configure_ddp()


def _val_dataloader(trainer: Trainer, pl_module: LightningModule):
    loaders = trainer.val_dataloaders
    if loaders is None:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        loaders = source.dataloader() if source.is_defined() else None
    if loaders is None:
        raise RuntimeError(
            "LowRankFactorization needs validation data to fit the factors: give the Trainer a val_dataloader "
            "(or a datamodule with one)"
        )
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0]
    return loaders


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


def _progress_printer(trainer: Trainer):
    def progress(i: int, n: int, name: str) -> None:
        if trainer.is_global_zero:
            rank_zero_info(f"LowRankFactorization: solving layer {i + 1}/{n} ({name})")

    return progress
