"""The few private Lightning internals the callback relies on, each behind one small helper.

``tests/test_lightning_internals.py`` checks every one of them against the installed Lightning,
so that a Lightning release that moves them fails loudly there rather than deep inside a run.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, cast

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer

if TYPE_CHECKING:
    from lightning.pytorch.loops.progress import _ProcessedTracker


def validation_loaders(trainer: Trainer) -> tuple[list, list]:
    """The validation loaders exactly as Lightning's validation loop uses them (distributed sampler
    under DDP, ``limit_val_batches`` applied) and their batch limits. Uses the fit loop's private
    ``val_loop.setup_data()`` (idempotent: the loop reuses what it built) and ``_combined_loader``."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.setup_data()
    combined = getattr(val_loop, "_combined_loader", None)
    if combined is None:
        raise RuntimeError(
            "LowRankFactorization needs validation data to fit the factors: give the Trainer a val_dataloader "
            "(or a datamodule with one), define validation_step, and keep limit_val_batches > 0"
        )
    loaders = list(combined.flattened)
    limits = list(trainer.num_val_batches) or [float("inf")] * len(loaders)
    return loaders, limits


def validation_source_defined(trainer: Trainer) -> bool | None:
    """Whether the fit got validation data (``val_dataloaders``, the model's or the datamodule's
    ``val_dataloader``), None if Lightning does not say. Reads the fit loop's private
    ``val_loop._data_source``; usable from ``Callback.setup``, before the loaders are built."""
    source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
    return None if source is None else bool(source.is_defined())


def start_method(strategy: Any) -> str | None:
    """How the strategy starts its worker processes when Lightning's multiprocessing launcher
    copies the trained weights back into the main process (``"spawn"``, ``"fork"``,
    ``"forkserver"``: ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``), else None. Reads the
    private ``_launcher`` / ``_start_method`` of the strategy."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(strategy, "_launcher", None)
    method = getattr(strategy, "_start_method", None)
    if isinstance(launcher, _MultiProcessingLauncher):
        return getattr(launcher, "_start_method", method) or "spawn"
    return method if method in ("spawn", "fork", "forkserver") else None


class silenced_logging:
    """Makes ``pl_module.log`` / ``log_dict`` no-ops while the callback runs validation batches itself."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.log = lambda *a, **k: None  # type: ignore[method-assign]
        self.module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]

    def __exit__(self, *exc) -> None:
        del self.module.log
        del self.module.log_dict


class preserved_metric_states:
    """Puts every torchmetrics ``Metric`` of the module back as it was (batches the callback runs
    through ``validation_step`` may update metrics: they must not count). Uses the metrics'
    ``metric_state`` and the private ``_update_count`` / ``_computed``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list = []

    def __enter__(self) -> None:
        from torchmetrics import Metric

        for m in self.module.modules():
            if isinstance(m, Metric):
                state = {k: copy.deepcopy(v) for k, v in m.metric_state.items()}
                self.saved.append((m, state, m._update_count, m._computed))

    def __exit__(self, *exc) -> None:
        for m, state, count, computed in self.saved:
            for k, v in state.items():
                setattr(m, k, v)
            m._update_count = count
            m._computed = computed
        self.saved.clear()


def check_strategy(strategy: Any) -> None:
    """Refuses, before training, a strategy that shards or replicates parameters in ways a layer
    whose shape changes mid-training does not survive. Accepted: ``SingleDeviceStrategy``,
    ``DDPStrategy`` (``ddp``, ``ddp_spawn``, ``ddp_fork``, ...) instances except DeepSpeed (a
    ``DDPStrategy`` subclass), and ``ModelParallelStrategy`` (FSDP2) with a data-parallel mesh
    only; refused by ``isinstance``, each with the alternative: FSDP1, DeepSpeed, tensor
    parallelism, XLA, and anything else. Call it after the strategy's ``setup_environment`` (the
    callback's ``setup``): the mesh is read then."""
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
        SingleDeviceXLAStrategy,
        XLAStrategy,
    )

    name = type(strategy).__name__
    if isinstance(strategy, ModelParallelStrategy):
        tensor_parallel = tensor_parallel_size(strategy)
        if tensor_parallel > 1:
            raise NotImplementedError(
                f"LowRankFactorization does not support tensor parallelism (ModelParallelStrategy with a "
                f"'tensor_parallel' mesh dimension of size {tensor_parallel}): a layer split across processes "
                "cannot be solved or swapped one layer at a time. Shard the data-parallel way only: "
                "ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1) with fully_shard "
                "(FSDP2) in configure_model"
            )
        return
    alternatives = {
        FSDPStrategy: "FSDP1 (FSDPStrategy) wraps parameters in flat buffers a changed layer shape breaks: use "
        "FSDP2, ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1) with fully_shard "
        "in configure_model (each targeted layer its own unit), or strategy='ddp'",
        DeepSpeedStrategy: "DeepSpeed's engine owns the parameters and their optimizer partitions, which a swapped "
        "layer cannot join: use FSDP2 (ModelParallelStrategy(data_parallel_size=<processes>, "
        "tensor_parallel_size=1) with fully_shard in configure_model) or strategy='ddp'",
    }
    for cls, message in alternatives.items():
        if isinstance(strategy, cls):
            raise NotImplementedError(f"LowRankFactorization does not support {name}: {message}")
    xla = (XLAStrategy, SingleDeviceXLAStrategy)  # subclasses of the DDP / single-device strategies
    if isinstance(strategy, xla) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise NotImplementedError(
            f"LowRankFactorization does not support {name}: it shards or replicates parameters in ways that do not "
            "survive layers whose shapes change during training; use strategy='ddp' (or 'ddp_spawn' / a single "
            "device), or FSDP2 through ModelParallelStrategy"
        )


