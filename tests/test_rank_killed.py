"""A rank killed mid-milestone (issue 23): 2 gloo processes, rank 1 dies inside its solve at the
milestone; rank 0 fails instead of hanging, the last checkpoint is the previous epoch's, dense (no
half-applied structure), and fresh processes resume from it, start from its very weights, and
reach the milestone: the factors of the union of both ranks' validation data, one pass per layer
(``max_statistics_bytes``), each layer solved by one owner, both ranks bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factorize_plugin import Statistics, Targets, factorize_model
from factorize_plugin.surgery.swap.checkpoint import factorized_entries
from lightning_helpers import DDP_MODEL_KWARGS, WIDE_TARGETS, WideNet, composed, digits, max_abs_diff

HERE = Path(__file__).resolve().parent
TIMEOUT = 600  # a hung process group fails the test instead of blocking the suite (the gloo timeout: 300 s)


def run_script(out: Path, phase: str) -> subprocess.CompletedProcess:
    """Runs ``ddp_kill_script.py`` in its own session; on timeout every process of it is killed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "ddp_kill_script.py"), str(out), phase], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the {phase} run hung for {TIMEOUT} s:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    finally:
        try:  # whatever is left of the job (rank 1 of a failed run)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_rank_killed_mid_milestone_resumes_from_the_previous_epoch(tmp_path):
    killed = run_script(tmp_path, "kill")
    assert killed.returncode != 0, "rank 0 finished although rank 1 died mid-milestone"
    assert (tmp_path / "rank1_died_in_solve").exists(), killed.stderr[-4000:]  # it died where meant to
    # the last checkpoint is epoch 0's (written after the validation run, before the milestone), dense
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=0.ckpt"]
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    assert factorized_entries(ckpt["state_dict"]) == {}
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("LowRankFactorization")]
    assert state["done"] == [] and state["history"] == []

    resumed = run_script(tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for r in (r0, r1):
        # it started from the checkpoint's weights, dense, and applied the milestone once
        assert r["ckpt"] == "epoch=0.ckpt"
        assert r["start_structure"] == dict.fromkeys(WIDE_TARGETS)
        assert max_abs_diff(r["start_state"], ckpt["state_dict"]) == 0.0
        assert r["done"] == [1] and r["structure"] == dict.fromkeys(WIDE_TARGETS, 64)
        (h,) = r["history"]
        assert h["statistics"] == "calibration"  # no validation run since the restore: collected anew
        assert h["samples"] == dict.fromkeys(WIDE_TARGETS, 128)  # both ranks' 64 digits
        assert h["statistics_passes"] == 2 and 0 < h["statistics_bytes"] <= r["budget"]
        assert h["owners"] == {"classifier.0": 0, "classifier.2": 1}  # one layer each, over the passes
        assert h["solve_seconds"] > 0 and h["solve_cpu_seconds"] > 0
    assert r0["history"][0]["statistics_bytes_reduced"] > 0 and r1["history"][0]["statistics_bytes_reduced"] > 0
    # both ranks installed the same factors (before the new DDP wrapper broadcasts rank 0's) ...
    (f0,), (f1,) = r0["before_rewrap"], r1["before_rewrap"]
    for n in WIDE_TARGETS:
        assert torch.equal(f0[n], f1[n]), n
    assert max_abs_diff(r0["final"], r1["final"]) == 0.0
    # ... those of one process fitting the checkpoint's model to the whole validation set
    model = WideNet(**DDP_MODEL_KWARGS)
    model.load_state_dict(ckpt["state_dict"])
    x, _ = digits()
    val = x[1000 : 1000 + DDP_MODEL_KWARGS["n_val"]]
    factorize_model(
        model, val.split(32), rank=0.25, targets=Targets(WIDE_TARGETS, min_params=0, min_features=0), statistics=Statistics(sample_fraction=1.0, max_samples=None),
        speed_guard=False,
    )  # fmt: skip
    ref = composed(model, WIDE_TARGETS)
    for n in WIDE_TARGETS:
        assert float((f0[n] - ref[n]).norm()) <= 1e-6 * float(ref[n].norm()), n
