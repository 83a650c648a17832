"""What the engine needs from the training loop that drives it: the ``Host``.

The engine decides *what* happens at a milestone; the loop around it knows how to run an evaluation
batch, a training step, which optimizers train the model, where the model lives and how processes
talk to each other. ``Host`` is that surface. ``PlainHost`` implements it for a hand-written PyTorch
loop (``examples/plain_loop.py``); ``integration/lightning_host.py`` for a Lightning ``Trainer``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable, Optional, Protocol, Sequence, Sized

import torch
import torch.nn as nn

from ..surgery.calling import InputFn, call_model


class Host(Protocol):
    """The training loop, as the engine sees it.

    ``global_step``: optimizer steps taken so far (the unit of ``interval="step"`` schedules);
    ``epoch``: the current epoch (0-based); ``world_size`` / ``is_global_zero``: the processes of a
    ``torch.distributed`` job (1 / True alone); ``device``: where the model's batches go;
    ``optimizers``: those training the model (edited in place at a swap)."""

    epoch: int

    @property
    def global_step(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def is_global_zero(self) -> bool: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def optimizers(self) -> Sequence[torch.optim.Optimizer]: ...

    def steps_per_epoch(self) -> Optional[int]:
        """Optimizer steps per epoch (the re-warm's ``"auto"`` length), None where unknown."""

    def train_batch_size(self) -> Optional[int]:
        """The training loader's batch size (the per-layer speed check's inputs), None where unknown."""

    def evaluation_loaders(self) -> tuple[list[Iterable], list[float]]:
        """The evaluation loaders the milestone's calibration passes read, and their batch limits."""

    def to_device(self, batch: Any, loader_index: int = 0) -> Any:
        """``batch`` on ``device``."""

    def evaluation_step(self, batch: Any, index: int, loader_index: int, loaders: int) -> None:
        """Runs one evaluation batch (already on the device) through the model (no grad, eval mode:
        the engine arranges both); the engine's hooks on the layers collect what they need."""

    def eval_context(self) -> ContextManager[Any]:
        """The context an evaluation forward runs in (autocast for mixed precision, say)."""

    def training_step(self) -> Optional[Callable[[Any], Any]]:
        """A function running the model's training step's forward on a batch (its loss), timed by
        the whole-model speed check; None: the speed check times each layer alone."""

    def quiet(self) -> ContextManager[Any]:
        """Silences the loop's logging and keeps its metric states while the engine runs batches."""

    def broadcast(self, obj: Any) -> Any:
        """``obj`` of process 0 on every process."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes."""

    def log(self, metrics: dict[str, float]) -> None:
        """Records the milestone's metrics (``factorize/...``)."""

    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def after_swap(self) -> None:
        """Called on every process after each milestone's swap (rebuild a DDP wrapper, say)."""


class PlainHost:
    """A ``Host`` for a hand-written training loop.

    Args:
        model: the model being trained (the module whose layers the engine factorizes).
        optimizers: the optimizers training it.
        evaluation_batches: the batches a calibration pass runs (a list, or a loader iterated again
            at each pass); their statistics fit the factors when no evaluation was observed.
        input_fn: turns a batch into the model's input (default: a tuple/list batch's first element,
            a dict as keyword arguments, else the batch itself).
        loss_fn: ``loss_fn(model, batch) -> loss``: the training step's forward, timed by the
            whole-model speed check (default: none; the per-layer check is used).
        steps_per_epoch / batch_size: for the re-warm's ``"auto"`` length and the per-layer speed
            check's inputs.
        log: receives each milestone's metrics (default: dropped).
        on_swap: called after each milestone's swap (a ``DistributedDataParallel`` wrapper of the
            model must be rebuilt there: the layers it registered are gone).

    ``global_step`` counts the steps of ``optimizers[0]`` (a step post-hook), so the loop only sets
    ``epoch``. Inside a ``torch.distributed`` job (initialized before this is built) it uses the
    default process group: every process must drive its engine through the same calls.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        evaluation_batches: Iterable,
        *,
        input_fn: Optional[InputFn] = None,
        loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
        steps_per_epoch: Optional[int] = None,
        batch_size: Optional[int] = None,
        log: Optional[Callable[[dict[str, float]], None]] = None,
        device: Optional[torch.device] = None,
        on_swap: Optional[Callable[[], None]] = None,
    ) -> None:
        import torch.distributed as dist

        self.model, self.optimizers = model, list(optimizers)
        self._batches, self._input_fn, self._loss_fn = evaluation_batches, input_fn, loss_fn
        self._steps, self._batch_size, self._log, self._on_swap = steps_per_epoch, batch_size, log, on_swap
        first = next(iter(model.parameters()), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else
                                                                       torch.device("cpu"))  # fmt: skip
        self._distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if self._distributed else 1
        self.is_global_zero = not self._distributed or dist.get_rank() == 0
        self.global_step, self.epoch = 0, 0
        self._counter = self.optimizers[0].register_step_post_hook(self._count) if self.optimizers else None

    def _count(self, *_: Any) -> None:
        self.global_step += 1

    def steps_per_epoch(self) -> Optional[int]:
        return self._steps

    def train_batch_size(self) -> Optional[int]:
        return self._batch_size

    def evaluation_loaders(self) -> tuple[list[Iterable], list[float]]:
        return [self._batches], [len(self._batches) if isinstance(self._batches, Sized) else float("inf")]

    def to_device(self, batch: Any, loader_index: int = 0) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        return batch

    def evaluation_step(self, batch: Any, index: int, loader_index: int, loaders: int) -> None:
        call_model(self.model, batch, self._input_fn)

    def eval_context(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def training_step(self) -> Optional[Callable[[Any], Any]]:
        loss_fn = self._loss_fn
        return None if loss_fn is None else (lambda batch: loss_fn(self.model, batch))

    def quiet(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def broadcast(self, obj: Any) -> Any:
        if not self._distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def log(self, metrics: dict[str, float]) -> None:
        if self._log is not None:
            self._log(metrics)

    def info(self, message: str) -> None:
        if self.is_global_zero:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        if self.is_global_zero:
            import warnings

            warnings.warn(message, stacklevel=3)

    def after_swap(self) -> None:
        if self._on_swap is not None:
            self._on_swap()


__all__ = ["Host", "PlainHost"]
