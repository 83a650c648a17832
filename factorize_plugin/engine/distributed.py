"""The collectives of a milestone in a ``torch.distributed`` job: all-reduced statistics, or
statistics reduced to the owner of each layer (``surgery.sharding``).

The host offers an all-reduce; a reduce to one process comes from ``torch.distributed`` on the
default process group directly (``default_group_sharding``: the group Lightning's DDP strategy
initializes, and what a plain ``torch.distributed`` script uses).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..surgery.statistics.collector import ActivationCollector
from ..surgery.statistics.sharding import Sharding, default_group_sum
from .host import Host


def default_group_sharding(device: Optional[torch.device] = None) -> Sharding:
    """A ``Sharding`` over ``torch.distributed``'s default process group (initialized), with
    broadcast factors on ``device`` (default: CPU; a GPU for NCCL)."""
    import torch.distributed as dist

    def reduce_to(t: torch.Tensor, owner: int) -> torch.Tensor:
        dist.reduce(t, dst=owner, op=dist.ReduceOp.SUM)
        return t

    def broadcast_from(t: torch.Tensor, owner: int) -> torch.Tensor:
        dist.broadcast(t, src=owner)
        return t

    def all_gather(obj: Any) -> list:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    return Sharding(
        dist.get_rank(), dist.get_world_size(), default_group_sum, reduce_to, broadcast_from, all_gather,
        device=torch.device("cpu") if device is None else torch.device(device),
    )


def reduce_statistics(
    host: Host, collector: ActivationCollector, shard: bool, loads: Optional[list[float]] = None
) -> Optional[Sharding]:
    """In a distributed job, the milestone's statistics of every process summed: into each layer's owner
    (``shard``: each layer then solved once per job; returns the ``Sharding`` with its owners) or
    on every process (all-reduce; returns None: every process solves every layer). Nothing on one
    process. ``loads``: the solve work per process of the milestone's earlier passes (updated)."""
    if host.world_size <= 1:
        return None
    if not shard:
        collector.all_reduce_(host.all_reduce)  # a shared accumulator once
        return None
    sharding = default_group_sharding(host.device)
    if loads is not None:
        sharding.loads = loads
    sharding.owners = collector.reduce_to_owners_(sharding)
    return sharding
