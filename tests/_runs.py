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


def assert_chart(path: Path, width: int | None, height: int | None) -> tuple[int, int]:
    """``path`` is a PNG image (signature, IHDR chunk) of ``width`` x ``height`` pixels (None: any)
    that decodes to pixels of that size, with something drawn on it in colour (not a blank or
    all-grey figure: every chart of the project plots its data in colour). Returns (width, height)."""
    import struct

    import matplotlib.image

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path}: not a PNG file"
    size = struct.unpack(">II", data[16:24])
    assert (width in (None, size[0])) and (height in (None, size[1])), f"{path}: {size}, wanted {(width, height)}"
    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[:2] == (size[1], size[0]) and pixels.ndim == 3, pixels.shape
    rgb = pixels[..., :3]
    coloured = (rgb.max(-1) - rgb.min(-1)) > 0.2  # saturated: neither white, black nor grey
    assert coloured.sum() >= 100, f"{path}: nothing drawn in colour ({coloured.sum()} pixels)"
    return size
