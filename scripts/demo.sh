#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: DDP vs B-SDP, 4 gloo workers on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1
subnetdp demo "$@"
