"""Every results file says where its numbers come from (issue 33): the package's commit, the
torch version and the machine, or a ``provenance`` block marking it as written before that rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
sys.path.insert(0, str(RESULTS.parent))


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_results_file_records_commit_versions_and_machine(path):
    data = json.loads(path.read_text())
    old = data.get("provenance", {})
    if old.get("recorded_before_rule"):
        assert old["note"] and "re-run" in old["note"]
        return
    blocks = [v for v in data.values() if isinstance(v, dict) and v.get("commit")]
    assert blocks, f"{path.name}: no block with the package's commit (benchmarks/_common.package_version())"
    assert all(blocks[0].get(k) for k in ("torch", "lightning", "python", "platform")), blocks[0]


def test_package_version_records_what_the_rule_asks():
    from _common import package_version

    v = package_version()
    assert {"commit", "uncommitted_changes", "python", "torch", "lightning", "platform", "cpus"} <= set(v)
    assert v["torch"] and v["python"] and v["cpus"] >= 1
