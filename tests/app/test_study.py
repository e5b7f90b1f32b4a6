"""The accuracy study's shipped sweep files (sweeps/*.toml, docs/results.md) run as documented:
every cell's config validates, and one DDP and one SDP cell of each train end to end on the real
data for two steps through `subnetdp sweep`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from subnetdp.app.sweep import expand

from _runs import cli

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "sweeps").glob("*.toml"))
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
SMOKE = ["run.steps=2", "run.eval_interval=0", "run.checkpoint_interval=0", "eval.max_batches=2",
         "eval.recalibrate_norm_batches=1"]


def _needs_fashion_mnist(sweep: Path) -> bool:
    base = tomllib.loads(sweep.read_text())["sweep"]["base"]
    return tomllib.loads((sweep.parent / base).read_text())["data"]["name"] == "fashion-mnist"


def test_every_documented_sweep_file_is_shipped() -> None:
    text = (ROOT / "docs" / "results.md").read_text()
    assert SWEEPS and all(f"sweeps/{s.name}" in text for s in SWEEPS)


@pytest.mark.slow
@pytest.mark.parametrize("sweep", SWEEPS, ids=[s.stem for s in SWEEPS])
def test_shipped_sweep_runs_a_ddp_and_an_sdp_cell(tmp_path: Path, sweep: Path) -> None:
    if _needs_fashion_mnist(sweep) and not FASHION_MNIST.exists() and not os.environ.get("SUBNETDP_DATA"):
        pytest.skip("Fashion-MNIST not installed (scripts/get_data.sh)")
    cells = expand(sweep, SMOKE)  # every cell's config validates
    ddp = next(c for c in cells if c.config["strategy"]["name"] == "ddp")
    sdp = next(c for c in cells if c.config["strategy"]["name"] == "sdp")
    out = tmp_path / "out"
    args = ["sweep", str(sweep), "--out", str(out), "--no-progress", "--jobs", "2", "--only", ddp.id,
            "--only", sdp.id]
    for item in SMOKE:
        args += ["--set", item]
    result = cli(*args)  # in this process; the cells are processes of their own
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["conditions"]) == 2
    assert (out / "results.md").is_file()
    for cell in (ddp, sdp):
        summary = json.loads((out / "cells" / cell.id / "summary.json").read_text())
        assert summary["final_eval"] and summary["train_flops"] > 0


def test_study_tables_script_prints_the_committed_results(tmp_path: Path) -> None:
    results = tmp_path / "results" / "resnet18_fashion_mnist"
    results.mkdir(parents=True)
    condition = {"config": {"strategy": {"name": "ddp"}, "run": {"steps": 10, "schedule": "iteration"}, "model": {}},
                 "workers": 4, "metrics": {"accuracy": {"mean": 0.9, "std": 0.01, "n": 3}}}
    (results / "results.json").write_text(json.dumps({"conditions": [condition]}))
    for root in (tmp_path / "results", ROOT / "results"):
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "study_tables.py"), "--results", str(root)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "| DDP, 10 steps | 4 | 90.00 ± 1.00 (n=3) |" in result.stdout or root == ROOT / "results"
        assert "###" in result.stdout
