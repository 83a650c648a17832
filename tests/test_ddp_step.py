"""``interval="step"`` under ``strategy="ddp"`` (issue 30, item 1): two CPU/gloo processes agree on
every step milestone (statistics over both ranks' validation data, from a validation run ending at
the step or a calibration pass), and a mid-epoch resume applies the remaining milestone once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_helpers import max_abs_diff

HERE = Path(__file__).resolve().parent
# progressive(FixedRank(4), [0, 4, 10]) on TinyNet's targets: each layer from its own min(in, out)
# (features.2: 8, classifier.0: 32, classifier.2: 10) in 3 equal-ratio steps down to 4
S0 = {"features.2": 6, "classifier.0": 16, "classifier.2": 7}
S4 = {"features.2": 5, "classifier.0": 8, "classifier.2": 5}
S10 = {"features.2": 4, "classifier.0": 4, "classifier.2": 4}


@pytest.mark.slow
def test_ddp_ranks_agree_on_step_milestones(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(HERE / "ddp_step_script.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2

    for r in (r0, r1):
        assert r["done"] == [0, 4, 10]
        assert [(h["milestone"], h["global_step"], h["statistics"]) for h in r["history"]] == [
            (0, 0, "calibration"), (4, 4, "validation"), (10, 10, "calibration"),
        ]  # fmt: skip
        assert [h["ranks"] for h in r["history"]] == [S0, S4, S10]
        # fitted to the union of both ranks' validation halves (64 digits each)
        assert all(h["samples"]["classifier.0"] == 128 for h in r["history"])
        assert r["at"] == {s: S0 if s < 4 else S4 if s < 10 else S10 for s in range(16)}
    # every rank solved the same problem: the same factors before the new wrapper broadcasts
    assert len(r0["before_rewrap"]) == len(r1["before_rewrap"]) == 3
    for m0, m1 in zip(r0["before_rewrap"], r1["before_rewrap"]):
        for name in m0:
            assert float((m0[name] - m1[name]).abs().max()) <= 1e-6, name
    for h0, h1 in zip(r0["history"], r1["history"]):
        assert h0["nmse"] == pytest.approx(h1["nmse"], rel=1e-6, abs=1e-9)
    assert max_abs_diff(r0["final"], r1["final"]) <= 1e-6

    # resumed mid-epoch at step 5 (a DistributedSampler is not resumable: Lightning restarts the
    # loader, the step count goes on): milestone 10 applied once, on both ranks alike
    for r in (r0, r1):
        assert r["resumed_done"] == [0, 4, 10] and r["resumed_rewraps"] == 1
        assert [(h["milestone"], h["global_step"]) for h in r["resumed_history"]] == [(0, 0), (4, 4), (10, 10)]
        assert r["resumed_at"] == {s: S4 if s < 10 else S10 for s in range(5, 16)}
    assert max_abs_diff(r0["resumed_final"], r1["resumed_final"]) <= 1e-6
