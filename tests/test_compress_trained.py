"""``benchmarks/bench_compress_trained.py`` (issue 30, item 3: stages "compress", "recover" and
"scratch") and the trained GPT it compresses (``examples/trained_gpt.py``), through the benchmark's
dry run: a tiny GPT trained a few steps, the same code, results under a temp folder."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from benchmarks import bench_compress_trained as bench
from examples.trained_gpt import dry_run_config, load_trained_gpt
from factorize_plugin import Targets

BUDGET = ("exact_budget_params", "exact_budget_macs")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(results folder, the first run's result)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("compress_trained")
    t0 = time.perf_counter()
    result = bench.main(["--dry-run", "--out", str(out)])  # every stage
    result["_test_seconds"] = time.perf_counter() - t0
    return out, result


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


# ------------------------------------------------------------------------------ stage "recover"


def recover(result):
    return result["stages"]["recover"]


def test_the_dry_run_covers_every_stage_quickly(dry_run):
    out, result = dry_run
    assert result["_test_seconds"] < 90
    assert set(result["stages"]) == {"compress", "recover", "scratch", "inference"}
    assert result["last_run"]["stage"] == "all"
    assert (out / "compress_trained_recover.png").stat().st_size > 0
    assert result["recover_setup"] == json.loads(json.dumps(bench.dataclasses.asdict(bench.recover_setup_for(True))))


def test_every_recovery_cell_is_measured(dry_run):
    _, result = dry_run
    seeds = sorted(str(s) for s in bench.RECOVER_SEEDS)
    assert sorted(recover(result)) == sorted(bench.RECOVER_METHODS)
    assert sorted(recover(result)["dense_ft"]) == [bench.DENSE_KEY]
    for method in bench.RECOVER_METHODS[1:]:
        fractions = [0.4] if method in bench.LEVERS else bench.RECOVER_FRACTIONS  # item 4's levers: 40 % only
        assert sorted(recover(result)[method]) == sorted(str(f) for f in fractions), method
    for method, by_fraction in recover(result).items():
        for by_seed in by_fraction.values():
            assert sorted(by_seed) == seeds, method
            for cell in by_seed.values():
                steps = result["recover_setup"]["steps"]
                assert math.isfinite(cell["val_loss"]) and cell["commit"] and cell["steps"] == steps
                assert len(cell["train_loss"]) == steps, method  # one loss per optimizer step
    summary = result["summary"]["recover"]
    for f in map(str, bench.RECOVER_FRACTIONS):
        assert summary["val_loss"]["svd_ft"][f]["n"] == len(seeds)
        assert summary["goals"][f]["callback_vs_one_shot"]["per_seed"].keys() == set(seeds)


def test_every_method_trains_on_the_same_batches_given_the_seed(dry_run):
    """The SHA-256 of every training input a run saw (recorded in ``training_step``) is the same for
    every method of a seed, the compressed ones and the callback's included, and differs between seeds."""
    _, result = dry_run
    by_seed: dict[str, set] = {}
    for by_fraction in recover(result).values():
        for by_seed_cells in by_fraction.values():
            for seed, cell in by_seed_cells.items():
                by_seed.setdefault(seed, set()).add((cell["batches_seen"], cell["windows"]))
    assert all(len(hashes) == 1 for hashes in by_seed.values()), by_seed
    assert len({next(iter(h)) for h in by_seed.values()}) == len(by_seed)  # seeds draw different windows


def test_callback_cells_end_at_the_target_fraction(dry_run):
    _, result = dry_run
    keys = result["recover_setup"]["progressive_keys"]
    early = [round(k * 3 / 8) for k in keys]
    for method, milestones in (("callback_progressive", keys), ("callback_switch0", [0]),
                               ("callback_progressive_kd", keys), ("callback_progressive_early", early)):  # fmt: skip
        for f, by_seed in recover(result)[method].items():
            for cell in by_seed.values():
                history = cell["history"]
                assert [h["milestone"] for h in history] == [h["global_step"] for h in history] == milestones
                assert cell["milestones_applied"] == len(milestones)
                kept = [h["kept_fraction"] for h in history]
                assert kept == sorted(kept, reverse=True) and kept[-1] == pytest.approx(cell["kept_fraction"])
                assert float(f) - 0.05 <= cell["kept_fraction"] <= float(f) + 1e-9, (method, f)
                assert history[-1]["value"]["init_args"]["fraction"] == pytest.approx(float(f))
                assert {h["statistics"] for h in history} == {"calibration"}  # no held-out data fitted to
    progressive = next(iter(recover(result)["callback_progressive"]["0.4"].values()))["history"]
    assert [h["value"]["init_args"]["fraction"] for h in progressive] == pytest.approx([0.4 ** (1 / 3), 0.4 ** (2 / 3), 0.4])


