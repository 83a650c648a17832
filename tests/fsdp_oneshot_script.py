"""``factorize_model`` on a model sharded by FSDP2 (``fully_shard``) in a 2-process gloo job, and
the same calls on one process over both processes' batches (a uniform rank, then a
``ParamBudget`` that measures the output, on the pairs the first call made) (run by tests/test_fsdp.py).

``python tests/fsdp_oneshot_script.py OUT_DIR PORT``: writes ``OUT_DIR/oneshot.pt`` with each
process's ranks, output on a fixed input and composed weights, and the single-process reference's.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402

from factorize_plugin import Targets, factorize_model  # noqa: E402
from factorize_plugin.layers import weight_matrix  # noqa: E402
from factorize_plugin.layers.sharded import GATHERED  # noqa: E402

LAYERS = (0, 2)


def make() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 8))


def batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(32, 64, generator=g) for _ in range(3)]


def probe_input() -> torch.Tensor:
    return torch.randn(5, 64, generator=torch.Generator().manual_seed(7))


def worker(rank: int, world: int, out: str, port: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, mesh = make(), init_device_mesh("cpu", (world,))
    for i in LAYERS:
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    reports = factorize_model(model, batches(rank), rank=16, targets=Targets(min_features=16))  # speed_guard "auto": off here
    first = {r.name: r.new_rank for r in reports}
    # again on the sharded pairs, with ranks chosen by their measured effect on the output
    reports = factorize_model(model, batches(rank), param_budget=0.2, targets=Targets(min_features=16))
    result = {
        "first": first,
        "ranks": {r.name: r.new_rank for r in reports},
        "kinds": {i: type(model[i]).__name__ for i in LAYERS},
        "output": model(probe_input()).detach(),
        "composed": {i: weight_matrix(model[i])[0] for i in LAYERS},
        "gathered_peak": GATHERED.peak,
        "local_numel": {i: [p.to_local().numel() for p in model[i].parameters()] for i in LAYERS},
    }
    torch.save(result, os.path.join(out, f"oneshot_rank{rank}.pt"))
    dist.destroy_process_group()


def main(out: str, port: str) -> None:
    mp.spawn(worker, args=(2, out, port), nprocs=2)
    reference = make()
    factorize_model(reference, batches(0) + batches(1), rank=16, targets=Targets(min_features=16), speed_guard=False)
    reports = factorize_model(reference, batches(0) + batches(1), param_budget=0.2, targets=Targets(min_features=16), speed_guard=False)
    torch.save({
        "ranks": {r.name: r.new_rank for r in reports},
        "output": reference(probe_input()).detach(),
        "composed": {i: weight_matrix(reference[i])[0] for i in LAYERS},
    }, os.path.join(out, "oneshot_reference.pt"))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
