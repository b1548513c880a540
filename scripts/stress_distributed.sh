#!/usr/bin/env bash
# Run each multi-process (gloo) test file N times while a busy loop holds another core, and count failures.
# Not part of the test suite (minutes to hours); it checks that process-group setup and teardown never abort.
#   bash scripts/stress_distributed.sh [N] [TEST_FILE ...]
#   N defaults to 30; the files default to every test that spawns processes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
N=${1:-30}
shift || true
FILES=("$@")
if [ ${#FILES[@]} -eq 0 ]; then
  FILES=(tests/test_distributed_hvp.py tests/test_distributed_probes.py tests/test_distributed_teardown.py
         tests/test_distributed_cli.py)
fi
LOG=$(mktemp -d "${TMPDIR:-/tmp}/tvdiag-stress-XXXXXX")
# the busy loop: one process spinning on a core for the whole run, as another job would
"$PY" -c "while True: pass" &
BUSY=$!
trap 'kill $BUSY 2>/dev/null' EXIT
total_fail=0
for f in "${FILES[@]}"; do
  fail=0
  for i in $(seq 1 "$N"); do
    if ! "$PY" -m pytest -x -q -p no:cacheprovider "$f" > "$LOG/$(basename "$f" .py)-$i.log" 2>&1; then
      fail=$((fail + 1))
      reason=$(grep -m1 -E "SIGABRT|terminate called|Error|error" "$LOG/$(basename "$f" .py)-$i.log" | cut -c1-160)
      echo "  $f run $i failed: ${reason:-see $LOG}"
    fi
  done
  echo "$f: $fail / $N failed"
  total_fail=$((total_fail + fail))
done
echo "total: $total_fail failures (logs in $LOG)"
[ "$total_fail" -eq 0 ]
