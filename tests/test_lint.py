"""The code passes the lint configured in pyproject.toml ([tool.ruff]): ``ruff check`` on the
package, the tests, the examples and the benchmarks. ruff is in the ``dev`` extras."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["factorize_plugin", "tests", "examples", "benchmarks"]


def test_ruff_check_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", *PATHS],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"ruff check failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
