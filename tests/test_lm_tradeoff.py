"""The whole-standard-library corpus and the LM trade-off benchmark (issue 21)."""

import json
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

import pytest

from benchmarks.bench_lm_tradeoff import config, macs_per_token, matching_dim, methods
from examples.gpt_task import GPTTask, stdlib_corpus, stdlib_tree

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_tree_is_split_by_whole_files_deterministically_and_read_once():
    train, val = stdlib_tree()
    assert stdlib_tree() is stdlib_tree()  # cached: read once per process
    assert len(train) > 10_000_000 and 0.05 < len(val) / (len(train) + len(val)) < 0.2
    root = Path(sysconfig.get_paths()["stdlib"])
    train_bytes, val_bytes = train.numpy().tobytes(), val.numpy().tobytes()
    files = [p for p in sorted(root.rglob("*.py")) if p.stat().st_size > 2000 and "site-packages" not in p.parts][::97]
    assert any(p.relative_to(root).parts[0] == "test" for p in files) and any(len(p.relative_to(root).parts) > 1 for p in files)
    for path in files:  # each file whole, on the side its path's CRC-32 says
        held_out = zlib.crc32(path.relative_to(root).as_posix().encode()) < 10 * 2**32 // 100
        data = path.read_bytes()
        assert (data in val_bytes) == held_out and (data in train_bytes) != held_out, path
    installed = next((p for p in (root / "site-packages").rglob("*.py") if p.stat().st_size > 2000), None)
    assert installed is None or installed.read_bytes() not in train_bytes + val_bytes  # third-party code left out
    no_test, _ = stdlib_tree(include_test=False)
    assert len(no_test) < 0.7 * len(train)
    small_train, small_val = stdlib_corpus(400_000)  # the old top-level corpus, still there for the older benchmarks
    assert 300_000 < len(small_train) + len(small_val) < 500_000
    with pytest.raises(ValueError, match=r"corpus=\.\.\.\) must be one of"):
        GPTTask(corpus="stdlib")


def test_benchmark_lengths_read_no_training_byte_twice():
    """What keeps the models out of the memorizing regime: the CPU and the GPU configurations'
    runs read fewer training tokens than the training text holds (the 4 MB top-level corpus had
    the GPU run read it 3x in 1,600 steps)."""
    train, _ = stdlib_tree()
    for gpu in (False, True):
        cfg = config(gpu, dry_run=False, steps=None)
        m = cfg["model"]
        tokens = cfg["steps"] * m["batch_size"] * m["block"]
        assert m["corpus"] == "full" and tokens < len(train), (gpu, tokens, len(train))


def test_smaller_dense_model_matches_the_factorized_multiply_adds():
    for gpu in (False, True):
        m = config(gpu, dry_run=False, steps=None)["model"]
        d = matching_dim(m, 0.25)
        assert d % m["heads"] == 0 and d < m["dim"]
        target = macs_per_token(m["dim"], m["layers"], m["block"], 0.25)
        assert abs(macs_per_token(d, m["layers"], m["block"]) / target - 1) < 0.05
    names = [x.name for x in methods(config(False, dry_run=False, steps=None))]
    assert names[:3] == ["dense", "init_0.25", "small_dense_d152"]


def _synthetic_result() -> dict:
    """Runs with only what planning and the summary read: two dense lengths (time = 20 + 0.8 x steps),
    the smaller model's full run (time = 10 + 0.35 x steps) and three callback rows."""

    def r(kind, steps, t, loss):
        return {"kind": kind, "steps": steps, "fit_cpu_seconds": t, "fit_seconds": t, "final_val_loss": loss, "macs_per_token": 1.0,
                "curve": [{"cpu_seconds": t, "seconds": t, "step": steps, "val_loss": loss}]}  # fmt: skip

    runs = {"dense": r("dense", 240, 212.0, 2.3), "dense_120": r("dense_compressed", 120, 116.0, 2.6),
            "small_dense_d152": r("small_dense", 240, 94.0, 2.4),
            "callback_early_1:0.25": r("callback", 240, 136.0, 2.39), "callback_budget_macs_1:0.25": r("callback", 240, 137.0, 2.37),
            "callback_auto": r("callback", 240, 213.0, 2.33)}  # fmt: skip
    return {"setup": {"time_axis": "cpu_seconds"}, "runs": {"0": runs}}


