"""benchmarks/estimate_llm_statistics.py (issue 23 item 4) runs on the meta device, and its
LLaMA-7B numbers match a hand count for one decoder block."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_7b_estimate_matches_a_hand_count_of_one_block(tmp_path):
    out = tmp_path / "estimate.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))  # this checkout's package
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "estimate_llm_statistics.py"), "--models", "LLaMA-7B",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "| LLaMA-7B | 8 |" in run.stdout
    res = json.loads(out.read_text())["models"]["LLaMA-7B"]
    assert res["shared_groups_per_block"] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]  # fmt: skip
    d, f = 4096, 11008
    acc = 8 * (d * d + d + 1)  # one D x D accumulator (q, k, v, o; gate, up: M > D; down: projected to M = 4096)
    w_copies = 2 * f * d  # down_proj's W snapshot, bf16 (projected statistics of a bf16 model)
    block = res["block0"]
    assert block["unshared_bytes"] == 7 * acc + w_copies
    assert block["shared_inputs_bytes"] == 4 * acc + w_copies  # q/k/v -> 1, gate/up -> 1
    square = (2 + 6 + 9) * d**3  # C W, B^T C B, G, C G, eigh(9 n^3)
    wide = 6 * d * d * f + (1 / 3 + 10 + 9) * d**3
    assert block["flops"] == pytest.approx(5 * square + 2 * wide, rel=1e-12)
    head = 8 * (d * d + d + 1)  # lm_head 4096 -> 32000: input statistics
    assert res["statistics_bytes"]["unshared"] == 32 * (7 * acc + w_copies) + head
    assert res["statistics_bytes"]["shared_inputs"] == 32 * (4 * acc + w_copies) + head
    assert res["statistics_bytes"]["largest_transient_cast_bytes"] == 4 * f * d  # down_proj's W cast to float32
    assert res["ranks"]["8"]["sharded_after_reduce_bytes"] == pytest.approx(res["statistics_bytes"]["shared_inputs"] / 8)
    assert res["ranks"]["8"]["today_shared_inputs_bytes"] == res["statistics_bytes"]["shared_inputs"]
    # collection in passes within the default 4 GB budget (the callback's own planner): under DDP no
    # held-out halves, so 9 passes, the fewest any split could give (ceil(33.1 GB / 4 GB)), each
    # within the budget; on one process the halves count 3x
    budget = res["budget_bytes"]
    assert budget == 4 * 10**9
    for world in ("8", "64"):
        p = res["ranks"][world]["with_passes"]
        assert p["passes"] == -(-res["statistics_bytes"]["unshared"] // budget) == 9
        assert p["peak_bytes"] <= budget and sum(p["layers_per_pass"]) == res["targeted_layers"]
    one = res["ranks"]["1"]["with_passes"]
    assert one["peak_bytes"] <= budget and one["passes"] >= -(-3 * res["statistics_bytes"]["unshared"] // budget)
    assert "| LLaMA-7B | 8 | 33.1 GB | 20.2 GB | 2.53 GB | 9 | 3.99 GB |" in run.stdout
