"""A tiny synthetic `subnetdp train` config, and helpers that run the real CLI: in this process
where it starts no process of its own (``cli``), else in a subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
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


def cli(*argv: str) -> subprocess.CompletedProcess:
    """`subnetdp ARGV` in this process (no interpreter start-up, no torch import: seconds saved per
    call), as a CompletedProcess with its exit code and what it printed. For commands that start no
    process of their own (train --simulate, export, report); one that raises is exit code 1 with
    the traceback on stderr, as from the command line."""
    from subnetdp.app.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - as the interpreter would report it
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def _train(config: Path | None, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`subnetdp train CONFIG --out OUT --no-progress ARGS` (no CONFIG when None): in this process
    with --simulate, else through the real command line (torchrun)."""
    argv = ["train", *([str(config)] if config is not None else []), "--out", str(out), "--no-progress", *args]
    if "--simulate" in args:
        result = cli(*argv)
    else:
        result = subprocess.run([sys.executable, "-m", "subnetdp.app.cli", *argv], capture_output=True, text=True,
                                env=ENV, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result
