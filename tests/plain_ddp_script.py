"""The engine in a hand-written 2-process ``DistributedDataParallel`` loop on gloo (run by
tests/test_plain_loop.py): each process evaluates its own batches, the statistics are summed over
both, every process installs the same factors and the DDP wrapper is rebuilt after each swap
(``PlainHost(on_swap=...)``).

``python tests/plain_ddp_script.py OUT_DIR PORT``: writes ``OUT_DIR/rank{r}.pt`` with each process's
history, ranks and composed weights.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from factorize_plugin import FactorizationEngine, PlainHost, Targets  # noqa: E402
from factorize_plugin.layers import weight_matrix  # noqa: E402


def worker(rank: int, world: int, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial model on both processes
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    g = torch.Generator().manual_seed(10 + rank)  # each process its own data
    train = [(torch.randn(16, 48, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(6)]
    val = [(torch.randn(32, 48, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(2)]
    engine = FactorizationEngine({1: 0.5, 2: 0.25}, targets=Targets(["0", "2"], min_params=0, min_features=0), speed_guard=False, verbose=False)  # fmt: skip
    engine.setup(model)
    ddp = [DistributedDataParallel(model)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def rewrap() -> None:  # the layers DDP registered are gone after a swap
        ddp[0] = DistributedDataParallel(model)

    host = PlainHost(model, [opt], val, steps_per_epoch=len(train), on_swap=rewrap)
    for epoch in range(3):
        engine.start_epoch(host, model, epoch)
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(ddp[0](x), y).backward()
            opt.step()
            engine.end_batch()
        with engine.observing(host, model, epoch + 1), torch.no_grad():
            for x, _ in val:
                model(x)
    engine.pause()
    weights = {n: weight_matrix(model.get_submodule(n))[0] for n in ("0", "2")}
    torch.save({"history": engine.history, "ranks": engine.ranks, "weights": weights, "world": host.world_size},
               os.path.join(out, f"rank{rank}.pt"))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
