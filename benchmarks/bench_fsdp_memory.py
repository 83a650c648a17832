"""Memory per process under FSDP2 against DDP, for the same factorization job (issue 31).

    python benchmarks/bench_fsdp_memory.py [--out DIR]

Runs the 2-process GPT job of ``tests/fsdp_script.py`` (a 2-block GPT, milestones at epochs 0 and
1, CPU/gloo) under ``ModelParallelStrategy`` (FSDP2) and under DDP, and records after each
milestone and at the end, per process: the parameter bytes it holds (an FSDP2 shard: its local
part), the AdamW state bytes, and the most layers the milestone held gathered at once. The ratio
of FSDP2's per-process bytes to DDP's (which holds everything on every process) is the goal's
measure: 1/2 on two processes, within FSDP2's padding. Writes ``fsdp_memory.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import subprocess
import tempfile

import torch

from benchmarks._common import package_version

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRIPT = ROOT / "tests" / "fsdp_script.py"


def run(mode: str, out: Path) -> list[dict]:
    """The job under ``mode`` ("fsdp" or "ddp"); each process's record."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(SCRIPT), str(out), mode], env=env, check=True, capture_output=True)
    return [torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for r in (0, 1)]


def rows(fsdp: list[dict], ddp: list[dict]) -> list[dict]:
    """One row per record point (after each milestone, at the end)."""
    out = []
    for f0, f1, d0 in zip(fsdp[0]["after"], fsdp[1]["after"], ddp[0]["after"], strict=True):
        out.append({
            "at": f"after the milestone of epoch {f0['epoch']}" if f0["epoch"] < 2 else "end of training",
            "model_param_bytes": d0["param_bytes"],
            "fsdp_param_bytes_per_process": [f0["param_bytes"], f1["param_bytes"]],
            "ddp_optimizer_bytes_per_process": d0["optimizer_bytes"],
            "fsdp_optimizer_bytes_per_process": [f0["optimizer_bytes"], f1["optimizer_bytes"]],
            "param_ratio": max(f0["param_bytes"], f1["param_bytes"]) / d0["param_bytes"],
            "optimizer_ratio": (max(f0["optimizer_bytes"], f1["optimizer_bytes"]) / d0["optimizer_bytes"]
                                if d0["optimizer_bytes"] else None),
            "layers_gathered_at_once": max(f0["gathered_peak"], f1["gathered_peak"]),  # since the last row
        })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fsdp, ddp = run("fsdp", Path(tmp)), run("ddp", Path(tmp))
    result = {
        "benchmark": "fsdp_memory",
        "setup": {"processes": 2, "backend": "gloo", "model": "GPT, 2 blocks, dim 32", "milestones": {0: 0.5, 1: 0.25}},
        "rows": rows(fsdp, ddp),
        "version": package_version(),
    }
    path = Path(args.out) / "fsdp_memory.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["rows"], indent=1))
    return result


if __name__ == "__main__":
    main()