def is_fsdp2(strategy: Any) -> bool:
    """Whether the strategy is Lightning's ``ModelParallelStrategy`` (FSDP2 in ``configure_model``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def tensor_parallel_size(strategy: Any) -> int:
    """The size of a ``ModelParallelStrategy``'s ``tensor_parallel`` mesh dimension (its public
    ``device_mesh``, set up by ``setup_environment``; the private ``_tensor_parallel_size`` before)."""
    try:
        return int(strategy.device_mesh["tensor_parallel"].size())
    except (AssertionError, AttributeError, RuntimeError, KeyError, TypeError):
        size = getattr(strategy, "_tensor_parallel_size", 1)
        return int(size) if isinstance(size, int) else 1


def distributed_checkpoint_shapes(path: Any) -> dict[str, tuple[int, ...]]:
    """The model's tensors in a distributed checkpoint Lightning's ``ModelParallelStrategy`` wrote
    (a directory): state-dict key -> shape, from the checkpoint's metadata alone (no tensor read).
    Lightning stores the model's state under ``state_dict.``; an empty dict where ``path`` is not
    such a directory."""
    from pathlib import Path

    from torch.distributed.checkpoint import FileSystemReader

    if path is None or not Path(path).is_dir() or not (Path(path) / ".metadata").is_file():
        return {}
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = "state_dict."
    return {
        key[len(prefix):]: tuple(getattr(value, "size", ()))
        for key, value in metadata.items() if key.startswith(prefix)
    }


def before_checkpoint_load(strategy: Any, hook: Callable[[Any], object]) -> None:
    """Makes ``strategy.load_checkpoint(path, ...)`` call ``hook(path)`` first (once per strategy
    object). ``ModelParallelStrategy`` loads a checkpoint into the live sharded model after
    ``on_fit_start`` with no hook in between, and the path is not public before that load
    (``trainer.ckpt_path`` is set inside it): wrapping the strategy's own method is the one way in."""
    if getattr(strategy.load_checkpoint, "_factorize_plugin_hook", False):
        return
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        hook(checkpoint_path)
        return original(checkpoint_path, *args, **kwargs)

    load_checkpoint._factorize_plugin_hook = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint


def rewrap_ddp(trainer: Trainer) -> None:
    """After parameters changed, rebuilds the ``DistributedDataParallel`` wrapper (a collective: every
    rank must call it). Assigns ``strategy.model`` back to the LightningModule and calls the
    strategy's ``configure_ddp()`` (public names, but their use to re-wrap mid-fit is Lightning
    internals). Does nothing where the model is not wrapped in DDP."""
    strategy = trainer.strategy
    ddp = torch.nn.parallel.DistributedDataParallel
    if not hasattr(strategy, "configure_ddp") or not isinstance(strategy.model, ddp):
        return
    old = strategy.model
    strategy.model = strategy.lightning_module
    del old
    strategy.configure_ddp()


def training_position(trainer: Trainer) -> tuple[int, int]:
    """(the epoch training goes on in, batches of it already trained) at ``on_train_start``.

    ``trainer.current_epoch`` does not say it after a resume: a checkpoint written at an epoch's end
    restarts with ``current_epoch`` still on the finished epoch. The fit loop's epoch progress does:
    ``processed`` counts epochs that ran to their end (the next one to train), and an epoch
    ``started`` but not ``processed`` is one resumed mid-way (or whose checkpoint came from its
    validation run), with ``batch_progress.current.processed`` of its batches already trained
    (``processed``, not ``completed``: a checkpoint written in ``on_train_batch_end`` holds its
    batch as processed, and the restarting loop counts it done). A fresh run: (0, 0)."""
    # the fit loop's progress trackers count processed items (Lightning types them as the base tracker)
    progress = cast("_ProcessedTracker", trainer.fit_loop.epoch_progress.current)
    epoch = progress.processed
    if progress.started > progress.processed:
        batches = cast("_ProcessedTracker", trainer.fit_loop.epoch_loop.batch_progress.current)
        return epoch, int(batches.processed)
    return epoch, 0
