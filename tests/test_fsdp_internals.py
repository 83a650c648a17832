"""The torch internals ``factorize_plugin/layers/sharded.py`` relies on, checked against the installed
torch on a one-process gloo group (a torch release that moves them fails here, not mid-run), and
the Lightning ones of the FSDP2 resume (``lightning_internals.before_checkpoint_load``)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch import strategies

from factorize_plugin.integration.lightning_internals import before_checkpoint_load
from factorize_plugin.layers import FactorizedLinear, install_factors, weight_matrix
from factorize_plugin.layers.sharded import GATHERED, gathered, is_unit, rediscover_units, unit_settings


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_a_unit_swapped_for_a_pair_keeps_its_settings_and_the_root_finds_it(one_process_group):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float64)
    fully_shard(model[0], mesh=one_process_group, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=one_process_group)
    x = torch.randn(3, 16)
    model(x)  # the root's lazy initialisation lists its units
    settings = unit_settings(model[0])
    assert settings["mesh"] is one_process_group
    assert settings["mp_policy"] == policy and settings["reshard_after_forward"] is False

    w, b = weight_matrix(model[0])  # gathered (a copy) and sharded again
    assert w.shape == (16, 24) and not is_unit(w) and GATHERED.now == 0
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    pair = install_factors(model[0], u[:, :5] * s[:5], vt[:5], b)
    assert isinstance(pair, FactorizedLinear) and is_unit(pair) and pair is not model[0]
    assert unit_settings(pair) == settings
    model[0] = pair
    rediscover_units(model)
    root = model._get_fsdp_state()
    assert root._is_root is None and pair._get_fsdp_state()._is_root is None
    out = model(x)  # the root lists its units again, the new pair among them
    assert pair._get_fsdp_state() in root._state_ctx.all_states and root._is_root is True
    out.sum().backward()
    assert pair.first.weight.grad is not None
    with gathered(pair):
        assert GATHERED.now == 1 and type(pair.first.weight) is nn.Parameter
    assert GATHERED.now == 0 and GATHERED.peak >= 1


def test_before_checkpoint_load_runs_the_hook_first_once(tmp_path):
    strategy = strategies.ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    assert strategy.restore_checkpoint_after_setup  # the checkpoint loads after on_fit_start: the hook's window
    calls = []
    strategy.load_checkpoint = lambda path, *a, **k: calls.append(("load", path)) or {}  # type: ignore[method-assign]
    before_checkpoint_load(strategy, lambda path: calls.append(("hook", path)))
    before_checkpoint_load(strategy, lambda path: calls.append(("again", path)))  # one wrapper per strategy
    strategy.load_checkpoint(tmp_path)
    assert calls == [("hook", tmp_path), ("load", tmp_path)]