def test_small_dense_plan_matches_each_callback_time_with_a_fixed_per_run_cost():
    from benchmarks.bench_lm_tradeoff import fixed_share, small_dense_plan

    result = _synthetic_result()
    assert fixed_share(result, "cpu_seconds") == pytest.approx(20 / 212)
    cfg = {**config(False, dry_run=False, steps=None), "small_for": None}
    plan = small_dense_plan(result, cfg)
    fixed = 20 / 212 * 94
    expect = {round((t - fixed) / ((94 - fixed) / 240) / 6) * 6 for t in (136.5, 213.0)}  # rows 1 % apart share a run
    assert set(plan) == expect and all(s % cfg["epochs"] == 0 and s > 240 for s in plan)
    assert sorted(plan.values()) == [["callback_auto"], ["callback_early_1:0.25", "callback_budget_macs_1:0.25"]]
    assert small_dense_plan(result, {**cfg, "small_for": ["callback_auto"]}) == {max(expect): ["callback_auto"]}


def test_summary_reads_the_small_dense_curve_at_each_callback_time():
    from benchmarks.bench_lm_tradeoff import summarize

    result = _synthetic_result()
    runs = result["runs"]["0"]
    runs["small_dense_d152_360"] = {**runs["small_dense_d152"], "kind": "small_dense_equal_time", "steps": 360,
                                    "fit_cpu_seconds": 156.0, "final_val_loss": 2.30}  # fmt: skip
    methods = summarize(result)["methods"]
    early = methods["callback_early_1:0.25"]  # 136 s: 2/3 of the way from 94 s (2.4) to 156 s (2.3)
    assert early["mean_small_dense_at_equal_time"] == pytest.approx(2.4 - 0.1 * 42 / 62)
    assert early["mean_loss_vs_small_dense_equal_time"] == pytest.approx(2.39 / early["mean_small_dense_at_equal_time"] - 1)
    assert early["mean_small_dense_equal_time_outside_range"] == 0
    auto = methods["callback_auto"]  # slower than the longest run: compared with it (it had less time)
    assert auto["mean_small_dense_at_equal_time"] == 2.30 and auto["mean_small_dense_equal_time_outside_range"] == 1
    assert "small_dense_at_equal_time" not in methods["dense"]["seeds"]["0"]


@pytest.mark.slow
def test_cpu_configuration_dense_validation_loss_falls_at_every_validation_run():
    """The benchmark's CPU configuration (4 layers, width 256, the whole standard library) on a
    shortened run: dense validation loss goes down at every validation run (no memorization)."""
    import torch

    from examples.gpt_train import run

    torch.set_num_threads(1)
    cfg = config(False, dry_run=False, steps=None)
    r = run(None, steps=cfg["steps"] // 2, epochs=4, model=cfg["model"])
    losses = [p["val_loss"] for p in r["curve"]]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < min(3.2, losses[0] - 0.1), losses  # below the ~3.3-nat plateau of byte frequencies alone


@pytest.mark.slow  # ~50 s on an idle core: 17 tiny fits
def test_tradeoff_dry_run_records_every_method_and_a_fair_compressed_dense(tmp_path):
    """--dry-run --gpu: the GPU configuration's code (bf16-mixed, the budget) on a tiny CPU model.
    Every method of the table ran; dense compressed to the others' times ran fewer steps with the
    same number of validation runs; factorized at init was given the best callback's time; the
    smaller dense model trained longer for the callback rows' times and rerun (the session's time
    scale); every run carries wall-clock and CPU time; the summary compares at equal time; the PNG
    is written."""
    bench = ROOT / "benchmarks" / "bench_lm_tradeoff.py"
    args = [sys.executable, str(bench), "--dry-run", "--gpu", "--seeds", "0", "--rerun", "small_dense_d20", "--out", str(tmp_path)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "lm_tradeoff_gpu_dry_run.json").read_text())
    assert (tmp_path / "lm_tradeoff_gpu_dry_run.png").stat().st_size > 0
    assert result["setup"]["trainer"]["precision"] == "bf16-mixed" and result["setup"]["time_axis"] == "seconds"
    runs = result["runs"]["0"]
    table = [m["name"] for m in result["setup"]["methods"]]
    assert set(table) <= set(runs) and not result["skipped"] and not result["errors"]
    compressed = [r for r in runs.values() if r["kind"] == "dense_compressed"]
    assert compressed and all(r["steps"] < runs["dense"]["steps"] for r in compressed)
    assert all(len(r["curve"]) == len(runs["dense"]["curve"]) for r in compressed)
    assert runs[runs["init_equal_time"]["matched_to"]]["kind"] == "callback"
    assert all(r["fit_cpu_seconds"] > 0 and r["fit_seconds"] > 0 for r in runs.values())
    small = next(r for r in runs.values() if r["kind"] == "small_dense")
    assert small["macs_per_token"] < runs["dense"]["macs_per_token"]
    summary = result["summary"]
    assert summary["goals"]["best_callback"] in runs and "equal_steps" in summary["goals"]
    assert summary["methods"]["dense"]["mean_loss_vs_dense_equal_steps"] == 0
    # issue 30 item 5: the smaller dense model trained longer (its LR schedule stretched, the same
    # validation runs) for the callback rows' times; every callback row read against its curve
    longer = {k: r for k, r in runs.items() if r["kind"] == "small_dense_equal_time"}
    assert longer and all(k == f"{small['method']}_{r['steps']}" and r["steps"] > small["steps"] for k, r in longer.items())
    assert all(len(r["curve"]) == len(small["curve"]) and r["model_kwargs"] == small["model_kwargs"] for r in longer.values())
    assert all(runs[row]["kind"] == "callback" for r in longer.values() for row in r["matched_to"])
    for key, row in summary["methods"].items():
        if row["kind"] == "callback":
            s = row["seeds"]["0"]
            assert s["loss_vs_small_dense_equal_time"] == pytest.approx(s["final_val_loss"] / s["small_dense_at_equal_time"] - 1), key
            assert "mean_loss_vs_small_dense_equal_time" in row and "small_dense_equal_time_outside_range" in s
    assert summary["goals"]["small_dense_at_equal_time"]["best"] in runs
    again = runs[f"{small['method']}_rerun"]
    assert again["kind"] == "rerun" and again["steps"] == small["steps"] and again["rerun_of"] == small["method"]
    assert summary["time_scales"]["0"] == pytest.approx(small["fit_seconds"] / again["fit_seconds"])
    assert summary["reruns"]["0"][small["method"]]["final_val_loss_rerun"] == pytest.approx(small["final_val_loss"], abs=1e-4)
    longest = max(longer.values(), key=lambda r: r["steps"])  # on the table's time scale
    assert summary["methods"][f"{small['method']}_{longest['steps']}"]["seeds"]["0"]["time"] == pytest.approx(
        longest["fit_seconds"] * summary["time_scales"]["0"])


