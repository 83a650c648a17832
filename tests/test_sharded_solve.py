"""Each layer solved once per job under DDP (issue 23, item 2): statistics reduced to one owner per
layer, owners balanced by shape, curves gathered, factors broadcast (``surgery/sharding.py``)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factorize_plugin.surgery.ranks.policies import ParamBudget
from factorize_plugin.surgery.statistics.sharding import Sharding, SharedSolution, assign_owners, solve_work
from factorize_plugin.surgery.swap.refactorize import refactorize

HERE = Path(__file__).resolve().parent


def test_owners_balanced_and_deterministic():
    """LPT on the shapes alone: the same assignment whatever the order the layers come in, every
    process used, and the largest load within 4/3 of the best possible (here: near-even)."""
    shapes = {f"block{i}.{p}": s for i in range(6) for p, s in [("q", (64, 64)), ("up", (64, 172)), ("down", (172, 64))]}
    work = {n: solve_work(*s) for n, s in shapes.items()}
    for world in (2, 3, 4):
        owners = assign_owners(work, world)
        assert owners == assign_owners(dict(reversed(list(work.items()))), world)  # order-free
        loads = [sum(w for n, w in work.items() if owners[n] == r) for r in range(world)]
        assert min(loads) > 0
        assert max(loads) <= 4 / 3 * max(sum(work.values()) / world, max(work.values()))
        assert max(loads) / (sum(loads) / world) <= 1.15
    # one huge layer: it gets a process of its own, the rest share the others
    owners = assign_owners({"big": 100.0, "a": 1.0, "b": 1.0, "c": 1.0}, 2)
    assert owners == {"big": 0, "a": 1, "b": 1, "c": 1}
    assert assign_owners({"x": 1.0}, 3) == {"x": 0}
    with pytest.raises(ValueError):
        assign_owners({"x": 1.0}, 0)
    # the work grows with the width cubed and is larger for the wider output side
    assert solve_work(128, 128) > 7 * solve_work(64, 64)
    assert solve_work(64, 172) > solve_work(64, 64)


def test_shared_solution_refuses_unshared_factors():
    s = SharedSolution(1, torch.linspace(1, 0, 5, dtype=torch.float64), 4, 6, True)
    assert s.max_rank == 4 and s.smallest_rank(0.5) == 2
    with pytest.raises(RuntimeError, match="process 1"):
        s.factors(2)


def _one_process_sharding() -> Sharding:
    return Sharding(0, 1, lambda t: t, lambda t, owner: t, lambda t, owner: t, lambda obj: [obj])


def test_one_process_sharding_is_the_unsharded_path():
    """The sharded plumbing with a group of one (every collective the identity): the same ranks,
    reports and weights as the plain path."""
    from sharded_script import LAYERS, Net, collect

    torch.manual_seed(0)
    base = Net()
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(3))
    policy = ParamBudget(0.4, sensitivity=False)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    c1, c2 = collect(m1, x), collect(m2, x)
    c1.all_reduce_(lambda t: t)  # as under DDP: re-centered on the (here: own) global mean
    r1 = refactorize(m1, {n: m1.get_submodule(n) for n in LAYERS}, c1.stats, policy, positions=c1.positions)
    sharding = _one_process_sharding()
    sharding.owners = c2.reduce_to_owners_(sharding)
    assert sharding.owners == dict.fromkeys(LAYERS, 0)
    r2 = refactorize(
        m2, {n: m2.get_submodule(n) for n in LAYERS}, c2.stats, policy, positions=c2.positions, agree=lambda r: r,
        sharding=sharding,
    )
    assert [(r.name, r.new_rank, r.nmse, r.samples) for r in r1] == [(r.name, r.new_rank, r.nmse, r.samples) for r in r2]
    assert sorted(sharding.solved) == sorted(LAYERS) and sharding.solve_seconds > 0
    s1, s2 = m1.state_dict(), m2.state_dict()
    for k, v in s1.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, s2[k]), k
    with pytest.raises(ValueError, match="agree"):
        refactorize(m2, {n: m2.get_submodule(n) for n in LAYERS}, c2.stats, policy, sharding=sharding)


@pytest.mark.slow
def test_two_processes_each_layer_solved_once(tmp_path):
    """2 gloo processes: the sharded path against today's all-reduce path, three policies."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_script.py"), str(tmp_path)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for label in ("fixed", "max_nmse", "budget"):
        a, b = r0[label], r1[label]
        # (a) the same ranks and reports everywhere, as today's path chose them
        assert a["ranks_sharded"] == b["ranks_sharded"] == a["ranks_all"] == b["ranks_all"], label
        assert any(r is not None for r in a["ranks_all"].values())
        assert a["nmse_sharded"] == b["nmse_sharded"]
        assert a["nmse_sharded"] == pytest.approx(a["nmse_all"], rel=1e-9, abs=1e-15)
        assert a["samples_sharded"] == b["samples_sharded"] == a["samples_all"] == dict.fromkeys(a["owners"], 600)
        # ... factors bit-identical on both processes and equal to today's to 1e-9 relative
        for k, v in a["weights_sharded"].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.equal(v, b["weights_sharded"][k]), (label, k)
                ref = a["weights_all"][k]
                assert float((v - ref).norm()) <= 1e-9 * float(ref.norm()), (label, k)
        # (b) every layer solved exactly once in the job, by its owner; today's path: by everyone
        owners = a["owners"]
        assert owners == b["owners"] and set(owners.values()) == {0, 1}
        assert owners["q"] == owners["k"]  # one shared accumulator: one owner
        assert a["calls_all"] == b["calls_all"] == len(owners)
        for r, res in ((0, a), (1, b)):
            mine = sorted(n for n, o in owners.items() if o == r)
            assert sorted(res["solved"]) == mine and res["calls_sharded"] == len(mine)
        # (d) after the reduce each process holds the statistics of its own layers only
        for r, res in ((0, a), (1, b)):
            for n, o in owners.items():
                assert res["bytes_before"][n] > 0
                if o == r:
                    assert res["bytes_after"][n] == res["bytes_before"][n] and res["allocated"][n], (label, n)
                else:
                    assert res["bytes_after"][n] == 0 and not res["allocated"][n], (label, n)
            assert res["samples_after_reduce"] == dict.fromkeys(owners, 600)  # the union's rows, everywhere
        assert a["bytes_held"] + b["bytes_held"] == sum(
            a["bytes_before"][n] for n in owners if n != "k"  # q and k: one accumulator
        )


def test_reduce_statistics_without_sharding():
    """The callback's helper: nothing on one process; the all-reduce (every process solves every
    layer) when the policy probes the model at trial ranks (``shard=False``)."""
    from types import SimpleNamespace

    from factorize_plugin.engine.distributed import reduce_statistics

    seen = []

    class Collector:
        def all_reduce_(self, sum_fn):
            seen.append(sum_fn(torch.ones(2)))

        def reduce_to_owners_(self, sharding):  # needs a process group: not reached here
            raise AssertionError("not sharded")

    double = lambda t: 2 * t  # noqa: E731
    assert reduce_statistics(SimpleNamespace(world_size=1, all_reduce=double), Collector(), shard=True) is None
    assert not seen
    assert reduce_statistics(SimpleNamespace(world_size=2, all_reduce=double), Collector(), shard=False) is None
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((2,), 2.0))
