"""The Python examples run end to end (shortened) and print what they promise."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_train_mnist_example(tmp_path):
    out = _run("train_mnist.py", "--limit", "800", "--epochs", "2", "--schedule", "1:0.5", cwd=tmp_path)
    kept = float(re.search(r"keep ([\d.]+)% of their weights", out).group(1))
    assert 0 < kept < 100
    assert (tmp_path / "lightning_logs").exists()


def test_oneshot_example_keeps_accuracy(tmp_path):
    out = _run("oneshot_pretrained.py", "--budget", "0.3", "--calibration", "500", cwd=tmp_path)
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
        assert r["guard_factorizes"] == (r["guard_speedup"] >= 1.15)
