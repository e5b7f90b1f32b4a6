"""`pip install .`: the wheel pins no torch build (a floor only) and offers the optional parts as extras."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[subprocess.CompletedProcess, list[str], str]:
    """`pip wheel` of a copy of the project: (its output, the wheel's file names, its METADATA)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
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
    return result, names, metadata


@pytest.mark.slow
def test_wheel_requires_a_torch_floor_and_offers_extras(built) -> None:
    _, names, metadata = built
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    torch_req = [r for r in requires if r.startswith("torch")]
    assert torch_req == ["torch>=2.6"]  # a floor, never a pinned (CPU or CUDA) build
    extras = {line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Provides-Extra: ")}
    assert {"app", "hf", "plots", "tensorboard", "test"} <= extras
    core = sorted(r.split(">")[0].split("=")[0] for r in requires if "extra ==" not in r)
    assert core == ["numpy", "torch"]  # the library; the application's packages are the `app` extra
    assert not any(r.startswith("matplotlib") and "extra" not in r for r in requires)  # plots are optional
    assert "subnetdp/integrations/hf_trainer.py" in names and not any(n.startswith("tests/") for n in names)


def test_the_build_names_its_license_in_spdx_form_without_deprecation_warnings(built) -> None:
    """Issue 17, item 9: `license = { text = ... }` made every install print setuptools' deprecation
    warning about project.license (three times per build; about 40 lines)."""
    result, _, metadata = built
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "project.license" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert pyproject["build-system"]["requires"] == ["setuptools>=77"]  # the first that reads SPDX expressions
