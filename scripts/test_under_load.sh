#!/usr/bin/env bash
# The test suite N times in a row (default 3) beside a parallel CPU load: two busy processes on
# this 2-core machine, so that a test whose outcome a timing decides shows up as a failure.
#   bash scripts/test_under_load.sh [N] [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
shift || true
py=.venv/bin/python
[ -x "$py" ] || py=python3
hogs=()
for _ in 1 2; do "$py" -c "while True: pass" & hogs+=($!); done
trap 'kill "${hogs[@]}" 2>/dev/null' EXIT
status=0
for i in $(seq 1 "$runs"); do
    echo "=== run $i of $runs under load ($(date +%T)) ==="
    "$py" -m pytest -q -p no:randomly "$@" || status=1
done
exit $status
