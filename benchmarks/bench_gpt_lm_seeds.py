"""Seed spread of the GPT-style LM benchmark (bench_gpt_lm.py): one run per (plan, seed), 1 thread.

    python benchmarks/bench_gpt_lm_seeds.py PLAN SEED [PLAN SEED ...]

PLAN is one of ``dense``, ``callback_1:0.25``, ``init_0.25`` (600 steps) and ``init_0.25_630``
(factorized at initialization with the 630 steps bench_gpt_lm.py gave it as "equal time"). Each
run's final validation loss, fit wall-clock and loss curve are merged into
benchmarks/results/gpt_lm_seeds.json (so runs can go in parallel processes, one plan and seed each).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fcntl
import json

import torch

from benchmarks._common import package_version
from examples.gpt_train import run

PLANS = {"dense": (None, 600), "callback_1:0.25": ({1: 0.25}, 600), "init_0.25": ({0: 0.25}, 600), "init_0.25_630": ({0: 0.25}, 630)}
OUT = Path(__file__).resolve().parent / "results" / "gpt_lm_seeds.json"


def record(plan: str, seed: int, result: dict) -> None:
    """Merges one run into OUT under a file lock (parallel processes write it too)."""
    OUT.parent.mkdir(exist_ok=True)
    with open(OUT.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(OUT.read_text()) if OUT.exists() else {"setup": "examples/gpt_train.run defaults (d=256, 4 layers, tied head), 6 epochs, 1 thread", "runs": {}}
        data["runs"].setdefault(plan, {})[str(seed)] = result
        OUT.write_text(json.dumps(data, indent=1, sort_keys=True))


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    for plan, seed in zip(argv[::2], map(int, argv[1::2])):
        schedule, steps = PLANS[plan]
        r = run(schedule, steps, 6, seed=seed)
        record(plan, seed, {"final_val_loss": r["final_val_loss"], "fit_seconds": r["fit_seconds"], "steps": r["steps"],
                            "curve": [round(p["val_loss"], 4) for p in r["curve"]], "package": package_version()})
        print(f"{plan} seed {seed}: final val loss {r['final_val_loss']:.4f}, {r['fit_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
