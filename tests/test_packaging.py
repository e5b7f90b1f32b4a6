"""`pip install .`: the wheel pins no torch build (a floor only) and offers the optional parts as extras."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_requires_a_torch_floor_and_offers_extras(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "subnetdp", src / "subnetdp", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                             "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("subnetdp-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    torch_req = [r for r in requires if r.startswith("torch")]
    assert torch_req == ["torch>=2.6"]  # a floor, never a pinned (CPU or CUDA) build
    extras = {line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Provides-Extra: ")}
    assert {"hf", "plots", "tensorboard", "test"} <= extras
    assert not any(r.startswith("matplotlib") and "extra" not in r for r in requires)  # plots are optional
    assert "subnetdp/integrations/hf_trainer.py" in names and not any(n.startswith("tests/") for n in names)
