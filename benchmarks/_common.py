"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def package_version() -> dict:
    """Where a result comes from: the package's git commit and whether its sources differ from it,
    the Python, torch and Lightning versions, and the machine (every results file records it;
    ``tests/test_results_provenance.py``)."""
    root = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": git("status", "--porcelain", "factorize_plugin").splitlines(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "lightning": version("lightning"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def warmup_cosine(step: int, steps: int, warmup: int, low: float) -> float:
    """Learning-rate multiplier for the update after ``step`` of ``steps`` optimizer steps: linear
    from 1 / ``warmup`` to 1 over ``warmup`` steps, then a cosine down to ``low`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t))


def recovery_trainer(steps: int, callbacks: list, **kwargs: Any) -> Any:
    """A quiet CPU ``Trainer`` of exactly ``steps`` optimizer steps in one epoch (no logger, no
    checkpoints, no sanity check, no validation run: ``check_val_every_n_epoch=2``; a factorization
    callback runs its own calibration passes over the ``val_dataloader``)."""
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=2, **kwargs,
    )  # fmt: skip
