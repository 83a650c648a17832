"""FSDP2 (issue 31): the callback under Lightning's ``ModelParallelStrategy`` and ``factorize_model``
on a ``fully_shard``-ed model, on 2 CPU/gloo processes, against the same jobs under DDP / on one
process; and the refusals decided before training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from factorize_plugin.layers.sharded import check_units
from factorize_plugin.surgery.swap.sharded_resume import pairs_in
from factorize_plugin.surgery.timing.speed import resolve_guard
from sharded_script import free_port

HERE = Path(__file__).resolve().parent


def _run(script: str, *args: str, timeout: int = 400) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory):
    """The GPT job of tests/fsdp_script.py under FSDP2 and under DDP (2 processes each)."""
    out = tmp_path_factory.mktemp("fsdp")
    _run("fsdp_script.py", str(out), "fsdp")
    _run("fsdp_script.py", str(out), "ddp")
    return {
        (mode, r): torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for mode in ("fsdp", "ddp") for r in (0, 1)
    }


@pytest.mark.slow
def test_fsdp_job_takes_the_ddp_jobs_ranks_factors_and_weights(gpt_runs):
    f0, f1, d0 = gpt_runs["fsdp", 0], gpt_runs["fsdp", 1], gpt_runs["ddp", 0]
    assert f0["world_size"] == d0["world_size"] == 2
    assert [h["ranks"] for h in f0["history"]] == [h["ranks"] for h in d0["history"]]
    assert [h["ranks"] for h in f0["history"]] == [h["ranks"] for h in f1["history"]]
    assert any(r is not None for r in f0["history"][0]["ranks"].values())  # the first milestone changed layers
    for fa, da in zip(f0["after"], d0["after"]):
        assert fa["kinds"] == {n: "FSDP" + k for n, k in da["kinds"].items()}  # every pair is its own unit
        for name, w in da["composed"].items():
            assert _relative(fa["composed"][name], w) <= 1e-6, name
    # the new pairs' gradients were reduced across the processes: training went on as under DDP
    assert _max_diff(f0["final"], d0["final"]) <= 1e-6
    assert _max_diff(f0["final"], f1["final"]) == 0.0  # the processes' models are bit-identical


@pytest.mark.slow
def test_fsdp_memory_per_process_is_the_factorized_models_over_two(gpt_runs):
    f0, f1, d0 = gpt_runs["fsdp", 0], gpt_runs["fsdp", 1], gpt_runs["ddp", 0]
    for fa, fb, da in zip(f0["after"], f1["after"], d0["after"]):
        assert fa["param_full"] == da["param_bytes"]  # the same factorized model
        assert fa["param_bytes"] + fb["param_bytes"] == da["param_bytes"]  # split, no padding at these sizes
        assert fa["optimizer_bytes"] + fb["optimizer_bytes"] == da["optimizer_bytes"]
    assert d0["after"][-1]["optimizer_bytes"] > 0
    # the milestones gathered one layer's full weight at a time (beyond FSDP's own all-gathers)
    assert [a["gathered_peak"] for a in f0["after"]] == [1, 1, 0]  # milestones 0 and 1; none while training


@pytest.mark.slow
def test_the_memory_benchmark_reads_halves_from_these_runs(gpt_runs):
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.bench_fsdp_memory import rows

    table = rows([gpt_runs["fsdp", r] for r in (0, 1)], [gpt_runs["ddp", r] for r in (0, 1)])
    assert [r["param_ratio"] for r in table] == [0.5, 0.5, 0.5]
    assert [r["optimizer_ratio"] for r in table][1:] == [0.5, 0.5]
    assert [r["layers_gathered_at_once"] for r in table] == [1, 1, 0]


@pytest.mark.slow
def test_fsdp_resume_from_the_distributed_checkpoint_is_bit_identical(gpt_runs):
    f0, f1 = gpt_runs["fsdp", 0], gpt_runs["fsdp", 1]
    for r in (f0, f1):
        # resumed after the first milestone from a fresh dense model: the second applied once
        assert [h["milestone"] for h in r["resumed_history"]] == [0, 1]
        assert r["resumed_history"][1]["ranks"] == r["history"][1]["ranks"]
        assert _max_diff(r["resumed_final"], r["final"]) == 0.0


@pytest.mark.slow
def test_fsdp_auto_schedule_switches_alike_on_every_process(tmp_path):
    """schedule="auto" under FSDP2: the watch's stable ranks read gathered weights, the measuring
    ParamBudget probes the sharded model; both processes switch at the same epoch to the same ranks."""
    _run("fsdp_script.py", str(tmp_path), "auto")
    r0, r1 = (torch.load(tmp_path / f"auto_rank{r}.pt", weights_only=False) for r in (0, 1))
    (m0,) = [h for h in r0["history"] if h["event"] == "milestone"]
    (m1,) = [h for h in r1["history"] if h["event"] == "milestone"]
    assert m0["epoch"] == m1["epoch"] and m0["ranks"] == m1["ranks"]
    assert all(r is not None for r in m0["ranks"].values())
    assert _max_diff(r0["final"], r1["final"]) == 0.0


@pytest.mark.slow
def test_factorize_model_on_a_fully_sharded_model_matches_one_process(tmp_path):
    _run("fsdp_oneshot_script.py", str(tmp_path), str(free_port()), timeout=300)
    r0, r1 = (torch.load(tmp_path / f"oneshot_rank{r}.pt", weights_only=False) for r in (0, 1))
    ref = torch.load(tmp_path / "oneshot_reference.pt", weights_only=False)
    assert r0["first"] == r1["first"] == {"0": 16, "2": 16}
    # then a measuring ParamBudget on the sharded pairs: the one-process choice on all the batches
    assert r0["ranks"] == r1["ranks"] == ref["ranks"]
    assert all(r < 16 for r in ref["ranks"].values())
    assert r0["kinds"] == {0: "FSDPFactorizedLinear", 2: "FSDPFactorizedLinear"}
    for i, (d, m) in {0: (64, 96), 2: (96, 64)}.items():  # each process holds its part of each new pair
        r = ref["ranks"][str(i)]
        assert sum(r0["local_numel"][i]) + sum(r1["local_numel"][i]) == r * d + m * r + m
        assert abs(sum(r0["local_numel"][i]) - sum(r1["local_numel"][i])) <= d + 1  # rows split, odd ones first
    assert torch.equal(r0["output"], r1["output"])
    for i in (0, 2):  # statistics summed over the processes: the one-process fit on all batches
        assert _relative(r0["composed"][i], ref["composed"][i]) <= 1e-6
    assert float((r0["output"] - ref["output"]).abs().max()) <= 1e-5
    assert r0["gathered_peak"] == 1


def test_pairs_are_read_from_checkpoint_shapes():
    shapes = {
        "a.first.weight": (8, 32), "a.second.weight": (16, 8), "a._extra_state": (),
        "c.first.weight": (4, 3, 3, 3), "c._extra_state": (),
        "d.first.weight": (5, 7),  # no extra state: some other module's child named "first"
        "b.weight": (16, 32),
    }  # fmt: skip
    assert pairs_in(shapes) == {"a": ("linear", 8), "c": ("conv2d", 4)}


def test_a_targeted_layer_inside_a_larger_unit_is_refused_with_the_line_to_add():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        check_units(model, {"0": model[0]})  # its own unit: accepted
        with pytest.raises(ValueError, match=r'(?s)own fully_shard unit.*fully_shard\(self.get_submodule\("1.0"\)'):
            check_units(model, {"0": model[0], "1.0": model[1][0]})
    finally:
        dist.destroy_process_group()
    check_units(nn.Linear(8, 8), {"": nn.Linear(8, 8)})  # not sharded: nothing to check


def test_speed_guard_is_off_by_default_and_refused_explicitly_under_fsdp2():
    assert resolve_guard("auto", "train", scope="model", sharded=True) is None
    assert resolve_guard("auto", "train", scope="model") is not None
    assert resolve_guard(False, "train", sharded=True) is None
    with pytest.raises(ValueError, match="does not run under FSDP2.*speed_guard=False"):
        resolve_guard(True, "train", sharded=True)
