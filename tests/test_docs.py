"""The documentation site builds with ``mkdocs build --strict`` (any warning fails: a broken link, a
page left out of the navigation, a docstring mkdocstrings cannot render), the API reference covers
the public API, the architecture page names every module, and the README stays short.

mkdocs-material and mkdocstrings[python] are in the ``dev`` extras (``setup.sh`` installs them).
The numbers in the pages are checked by ``tests/test_docs_numbers.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import factorize_plugin

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    warnings = [line for line in log.splitlines() if re.match(r"\s*(\x1b\[[0-9;]*m)?\s*WARNING\b", line)]
    assert not warnings, "\n".join(warnings)
    site = tmp_path / "site"
    api = (site / "api" / "callback" / "index.html").read_text()
    assert "LowRankFactorization" in api and "schedule" in api  # rendered from the docstring
    for png in ("accuracy_vs_compute", "lm_tradeoff", "solver", "pretrained_mnist", "ddp_scaling", "gpt_lm"):
        assert (site / "results" / f"{png}.png").is_file(), png  # the benchmark plots, via docs/hooks.py


def test_every_page_is_in_the_navigation_and_every_public_name_has_a_reference():
    config = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    listed = set(re.findall(r":\s*([\w/-]+\.md)\s*$", config, flags=re.M))
    assert pages == listed, f"in docs/ but not in the nav: {pages - listed}; in the nav but missing: {listed - pages}"
    documented = set(re.findall(r"^::: factorize_plugin\.(\w+)\s*$", "\n".join(
        p.read_text() for p in (DOCS / "api").glob("*.md")), flags=re.M))  # fmt: skip
    assert documented == set(factorize_plugin.__all__)


def test_the_architecture_page_names_every_module():
    text = (DOCS / "architecture.md").read_text()
    package = ROOT / "factorize_plugin"
    missing = [m.relative_to(ROOT).as_posix() for m in package.rglob("*.py")
               if m.name != "__init__.py" and f"`{m.name}`" not in text]  # fmt: skip
    assert not missing, f"modules the architecture page does not describe: {missing}"


def test_the_readme_is_short_and_keeps_the_commands_ci_runs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    main = re.search(r"<!-- main-command -->\n```bash\n(.*?)\n```\n<!-- /main-command -->", text, flags=re.S)
    test = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```\n<!-- /test-command -->", text, flags=re.S)
    assert main and main.group(1) == "bash setup.sh && .venv/bin/python examples/train_mnist.py"
    assert test and test.group(1) == "bash setup.sh && .venv/bin/python -m pytest -q"
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link


def test_the_arguments_table_names_every_parameter_of_both_entry_points():
    import inspect
    import re

    from factorize_plugin import LowRankFactorization, factorize_model

    current, old = [t for t in (DOCS / "arguments.md").read_text().split("\n\n") if t.startswith("| ")]

    def rows(table: str) -> list[list[str]]:
        return [line.split("|")[1:-1] for line in table.splitlines() if "---" not in line][1:]

    named = [set(re.findall(r"`(\w+)`", " ".join(column))) for column in zip(*(r[1:3] for r in rows(current)), strict=True)]
    for row in rows(old):  # (old names, now, doors): each old name is still a parameter of its doors
        for door, names in zip(("LowRankFactorization", "factorize_model"), named, strict=True):
            if row[2].strip() in ("both", f"`{door}`"):
                names |= set(re.findall(r"`(\w+)`", row[0]))
    for names, fn in zip(named, (LowRankFactorization.__init__, factorize_model), strict=True):
        params = set(inspect.signature(fn).parameters) - {"self"}
        assert params == names, (sorted(params - names), sorted(names - params))