def test_one_shot_cells_keep_their_compression(dry_run):
    _, result = dry_run
    for f in map(str, bench.RECOVER_FRACTIONS):
        for method in bench.ONE_SHOT_FT:
            compressed = cells(result)[method.removesuffix("_kd").removesuffix("_fade").removesuffix("_ft")][f]
            for cell in recover(result)[method].get(f, {}).values():
                cheaper_probe = method.startswith("exact_budget_params_ft")
                assert cell["ranks"] == compressed["ranks"] or cheaper_probe
                assert math.isfinite(cell["val_loss_before"])
        kept = {c["kept_fraction"] for c in recover(result)["exact_budget_params_ft"][f].values()}
        assert len(kept) == 1 and float(f) - 0.05 <= kept.pop() <= float(f) + 1e-9


def test_distillation_changes_the_recovery_not_the_compression(dry_run):
    """Item 4's distillation lever: the same compressed model (the same loss before) and batches as
    ``exact_budget_params_ft``, a different training loss (half of it is the KL to the dense model)."""
    _, result = dry_run
    plain, kd = recover(result)["exact_budget_params_ft"]["0.4"], recover(result)["exact_budget_params_ft_kd"]["0.4"]
    for seed in plain:
        assert kd[seed]["val_loss_before"] == plain[seed]["val_loss_before"]
        assert kd[seed]["ranks"] == plain[seed]["ranks"] and kd[seed]["batches_seen"] == plain[seed]["batches_seen"]
        assert kd[seed]["train_loss"] != plain[seed]["train_loss"]


def test_the_fading_residual_runs_and_ends(dry_run):
    """Item 4's fading dense residual: active for its steps after the one-shot compression (from step
    0) and after each of the callback's swaps, then gone: the model ends as the compressed one."""
    _, result = dry_run
    steps = result["recover_setup"]["steps"]
    fade = max(1, round(bench.FADE_SHARE * steps))
    for seed, cell in recover(result)["exact_budget_params_ft_fade"]["0.4"].items():
        assert cell["fade_steps"] == fade
        assert cell["ranks"] == recover(result)["exact_budget_params_ft"]["0.4"][seed]["ranks"]
        assert cell["train_loss"] != recover(result)["exact_budget_params_ft"]["0.4"][seed]["train_loss"]
    for cell in recover(result)["callback_progressive_fade"]["0.4"].values():
        assert cell["fade_steps"] >= fade and cell["milestones_applied"] == len(result["recover_setup"]["progressive_keys"])


def test_fading_residual_starts_as_the_dense_map():
    """Right after the swap, the pair plus the residual computes what the layer computed before."""
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(16, 12))
    pair = bench.copy.deepcopy(dense)
    bench.factorize_model(pair, [torch.randn(64, 16)], rank=3, targets=Targets(min_params=0, min_features=0), speed_guard=False)
    fade = bench.FadingResidual(["0"], (), steps=4, initial={"0": dense[0]})
    fade._step = 0
    fade._start(pair, {"0": bench.weight_matrix_of(dense[0])}, 0)
    x = torch.randn(5, 16)
    assert torch.allclose(pair(x), dense(x), atol=1e-5)
    fade._step = 4
    assert not torch.allclose(pair(x), dense(x), atol=1e-3)  # faded out: the pair alone
    fade._remove()


def test_inference_is_timed_for_each_recovered_structure(dry_run):
    _, result = dry_run
    cells = result["stages"]["inference"]
    assert set(cells) == {f"{k}_{f}" for k in ("budget", "uniform") for f in map(str, bench.RECOVER_FRACTIONS)}
    for key, cell in cells.items():
        assert cell["speedup_min"] <= cell["speedup"] <= cell["speedup_max"] and cell["dense_ms"] > 0
        assert cell["batch"][0] <= 64 and cell["threads"] == 1
    for f in map(str, bench.RECOVER_FRACTIONS):  # the budgeted structure is the recovered one-shot's
        recovered = recover(result)["callback_switch0"][f]["0"]["kept_fraction"]
        assert cells[f"budget_{f}"]["kept_fraction"] == pytest.approx(recovered)


def test_recovery_cells_resume_and_honour_the_deadline(dry_run):
    out, first = dry_run
    path = out / "compress_trained.json"
    saved = json.loads(path.read_text())
    del saved["stages"]["recover"]["callback_progressive"]["0.6"]["1"]
    del saved["stages"]["recover"]["dense_ft"][bench.DENSE_KEY]["2"]
    path.write_text(json.dumps(saved))
    late = bench.main(["--dry-run", "--out", str(out), "--stage", "recover", "--deadline", "00:00"])
    assert late["last_run"]["ran"] == []  # the deadline passed: no cell started, the others kept
    assert "1" not in recover(late)["callback_progressive"]["0.6"]
    again = bench.main(["--dry-run", "--out", str(out), "--stage", "recover"])
    assert again["last_run"]["ran"] == ["recover/dense_ft/1.0/2", "recover/callback_progressive/0.6/1"]
    for method, f, seed in (("callback_progressive", "0.6", "1"), ("dense_ft", bench.DENSE_KEY, "2")):
        new, old = recover(again)[method][f][seed], recover(first)[method][f][seed]
        assert new["val_loss"] == pytest.approx(old["val_loss"], rel=1e-6)  # deterministic
        assert new["batches_seen"] == old["batches_seen"]
    assert bench.main(["--dry-run", "--out", str(out), "--stage", "recover"])["last_run"]["ran"] == []


