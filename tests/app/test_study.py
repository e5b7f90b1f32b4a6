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

from subnetdp.app.study.grid import expand

from _runs import assert_chart, cli

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
    printed = {}
    for root in (tmp_path / "results", ROOT / "results"):
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "study_tables.py"), "--results", str(root)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        printed[root] = result.stdout
    # one condition of its own: its one table and row, mean ± std in percent
    ours = printed[tmp_path / "results"]
    assert ours.startswith("### ResNet-18 w8, Fashion-MNIST: test accuracy (%)"), ours
    assert [line for line in ours.splitlines() if line.startswith("| DDP")] == [
        "| DDP, 10 steps | 4 | 90.00 ± 1.00 (n=3) |"]
    # the committed study: a table for each of its three sweeps, and every row is docs/results.md's
    committed, doc = printed[ROOT / "results"], (ROOT / "docs" / "results.md").read_text()
    for title in ("ResNet-18 w8, Fashion-MNIST", "ViT tiny, Fashion-MNIST", "LLaMA 4L d128, Shakespeare (chars)"):
        assert f"### {title}: " in committed
    rows = [line for line in committed.splitlines() if line.startswith("| ")]
    assert len(rows) > 20 and [row for row in rows if row not in doc] == []


def test_levers_report_tabulates_the_committed_levers_and_draws_the_pareto_chart(tmp_path: Path) -> None:
    chart = tmp_path / "pareto.png"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "levers_report.py"), "--plot", str(chart)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "re-drawn every 10" in result.stdout and "peak memory / DDP" in result.stdout
    ddp_rows = [line for line in result.stdout.splitlines() if line.startswith("| DDP, ")]
    assert len(ddp_rows) >= 3 and all("| 1.00x | 1.00x |" in row for row in ddp_rows), ddp_rows  # one per table
    tables = [line for line in result.stdout.splitlines() if line.startswith("### ")]
    assert_chart(chart, 715 * len(tables), 650)  # a 5.5 x 5 in panel per table, at 130 dpi


@pytest.mark.slow
def test_memory_script_measures_each_phase_against_ddp(tmp_path: Path) -> None:
    if not FASHION_MNIST.exists() and not os.environ.get("SUBNETDP_DATA"):
        pytest.skip("Fashion-MNIST not installed (scripts/get_data.sh)")
    env = {**os.environ, "TASKS": "vit_fashion_mnist", "RECIPES": "ddp b-sdp-full-sharded", "STEPS": "4",
           "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "memory_per_worker.sh")], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ddp = json.loads((tmp_path / "vit_fashion_mnist" / "ddp" / "summary.json").read_text())
    sdp = json.loads((tmp_path / "vit_fashion_mnist" / "b-sdp-full-sharded" / "summary.json").read_text())
    ddp_peak, sdp_peak = ddp["peak_memory_per_worker"], sdp["peak_memory_per_worker"]
    assert sdp_peak["full_phase"] <= sdp_peak["sdp_phase"] < ddp_peak["training"]
    assert set(sdp_peak["by_worker"]["sdp_phase"]) == {"0", "1", "2", "3"}


@pytest.mark.slow
def test_reshard_memory_script_trains_on_4_resumes_on_3_and_records_each_peak(tmp_path: Path) -> None:
    """docs/reliability.md's `bash scripts/reshard_memory.sh`, on the debug LLaMA preset."""
    env = {**os.environ, "PRESET": "debug", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "reshard_memory.sh"), str(tmp_path)], capture_output=True,
                            text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "re-planned and moved" in result.stdout
    peaks = {name: int((tmp_path / f"{name}.maxrss_kib").read_text()) for name in ("trained4", "fresh3", "resumed3")}
    assert all(kib > 100_000 for kib in peaks.values()), peaks  # a process that imported torch, measured
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["workers"] == 3 and summary["resumed_from"] == 1 and not summary["simulated"]
