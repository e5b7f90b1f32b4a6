#!/usr/bin/env bash
# Create .venv (if missing) with a CPU build of torch and subnetdp installed in editable mode.
# SUBNETDP_TORCH_SPEC overrides the torch requirement (default torch==2.13.0, a CPU build here);
# install torch first so that no other requirement pulls a multi-GB CUDA build by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${SUBNETDP_TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
fi
python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, subnetdp; print(f'torch {torch.__version__}, subnetdp {subnetdp.__version__} ready in .venv')"
