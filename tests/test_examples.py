"""The Python examples run end to end (shortened) and print what they promise."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_train_mnist_example_factorizes_then_lowers_the_rank(tmp_path):
    """The structure pinned (--no-speed-guard): the same on any machine, whatever its load."""
    out = _run("train_mnist.py", "--limit", "800", "--epochs", "3", "--schedule", "1:0.25,2:0.125", "--no-speed-guard",
               cwd=tmp_path)  # fmt: skip
    ranks = dict(re.findall(r"^\s+(\d)\s+[\d.]+\s+[\d,]+\s+(.+)$", out, flags=re.M))
    assert ranks["0"] == "dense"
    assert ranks["1"] == "classifier.0=196, classifier.2=256"
    assert ranks["2"] == "classifier.0=98, classifier.2=128"
    kept = float(re.search(r"keep ([\d.]+)% of their weights", out).group(1))
    assert kept == pytest.approx(23.7, abs=0.1)
    assert "epoch 1: not timed (--no-speed-guard)" in out
    assert (tmp_path / "lightning_logs").exists()


def test_train_mnist_example_prints_the_speed_verdict(tmp_path):
    """With the speed decision on, what it measured is printed at every milestone, whatever it decided."""
    out = _run("train_mnist.py", "--limit", "800", "--epochs", "2", "--schedule", "1:0.25", cwd=tmp_path)
    verdict = re.search(r"epoch 1: 2 change\(s\): ([\d.]+)x \(([\d.]+)-([\d.]+), (\d+) rounds, (\w+)\)", out)
    assert verdict, out[-2000:]
    ratio, low, high, rounds = float(verdict[1]), float(verdict[2]), float(verdict[3]), int(verdict[4])
    assert low <= ratio <= high and rounds >= 6 and verdict[5] in ("faster", "slower", "undecided")


def test_oneshot_example_keeps_accuracy(tmp_path):
    """The structure pinned (--no-speed-guard): under a parallel load the per-layer guard once kept
    layers dense, the budget then cut the others hard and the accuracy fell to 0.26."""
    out = _run("oneshot_pretrained.py", "--budget", "0.3", "--calibration", "500", "--no-speed-guard", cwd=tmp_path)
    before, after = map(float, re.search(r"([\d.]+) dense -> ([\d.]+) factorized", out).groups())
    assert before > 0.98 and after > before - 0.02
    assert "kept" in out and "fc_layers.0" in out


def test_gpu_benchmark_dry_run_records_every_guard_decision(tmp_path):
    """bench_gpu_speed.py has no GPU here: its --dry-run runs the same code on tiny CPU layers, so a
    session with a device does not spend it on a broken script. Every row carries the guard's
    measured ratio and decision, with a note exactly where it keeps the layer dense."""
    import json

    bench = EXAMPLES.parent / "benchmarks" / "bench_gpu_speed.py"
    out = subprocess.run([sys.executable, str(bench), "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_speed_dry_run.json").read_text())["rows"]
    assert len(rows) == 6 and {r["kind"] for r in rows} == {"linear", "conv3x3"}
    for r in rows:
        assert r["guard_speedup"] > 0 and r["speedup"] > 0
        assert bool(r["guard_note"]) == (not r["guard_factorizes"])
        assert r["guard_factorizes"] == (r["guard_verdict"] == "faster")
        assert r["guard_low"] >= 1.15 if r["guard_factorizes"] else r["guard_verdict"] in ("slower", "undecided")


def test_gpu_lm_benchmark_dry_run_holds_every_run(tmp_path):
    """bench_gpu_lm.py (issue 20, item 3) has no GPU here: its --dry-run trains the same runs through
    the same code on a tiny GPT on the CPU, so a device's minutes are never spent on a broken script.
    The JSON holds every run (dense, the callback with its defaults at two schedules, the same with
    the speed decision off, factorized at initialization), the whole-model step table at ranks 1/2,
    1/4, 1/8, and the time of every milestone; the loss-vs-wall-clock PNG is written."""
    import json

    bench = EXAMPLES.parent / "benchmarks" / "bench_gpu_lm.py"
    out = subprocess.run([sys.executable, str(bench), "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_lm_dry_run.json").read_text())
    assert (tmp_path / "gpu_lm_dry_run.png").stat().st_size > 0
    assert result["errors"] == {} and result["skipped"] == {} and result["setup"]["dry_run"]
    schedules = {
        "dense": None, "callback_1:0.25": [1], "callback_1:0.5,2:0.25": [1, 2], "guard_off_1:0.25": [1],
        "guard_off_1:0.5,2:0.25": [1, 2], "init_0:0.25": [0],
    }  # fmt: skip
    runs = result["runs"]
    assert set(runs) == set(schedules)
    for name, milestones in schedules.items():
        r = runs[name]
        assert r["fit_seconds"] > 0 and r["final_val_loss"] > 0 and r["steps"] == result["setup"]["steps"]
        assert len(r["epochs"]) == 4 and all(0 < e["train_seconds"] <= e["epoch_seconds"] for e in r["epochs"])
        assert len(r["curve"]) == 4
        if milestones is None:
            assert r["history"] == [] and name not in result["milestone_cost"]
            continue
        assert [h["milestone"] for h in r["history"]] == milestones
        assert all({"ranks", "notes", "speedup"} <= set(h) for h in r["history"])
        cost = result["milestone_cost"][name]
        assert [m["epoch"] for m in cost] == milestones and all(m["seconds"] > 0 for m in cost)
    # the decision off: every projection of the 2 blocks factorized at the last milestone
    for name in ("guard_off_1:0.25", "guard_off_1:0.5,2:0.25"):
        assert runs[name]["changed_layers"] == 8 and all(r == 16 for r in runs[name]["history"][-1]["ranks"].values())
    table = result["step_table"]
    assert [row["fraction"] for row in table["rows"]] == [0.5, 0.25, 0.125]
    for row in table["rows"]:
        assert row["dense_ms"] > 0 and row["factorized_ms"] > 0 and row["changed"] >= 1
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["factorized_ms"])
    assert [r["changed"] for r in table["rows"]][1:] == [8, 8]  # at 1/4 and 1/8 every projection saves MACs


def test_gpu_lm_benchmark_budget_skips_and_records(tmp_path):
    """A budget too small for anything: every part is skipped, with why, and nothing is trained;
    without --dry-run on a machine without CUDA the script exits with a message."""
    import json

    from benchmarks.bench_gpu_lm import main

    result = main(["--dry-run", "--budget-s", "0", "--out", str(tmp_path)])
    assert result["runs"] == {} and result["step_table"] is None
    assert len(result["skipped"]) == 7 and all("budget" in why for why in result["skipped"].values())
    assert json.loads((tmp_path / "gpu_lm_dry_run.json").read_text())["skipped"] == result["skipped"]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            main(["--out", str(tmp_path)])
