"""Two gloo processes on the CPU, plain ``torch.distributed`` (run by tests/test_sharded_solve.py).

``python tests/sharded_script.py OUT_DIR``: spawns 2 processes; each collects statistics of a tiny
model on its own rows, then refactorizes two copies: (1) today's path (statistics all-reduced,
every process solves every layer) and (2) the sharded one (statistics reduced to each layer's
owner, which alone solves it; curves gathered, factors broadcast), for three policies. Each
process writes ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import copy
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import factorize_plugin.surgery.swap.refactorize as refactorize_module
from factorize_plugin.engine.distributed import default_group_sharding
from factorize_plugin.surgery.ranks.policies import FixedRank, MaxNMSE, ParamBudget
from factorize_plugin.surgery.statistics.collector import ActivationCollector

LAYERS = ("a", "q", "k", "b", "c")


class Net(nn.Module):
    """a: M > D (input statistics); q and k read the same input (one shared accumulator), k has no
    bias; b and c have fewer outputs than inputs (projected statistics with space="auto")."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 40)
        self.q = nn.Linear(40, 48)
        self.k = nn.Linear(40, 48, bias=False)
        self.b = nn.Linear(48, 8)
        self.c = nn.Linear(40, 30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(torch.tanh(self.q(h) * self.k(h))) + self.c(h)[:, :8]


def collect(model: Net, x: torch.Tensor) -> ActivationCollector:
    layers = {n: model.get_submodule(n) for n in LAYERS}
    collector = ActivationCollector(layers, max_samples=None, space="auto", holdout=False)
    with torch.no_grad(), collector:
        for chunk in x.split(50):
            model(chunk)
    return collector


def worker(rank: int, world: int, out: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    base = Net()
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(100 + rank))
    calls: list = []
    real = refactorize_module.decompose

    def spy(stats, *args, **kwargs):
        calls.append(stats.in_features)
        return real(stats, *args, **kwargs)

    refactorize_module.decompose = spy

    def agree(ranks):
        box = [ranks]
        dist.broadcast_object_list(box, src=0)
        return box[0]


    result: dict = {"rank": rank}
    for label, policy in [("fixed", FixedRank(0.5)), ("max_nmse", MaxNMSE(0.02)), ("budget", ParamBudget(0.4, sensitivity=False))]:
        # today's path: all-reduce, every process solves every layer
        m1 = copy.deepcopy(base)
        c1 = collect(m1, x)
        c1.all_reduce_(default_group_sharding().all_sum)
        calls.clear()
        reports1 = refactorize_module.refactorize(
            m1, {n: m1.get_submodule(n) for n in LAYERS}, c1.stats, policy, positions=c1.positions, agree=agree
        )
        calls_all = len(calls)
        # sharded
        m2 = copy.deepcopy(base)
        c2 = collect(m2, x)
        before = {n: c2.statistics_bytes_of([n]) for n in LAYERS}
        sharding = default_group_sharding()
        sharding.owners = c2.reduce_to_owners_(sharding)
        after = {n: c2.statistics_bytes_of([n]) for n in LAYERS}
        held = c2.statistics_bytes_of(LAYERS)
        allocated = {n: c2._stats[c2._stream[n]].allocated for n in LAYERS}
        calls.clear()
        reports2 = refactorize_module.refactorize(
            m2, {n: m2.get_submodule(n) for n in LAYERS}, c2.stats, policy, positions=c2.positions, agree=agree,
            sharding=sharding,
        )
        result[label] = {
            "ranks_all": {r.name: r.new_rank for r in reports1},
            "ranks_sharded": {r.name: r.new_rank for r in reports2},
            "nmse_all": {r.name: r.nmse for r in reports1},
            "nmse_sharded": {r.name: r.nmse for r in reports2},
            "samples_all": {r.name: r.samples for r in reports1},
            "samples_sharded": {r.name: r.samples for r in reports2},
            "weights_all": {k: v.detach().clone() for k, v in m1.state_dict().items()},
            "weights_sharded": {k: v.detach().clone() for k, v in m2.state_dict().items()},
            "calls_all": calls_all,
            "calls_sharded": len(calls),
            "solved": list(sharding.solved),
            "owners": dict(sharding.owners),
            "bytes_before": before,
            "bytes_after": after,
            "bytes_held": held,
            "allocated": allocated,
            "samples_after_reduce": c2.samples(),
        }
    refactorize_module.decompose = real
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1], free_port()), nprocs=2, join=True)
