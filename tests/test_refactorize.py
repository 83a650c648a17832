"""The one refactorization transaction and the floors it sits on."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import factorize_plugin
import factorize_plugin.surgery.swap.refactorize as refactorize_module
from factorize_plugin import FixedRank, ParamBudget, Targets, factorize_model
from factorize_plugin.layers import FactorizedLinear
from factorize_plugin.surgery.select.targets import select_layers
from factorize_plugin.surgery.statistics.collector import ActivationCollector
from factorize_plugin.surgery.swap.refactorize import refactorize


def test_plain_pytorch_use_never_imports_lightning():
    code = (
        "import sys, torch, factorize_plugin as fp\n"
        "m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))\n"
        "fp.factorize_model(m, [torch.randn(64, 32)], rank=4, speed_guard=False)\n"
        "fp.factorize_matrix(torch.randn(100, 8), torch.randn(100, 8), torch.randn(8, 8), rank=2)\n"
        "assert not [k for k in sys.modules if k == 'lightning' or k.startswith(('lightning.', 'pytorch_lightning'))]\n"
        "assert 'torchmetrics' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_public_api_lists_what_users_need_and_nothing_internal():
    public = set(factorize_plugin.__all__)
    assert {"factorize_matrix", "factorize_conv2d", "LowRankSolution", "MomentAccumulator", "decompose",
            "FactorizedLinear", "RankPolicy", "FixedRank", "MaxNMSE",
            "ParamBudget", "factorize_model", "LowRankFactorization", "enable_factorized_loading",
            "load_factorized", "load_factorized_checkpoint", "LayerReport", "format_reports"} <= public  # fmt: skip
    assert not public & {"restore_structure", "nmse_of", "resolve_rank", "ConvGeometry", "plan_budget", "make_policy",
                         "refactorize", "ActivationCollector", "select_layers"}  # fmt: skip
    for name in public:
        assert getattr(factorize_plugin, name) is not None


def _model_and_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48))
    layers = select_layers(model)
    with torch.no_grad(), ActivationCollector(layers) as col:
        model(torch.randn(256, 48))
    return model, layers, col


def test_failed_swap_leaves_model_and_optimizer_as_they_were(monkeypatch):
    model, layers, col = _model_and_stats()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 48)).sum().backward()
    opt.step()
    params_before = [list(g["params"]) for g in opt.param_groups]
    state_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    modules_before = list(model)
    real, calls = refactorize_module.install_factors, []

    def crashing(module, *factors):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real(module, *factors)

    monkeypatch.setattr(refactorize_module, "install_factors", crashing)
    with pytest.raises(RuntimeError, match="injected"):
        refactorize(model, layers, col.stats, FixedRank(4), optimizers=[opt])
    assert list(model) == modules_before and not any(isinstance(m, FactorizedLinear) for m in model)
    assert [list(g["params"]) for g in opt.param_groups] == params_before
    assert {id(p) for p in opt.state} == set(state_before)


def test_optimizer_edit_failure_rolls_the_model_back(monkeypatch):
    model, layers, col = _model_and_stats()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params_before = [list(g["params"]) for g in opt.param_groups]
    modules_before = list(model)

    def broken(self, swaps):
        raise RuntimeError("optimizer edit failed")

    monkeypatch.setattr(refactorize_module.OptimizerEdit, "replace", broken)
    with pytest.raises(RuntimeError, match="optimizer edit failed"):
        refactorize(model, layers, col.stats, FixedRank(4), optimizers=[opt])
    assert list(model) == modules_before
    assert [list(g["params"]) for g in opt.param_groups] == params_before


def test_successful_transaction_puts_every_new_parameter_in_the_optimizer_once():
    model, layers, col = _model_and_stats()
    opt = torch.optim.Adam(model.parameters())
    reports = refactorize(model, layers, col.stats, FixedRank(4), optimizers=[opt])
    assert all(r.new_rank == 4 for r in reports)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) and {id(p) for p in held} == {id(p) for p in model.parameters()}


def test_factorize_model_takes_policy_objects_like_the_shortcuts():
    batches = [torch.randn(128, 48, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    a, b = _model_and_stats()[0], _model_and_stats()[0]
    ra = factorize_model(a, batches, FixedRank(0.25), speed_guard=False, targets=Targets(min_params=0, min_features=0))
    rb = factorize_model(b, batches, rank=0.25, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert [r.new_rank for r in ra] == [r.new_rank for r in rb] == [12, 12, 12]
    with pytest.raises(ValueError, match="exactly one"):
        factorize_model(a, batches, ParamBudget(0.3), rank=4, targets=Targets(min_params=0, min_features=0))
