"""The package type-checks: ``python -m mypy`` with pyproject.toml's [tool.mypy] settings (which
name the package, ``factorize_plugin/``, and the Python floor). The package ships ``py.typed``, so
its annotations are what users' type checkers read. mypy is in the ``dev`` extras."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_passes_on_the_package():
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--hide-error-context"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mypy failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def test_the_package_ships_its_typing_marker():
    assert (ROOT / "factorize_plugin" / "py.typed").is_file()
    assert "py.typed" in (ROOT / "pyproject.toml").read_text()