def test_tradeoff_budget_skips_and_records(tmp_path):
    """A budget too small for anything: every run is skipped, with why; without a GPU --gpu refuses."""
    import torch

    from benchmarks.bench_lm_tradeoff import main

    result = main(["--dry-run", "--gpu", "--seeds", "0", "--budget-s", "0", "--out", str(tmp_path)])
    assert result["runs"]["0"] == {} and result["skipped"] and all("budget" in why for why in result["skipped"].values())
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            main(["--gpu", "--out", str(tmp_path)])


def test_cpu_configuration_runs_at_the_learning_rate_its_grid_found_best():
    """The trade-off compares every method at the rate that suits it: the committed grid's best
    rate of each family (dense, factorized at init, the callback) is the CPU configuration's."""
    grid = json.loads((ROOT / "benchmarks" / "results" / "lm_lr_grid.json").read_text())
    lr = config(False, dry_run=False, steps=None)["model"]["lr"]
    assert set(grid["best"]) == {"dense", "init_0.25", "callback_early_1:0.25"}
    assert all(float(best) == lr for best in grid["best"].values()), (grid["best"], lr)
    for by_lr in grid["runs"].values():  # the best is inside the grid, not at its edge
        rates = sorted(float(r) for r in by_lr)
        assert rates[0] < lr < rates[-1]


@pytest.mark.slow  # ~20 s: 6 tiny fits
def test_lr_grid_dry_run_trains_every_family_at_every_rate(tmp_path):
    from benchmarks.bench_lm_lr_grid import FAMILIES
    from benchmarks.bench_lm_lr_grid import main as grid

    result = grid(["--dry-run", "--lrs", "1e-3", "3e-3", "--out", str(tmp_path)])
    assert set(result["runs"]) == set(FAMILIES)
    assert all(set(by_lr) == {"0.001", "0.003"} for by_lr in result["runs"].values())
    losses = {f: {lr: s["0"]["final_val_loss"] for lr, s in by_lr.items()} for f, by_lr in result["runs"].items()}
    assert all(result["best"][f] == min(losses[f], key=losses[f].get) for f in FAMILIES)
    assert losses["dense"]["0.001"] != losses["dense"]["0.003"]  # the rate reached the optimizer
    assert json.loads((tmp_path / "lm_lr_grid_dry_run.json").read_text())["best"] == result["best"]
