#!/usr/bin/env bash
# Set up (scripts/setup.sh, scripts/get_data.sh) and run the demo: ResNet-18 on Fashion-MNIST,
# DDP vs B-SDP, 4 gloo workers on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/get_data.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${SUBNETDP_DATA:-}" ]; then
  set -- --set data.download=true "$@"
fi
subnetdp demo "$@"
