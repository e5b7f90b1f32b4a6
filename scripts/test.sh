#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite: real multi-process gloo groups on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1
python -m pytest tests "$@"
