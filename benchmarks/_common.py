"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path


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
