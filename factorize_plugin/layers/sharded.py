"""Layers sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): what a layer whose shape
changes needs from them, and the few torch internals that takes, each behind one helper here
(``tests/test_fsdp_internals.py`` checks them against the installed torch).

A targeted layer must be its own ``fully_shard`` unit (``fully_shard(layer, mesh=...)`` before the
parent's). Then:

- its full weight is read with ``gathered(layer)``: the public ``unshard()`` / ``reshard()``, one
  layer at a time, on every process in the same order (they are collectives);
- a new pair is sharded like the layer it replaces (``shard_like``: same mesh, mixed-precision and
  offload policies, ``reshard_after_forward``), so its gradients are reduced like any unit's;
- after a swap, ``rediscover_units`` lets the root's next forward find its units again (FSDP2
  lists them once, at the first forward, and has no public call to list them again).

A targeted layer inside a larger unit (whose parameters that unit holds) cannot be swapped: FSDP2
refuses ``fully_shard`` on a module twice, and a child swapped into a sharded parent would run as
plain tensors whose gradients are never reduced. ``check_units`` refuses that before training.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn


def _fsdp_module_type() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_unit(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to this module (it is an ``FSDPModule``)."""
    if not torch.distributed.is_available():
        return False
    return isinstance(module, _fsdp_module_type())


def is_sharded(model: nn.Module) -> bool:
    """Whether any module of ``model`` is an FSDP2 unit."""
    return torch.distributed.is_available() and any(is_unit(m) for m in model.modules())


@dataclasses.dataclass
class GatherCount:
    """How many layers this package holds gathered (unsharded) right now, and the most at once:
    the instrument behind the claim that a milestone gathers one layer's full weight at a time."""

    now: int = 0
    peak: int = 0

    def reset(self) -> None:
        self.now = self.peak = 0


GATHERED = GatherCount()


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Within the block, an FSDP2 unit's parameters are whole plain tensors (``unshard()``), and
    sharded again after it (``reshard()``, which frees them: copy what must outlive the block).
    Every process must enter it for the same modules in the same order. Other modules: nothing."""
    if not is_unit(module):
        yield
        return
    module.unshard()  # type: ignore[operator]  # FSDPModule.unshard
    GATHERED.now += 1
    GATHERED.peak = max(GATHERED.peak, GATHERED.now)
    try:
        yield
    finally:
        GATHERED.now -= 1
        module.reshard()  # type: ignore[operator]  # FSDPModule.reshard


def _state(module: nn.Module) -> Any:
    return module._get_fsdp_state()  # type: ignore[operator]  # FSDPModule's (private) state


def unit_settings(module: nn.Module) -> dict[str, Any]:
    """The ``fully_shard`` arguments of unit ``module``: ``mesh``, ``mp_policy``,
    ``offload_policy`` and ``reshard_after_forward`` (read from its FSDP state and parameter
    group: torch internals)."""
    state = _state(module)
    group = state._fsdp_param_group
    if group is None:
        raise ValueError(f"the FSDP unit {type(module).__name__} holds no parameters of its own")
    return {
        "mesh": group.mesh_info.mesh,
        "mp_policy": state._mp_policy,
        "offload_policy": group.offload_policy,
        "reshard_after_forward": group.post_forward_mesh_info is not None,
    }


def shard_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """Applies ``fully_shard`` to ``new`` with the settings of unit ``old`` (a collective);
    returns ``new``, now a unit whose parameters are this process's shards (DTensors)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(new, **unit_settings(old))
    return new


def rediscover_units(model: nn.Module) -> None:
    """After units of ``model`` were swapped, lets the root's next forward list its units again
    (FSDP2's lazy initialisation, undone on every unit: torch internals). ``model`` must hold
    the root unit. Nothing happens where ``model`` has no unit."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPStateContext

    for module in model.modules():
        if is_unit(module):
            state = _state(module)
            state._is_root = None
            state._state_ctx = FSDPStateContext()


def check_units(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """Refuses targeted ``layers`` of a sharded ``model`` that are not their own ``fully_shard``
    unit, with the line that makes them one. Nothing happens where ``model`` is not sharded.

    Raises:
        ValueError: names the layers and shows the ``fully_shard`` calls to add.
    """
    if not is_sharded(model):
        return
    inside = [name for name, m in layers.items() if not is_unit(m)]
    if inside:
        shown = "\n".join(f'    fully_shard(self.get_submodule("{name}"), mesh=mesh)' for name in inside[:4])
        more = f"\n    ... ({len(inside) - 4} more)" if len(inside) > 4 else ""
        raise ValueError(
            f"under FSDP2 every targeted layer must be its own fully_shard unit, so that its pair can be "
            f"sharded in its place; not so: {', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''}. "
            "In configure_model, before sharding their parents, add:\n" + shown + more
            + "\n(mesh: self.device_mesh['data_parallel']), or leave those layers out of the targets"
        )


__all__ = [
    "GATHERED",
    "GatherCount",
    "check_units",
    "gathered",
    "is_sharded",
    "is_unit",
    "rediscover_units",
    "shard_like",
    "unit_settings",
]
