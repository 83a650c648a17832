"""``benchmarks/bench_compress_trained.py`` (issue 30, item 3, stage "compress") and the trained GPT
it compresses (``examples/trained_gpt.py``), through the benchmark's dry run: a tiny GPT trained a
few steps, the same code, results under a temp folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import bench_compress_trained as bench
from examples.trained_gpt import dry_run_config, load_trained_gpt

BUDGET = ("exact_budget_params", "exact_budget_macs")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(results folder, the first run's result)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("compress_trained")
    return out, bench.main(["--dry-run", "--out", str(out)])


def cells(result):
    return result["stages"]["compress"]


def test_every_cell_is_measured_with_provenance(dry_run):
    out, result = dry_run
    assert sorted(cells(result)) == sorted(bench.METHODS)
    for method, by_fraction in cells(result).items():
        assert sorted(by_fraction) == sorted(str(f) for f in bench.FRACTIONS), method
        for cell in by_fraction.values():
            assert math.isfinite(cell["val_loss"]) and cell["commit"]
    assert math.isfinite(result["dense"]["val_loss"])
    saved = json.loads((out / "compress_trained.json").read_text())
    assert saved["version"]["commit"] and saved["version"]["torch"] and saved["setup"]["dry_run"] is True
    curve = json.loads((out / "trained_gpt_curve.json").read_text())
    assert curve["version"]["commit"] and len(curve["train_loss"]) == curve["steps"] == dry_run_config().steps
    assert [p["step"] for p in curve["val_curve"]][0] == 0 and curve["val_curve"][-1]["step"] == curve["steps"]


def test_exact_fit_is_not_above_svd_or_asvd_on_its_own_objective(dry_run):
    """At the same rank, per layer, on the calibration batches: the exact solver minimizes
    sum ||y - y'||^2 (bias refitted), so its NMSE there is at most weight SVD's and ASVD's. (Not
    asserted on validation loss, which a tiny, barely trained model can move either way.)"""
    _, result = dry_run
    for f in map(str, bench.FRACTIONS):
        exact = cells(result)["exact_uniform"][f]
        for other in ("svd", "asvd"):
            theirs = cells(result)[other][f]
            assert theirs["ranks"] == exact["ranks"]
            for layer, err in exact["layer_nmse"].items():
                assert err <= theirs["layer_nmse"][layer] * (1 + 1e-5) + 1e-7, (f, other, layer)
        changed = [n for n, r in exact["ranks"].items() if r is not None]
        assert changed and any(exact["layer_nmse"][n] < cells(result)["svd"][f]["layer_nmse"][n] for n in changed)


def test_measured_layer_error_is_the_solvers_own(dry_run):
    """The benchmark's per-layer NMSE (hooks on the dense model) agrees with the solver's report."""
    _, result = dry_run
    for method in ("exact_uniform", *BUDGET):
        for cell in cells(result)[method].values():
            for layer, nmse in cell["solver_nmse"].items():
                assert cell["layer_nmse"][layer] == pytest.approx(nmse, rel=1e-3, abs=1e-6), (method, layer)


def test_kept_fractions(dry_run):
    """Uniform methods keep the same weights (the rank nearest the fraction; the dry run's width 32
    moves the share ~4 % per rank); the budgets stay within theirs."""
    _, result = dry_run
    for f in bench.FRACTIONS:
        kept = {m: cells(result)[m][str(f)]["kept_fraction"] for m in bench.METHODS}
        assert kept["svd"] == kept["asvd"] == kept["exact_uniform"]
        assert abs(kept["svd"] - f) <= 0.025
        for m in BUDGET:
            assert f - 0.05 <= kept[m] <= f + 1e-9, (m, f, kept[m])


def test_a_second_run_resumes_and_a_missing_cell_is_rerun(dry_run):
    out, first = dry_run
    again = bench.main(["--dry-run", "--out", str(out)])
    assert again["last_run"]["ran"] == []
    assert cells(again) == cells(first)
    path = out / "compress_trained.json"
    saved = json.loads(path.read_text())
    del saved["stages"]["compress"]["asvd"]["0.4"]
    path.write_text(json.dumps(saved))
    third = bench.main(["--dry-run", "--out", str(out)])
    assert third["last_run"]["ran"] == ["asvd/0.4"]
    assert cells(third)["asvd"]["0.4"]["val_loss"] == cells(first)["asvd"]["0.4"]["val_loss"]  # deterministic


def test_svd_factors_reconstruct_and_are_balanced():
    torch.manual_seed(0)
    w, scale = torch.randn(12, 8), torch.rand(8) + 0.1
    for s in (None, scale):
        wa, wb = bench.svd_factors(w, 8, s)
        assert torch.allclose((wa @ wb).T, w.double(), atol=1e-10)
        assert torch.allclose(wa.norm(dim=0), wb.norm(dim=1))
    wa, wb = bench.svd_factors(w, 3)
    u, sigma, vh = torch.linalg.svd(w.double())
    assert torch.allclose((wa @ wb).T, u[:, :3] @ torch.diag(sigma[:3]) @ vh[:3], atol=1e-10)


def test_trained_gpt_is_cached_by_configuration_and_deterministic(tmp_path):
    torch.set_num_threads(1)
    config = dry_run_config()
    model, info = load_trained_gpt(config, tmp_path, progress=None)
    again, cached = load_trained_gpt(config, tmp_path, progress=None)
    assert not info["cached"] and cached["cached"] and (tmp_path / config.key() / "model.pt").exists()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert again.head.weight is again.wte.weight  # still tied after loading
    rebuilt, _ = load_trained_gpt(config, tmp_path / "other", progress=None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
    assert type(config)(**{**config.__dict__, "steps": 12}).key() != config.key()