def test_recovery_learning_rate_schedule():
    rs = bench.RecoverSetup()
    lr = [rs.peak_lr * rs.lr_factor(s) for s in range(rs.steps)]
    assert lr[0] == pytest.approx(3e-5) and lr[rs.warmup - 1] == pytest.approx(3e-4) == lr[rs.warmup]
    assert lr[-1] == pytest.approx(3e-5) and all(a >= b for a, b in zip(lr[rs.warmup :], lr[rs.warmup + 1 :]))


def test_scratch_model_matches_the_compressed_size(dry_run):
    _, result = dry_run
    seeds = result["stages"]["scratch"]["0.4"]
    assert sorted(seeds) == ["0", "1", "2"]
    cfg = bench.setup_for(True).model
    for seed, cell in seeds.items():
        assert cell["config"]["seed"] == int(seed)
        assert cell["config"]["steps"] == cfg.steps + result["recover_setup"]["steps"]
        assert cell["params"] == bench.gpt_params(cell["width"], cfg) and cell["width"] % cfg.heads == 0
        others = [bench.gpt_params(d, cfg) for d in range(cfg.heads, cfg.dim + 1, cfg.heads)]
        assert abs(cell["params"] - cell["target_params"]) == min(abs(p - cell["target_params"]) for p in others)
        assert math.isfinite(cell["val_loss"])
    assert len({cell["val_loss"] for cell in seeds.values()}) == 3  # the seeds are different runs
    summary = result["summary"]["scratch"]["0.4"]
    best = min(cell["val_loss"] for cell in seeds.values())
    assert summary["scratch_val_loss_best"] == best
    assert summary["recovered_beat_scratch"] == {m: v < best for m, v in summary["recovered_mean"].items()}
    assert "exact_budget_params_ft" in summary["recovered_beat_scratch"]


def test_another_recovery_length_has_its_own_protocol_and_file(dry_run):
    rs = bench.recover_setup_for(False, 192)
    assert rs.steps == 192 and rs.progressive_keys == (0, 64, 128) and rs.warmup == bench.RecoverSetup().warmup
    assert bench.results_name(rs, False) == "compress_trained_192steps"
    assert bench.recover_setup_for(False, 120) == bench.RecoverSetup()
    assert bench.results_name(bench.RecoverSetup(), False) == "compress_trained"
    out, _ = dry_run
    main_file = (out / "compress_trained.json").read_text()
    longer = bench.main(["--dry-run", "--out", str(out), "--stage", "recover", "--recover-steps", "9",
                         "--fractions", "0.4", "--seeds", "0", "--methods", "exact_budget_params_ft"])  # fmt: skip
    assert longer["recover_setup"]["steps"] == 9 and longer["recover_setup"]["progressive_keys"] == [0, 3, 6]
    cell = longer["stages"]["recover"]["exact_budget_params_ft"]["0.4"]["0"]
    assert cell["steps"] == 9 and len(cell["train_loss"]) == 9
    assert (out / "compress_trained_9steps.json").exists()
    assert (out / "compress_trained.json").read_text() == main_file  # the main protocol's file is untouched


def test_the_methods_measured_before_the_state_carry_still_run_the_old_rule(dry_run):
    """``FreshState`` keeps the older cells reproducible: a refactorized pair starts with empty state,
    so the rate re-warms after each later milestone; the library's rule carries the state onto
    every new pair and needs no re-warm; ``callback_progressive_carry`` (``PairCarryRewarm``)
    carries a refactorized pair's and re-warms after every swap."""
    _, result = dry_run
    rewarms = {m: [h["rewarm_steps"] for h in recover(result)[m]["0.4"]["0"]["history"]]
               for m in ("callback_progressive", "callback_progressive_carried", "callback_progressive_carry")}  # fmt: skip
    assert rewarms["callback_progressive"][0] == 0 and all(n > 0 for n in rewarms["callback_progressive"][1:])
    assert rewarms["callback_progressive_carried"] == [0, 0, 0]  # AdamW's state carried at every swap
    assert rewarms["callback_progressive_carry"] == rewarms["callback_progressive"]
    losses = {m: recover(result)[m]["0.4"]["0"]["val_loss"] for m in rewarms}
    assert len(set(losses.values())) == 3  # three different computations
