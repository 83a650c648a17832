"""The faster solve (issue 20, item 2) gives the previous solver's optimum: at the GPU GPT's layer
shapes the NMSE curves agree to 1e-6 relative at the ranks a schedule uses, and the benchmark that
times both runs (its --dry-run, on a tiny GPT)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factorize_plugin.core.solver import decompose
from factorize_plugin.core.statistics import MomentAccumulator

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_milestone_cost.py"
sys.path.insert(0, str(BENCH.parent.parent))
from benchmarks.bench_milestone_cost import solver  # noqa: E402


def _stats(d: int, w: torch.Tensor, projected: bool, rows: int = 6144) -> MomentAccumulator:
    g = torch.Generator().manual_seed(d)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)  # a decaying spectrum, as activations have
    x = torch.randn(rows, d, generator=g) @ mix + 0.3
    if projected:
        return MomentAccumulator(w.shape[1], projection=w).update(x @ w)
    return MomentAccumulator(d).update(x)


@pytest.mark.slow
@pytest.mark.parametrize("d, m, bias", [(1024, 3072, True), (1024, 1024, False), (1024, 4096, False), (4096, 1024, True)])
def test_gpt_shapes_reach_the_previous_optimum(d: int, m: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m)
    w = torch.randn(d, m, generator=g) / d**0.5
    b = torch.randn(m, generator=g) if bias else None
    stats = _stats(d, w, projected=m < d)  # what the collector keeps ("auto" space)
    current = decompose(stats, w, b, fit_bias=bias)
    with solver("previous"):
        previous = decompose(stats, w, b, fit_bias=bias)
    k = min(d, m)
    for rank in (k // 8, k // 4, k // 2):
        assert current.nmse_curve[rank].item() == pytest.approx(previous.nmse_curve[rank].item(), rel=1e-6)


def test_benchmark_dry_run(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "milestone_cost_dry_run.json").read_text())
    assert len(result["per_layer"]["current"]["seconds"]) == 8  # 4 projections x 2 blocks
    assert result["max_relative_nmse_difference"] < 1e-6
    assert result["config"]["heldout_layers"]  # the held-out solves are timed too
