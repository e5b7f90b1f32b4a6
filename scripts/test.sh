#!/usr/bin/env bash
# Set up (scripts/setup.sh, scripts/get_data.sh), lint (ruff) and run the test suite: real multi-process gloo
# groups on CPU. Tests that read the real Fashion-MNIST files are skipped where they are absent.
# Arguments go to pytest: `bash scripts/test.sh -m "not slow and not dist"` is the fast tier (under a minute).
# Tests run in SUBNETDP_TEST_JOBS pytest-xdist processes (default 2: most of a test's time is starting
# processes and torch, one core each; SUBNETDP_TEST_JOBS=0 runs them in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/get_data.sh || echo "Fashion-MNIST not installed: its tests will be skipped"
. .venv/bin/activate
export OMP_NUM_THREADS=1
python -m ruff check .  # style: line length, import order, unused names (pyproject.toml)
# types: subnetdp/engine (pyproject.toml [tool.mypy]), checked beside the tests (13 s of one core)
mypy_log=$(mktemp)
python -m mypy > "$mypy_log" 2>&1 &
mypy_pid=$!
trap 'kill $mypy_pid 2>/dev/null || true; rm -f "$mypy_log"' EXIT
tests=0
jobs=${SUBNETDP_TEST_JOBS:-2}
parallel=()
if [ "$jobs" != 0 ]; then parallel=(-n "$jobs" --dist worksteal); fi
python -m pytest tests "${parallel[@]}" "$@" || tests=$?
types=0
wait "$mypy_pid" || types=$?
echo "mypy: $(cat "$mypy_log")"
exit $(( tests != 0 ? tests : types ))
