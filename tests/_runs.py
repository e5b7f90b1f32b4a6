"""A tiny synthetic `subnetdp train` config and a helper that runs the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SYNTHETIC = """
[run]
name = "test"
steps = 12
log_interval = 1
checkpoint_interval = 4
eval_interval = 6
[model]
name = "resnet18"
width = 4
[data]
name = "synthetic-images"
batch_size = 8
train_size = 512
test_size = 128
[optim]
lr = 0.05
[eval]
recalibrate_norm_batches = 2
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# the smallest real training task: a width-4 ResNet-18 on 256 synthetic images (sweep, align tests)
TINY_TASK = """
[model]
name = "resnet18"
width = 4
[data]
name = "synthetic-images"
batch_size = 8
train_size = 256
test_size = 64
"""


def _config(tmp_path: Path, text: str = SYNTHETIC) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _train(config: Path, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "subnetdp.app.cli", "train", str(config), "--out", str(out),
                             "--no-progress", *args], capture_output=True, text=True, env=ENV, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result
