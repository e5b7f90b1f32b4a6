"""`subnetdp sweep`: grid expansion and dedupe, validation before any run, and a tiny sweep on
synthetic images end to end through the command: aggregation over seeds, skipping complete cells,
restarting and resuming killed ones, --report-only."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from subnetdp.app.study.grid import SweepError, expand
from subnetdp.app.study.sweep import main

from _runs import TINY_TASK, assert_chart, cli

BASE = """
[run]
name = "sweep-test"
steps = 3
log_interval = 1
""" + TINY_TASK + """[eval]
batch_size = 64
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _write(tmp_path: Path, sweep: str) -> Path:
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "base.toml").write_text(BASE)
    (tmp_path / "sweeps").mkdir(exist_ok=True)
    path = tmp_path / "sweeps" / "sweep.toml"
    path.write_text(sweep)
    return path


def test_grid_expansion_ids_dedupe_and_group_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, """
[sweep]
name = "grid"
base = "../configs/base.toml"
workers = [2, 4]
seeds = [0, 1, 2]
set = ["run.steps=5"]

[[grid]]
name = "ddp"
"strategy.name" = ["ddp"]
"run.schedule" = ["flops", "iteration"]

[[grid]]
name = "sdp-forward"
"strategy.name" = ["sdp"]
"strategy.level" = ["block", "neuron"]
"strategy.coverage" = [0.25, 0.5, 0.75]
"run.schedule" = ["flops", "iteration"]
seeds = [0]

[[grid]]
name = "ddp again"
"strategy.name" = "ddp"
workers = [4]
seeds = [0, 7]
""")
    cells = expand(path)
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids))
    ddp = [c for c in cells if c.group == "ddp"]
    assert sorted(c.id for c in ddp) == sorted(f"ddp/n{n}/s{s}" for n in (2, 4) for s in (0, 1, 2))
    assert all(c.config["run"]["schedule"] == "iteration" for c in ddp)  # both schedules: one run
    sdp = [c for c in cells if c.group == "sdp-forward"]
    assert len(sdp) == 2 * 3 * 2 * 2 and {c.seed for c in sdp} == {0}
    assert "sdp-forward/level=block,coverage=0.5,schedule=flops/n4/s0" in ids
    # the third group's (N=4, seed 0) equals ddp/n4/s0: run once; seed 7 is new
    again = [c for c in cells if c.group == "ddp again"]
    assert [c.id for c in again] == ["ddp_again/n4/s7"]
    assert "ddp_again/n4/s0" in next(c for c in cells if c.id == "ddp/n4/s0").aliases
    assert len(cells) == 6 + 24 + 1
    assert all(c.config["run"]["steps"] == 5 and c.config["run"]["seed"] == c.seed for c in cells)
    assert all(re.fullmatch(r"[A-Za-z0-9._=,+-]+(/[A-Za-z0-9._=,+-]+)*", c.id) for c in cells)
    # command-line --set comes last; overriding a grid key collapses the cells it separated
    smoke = expand(path, ["run.steps=2", "strategy.level=block"])
    assert all(c.config["run"]["steps"] == 2 for c in smoke)
    assert "sdp-forward/coverage=0.5,schedule=flops/n4/s0" in [c.id for c in smoke]
    assert len(smoke) == 6 + 12 + 1


def test_a_bad_key_fails_before_anything_runs(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, """
[sweep]
base = "../configs/base.toml"
workers = [2]
[[grid]]
name = "ddp"
"strategy.name" = ["ddp"]
[[grid]]
name = "sdp"
"strategy.coverage" = [0.5, 1.5]
""")
    with pytest.raises(SweepError, match=r"cell sdp/coverage=1.5/n2/s0: .*coverage must be in \(0, 1\]"):
        expand(path)
    path.write_text(path.read_text().replace('"strategy.coverage" = [0.5, 1.5]', '"strategy.levle" = ["block"]'))
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cell sdp/n2/s0: --set strategy.levle=\"block\": unknown key in [strategy] 'levle' "
                          "(did you mean 'level'?)")
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def _sweep(path: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """`subnetdp sweep` in this process (its cells are processes of their own, as always)."""
    result = cli("sweep", str(path), "--out", str(out), "--no-progress", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _mtimes(out: Path) -> dict[str, int]:
    cells = out / "cells"
    return {str(p.parent.relative_to(cells)): p.stat().st_mtime_ns for p in cells.rglob("summary.json")}


@pytest.mark.slow
def test_sweep_runs_aggregates_skips_restarts_resumes_and_reports(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, """
[sweep]
name = "tiny"
base = "../configs/base.toml"
launch = "simulate"
workers = [2]
seeds = [0, 1]
set = ["run.checkpoint_interval=2"]

[[grid]]
name = "ddp"
"strategy.name" = ["ddp"]

[[grid]]
name = "sdp"
"strategy.name" = ["sdp"]
"strategy.coverage" = [0.5, 1.0]
""")
    out = tmp_path / "out"
    first = _sweep(path, out, "--jobs", "2")  # checkpoints are kept by default
    assert "6 to run" in first.stdout
    ids = ["ddp/n2/s0", "ddp/n2/s1", "sdp/coverage=0.5/n2/s0", "sdp/coverage=0.5/n2/s1",
           "sdp/coverage=1.0/n2/s0", "sdp/coverage=1.0/n2/s1"]
    assert sorted(_mtimes(out)) == sorted(ids)
    assert (out / "cells" / ids[0] / "train.log").read_text().count("written:") == 1

    results = json.loads((out / "results.json").read_text())
    assert results["main_metric"] == "accuracy"
    conditions = {c["id"]: c for c in results["conditions"]}
    assert list(conditions) == ["ddp/n2", "sdp/coverage=0.5/n2", "sdp/coverage=1.0/n2"]  # DDP first
    for cid, cond in conditions.items():
        summaries = [json.loads((out / "cells" / f"{cid}/s{s}" / "summary.json").read_text()) for s in (0, 1)]
        assert cond["seeds"] == [0, 1] and cond["cells"] == [f"{cid}/s0", f"{cid}/s1"]
        for name in ("accuracy", "test_loss", "wall_s", "steps"):
            values = [s["final_eval"][name] if name in s["final_eval"] else s[name] for s in summaries]
            m = cond["metrics"][name]
            assert m["n"] == 2 and m["values"] == pytest.approx(values) and m["seeds"] == [0, 1]
            assert m["mean"] == pytest.approx(statistics.mean(values))
            assert m["std"] == pytest.approx(statistics.stdev(values))
    sdp = conditions["sdp/coverage=0.5/n2"]
    assert sdp["strategy"] == "B-SDP fwd C=0.5" and sdp["vs_ddp_condition"] == "ddp/n2"
    assert sdp["vs_ddp"] == pytest.approx(sdp["metrics"]["accuracy"]["mean"]
                                          - conditions["ddp/n2"]["metrics"]["accuracy"]["mean"])
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| DDP | 2 | iteration |") and "(n=2)" in rows[1] and len(rows) == 4
    assert f"torch {summaries[0]['machine']['torch']}" in table and str(path) in table
    assert_chart(out / "metric_vs_coverage.png", 660, 504)  # one panel (N = 2) of 5.5 x 4.2 in at 120 dpi
    assert_chart(out / "loss_by_step.png", 900, 540)  # 7.5 x 4.5 in at 120 dpi

    # the same command again: every cell is complete
    before = _mtimes(out)
    again = _sweep(path, out, "--jobs", "2", "--keep-checkpoints")
    assert "6 complete (skipped), 0 to run" in again.stdout and _mtimes(out) == before

    # a cell killed before its first checkpoint restarts (old folder moved aside), one killed
    # after a checkpoint resumes; the others are skipped; checkpoints of the cells it finishes are
    # removed because --remove-checkpoints asks for it (by default they are kept)
    restart, resume = out / "cells" / ids[0], out / "cells" / ids[2]
    (restart / "summary.json").unlink()
    shutil.rmtree(restart / "checkpoints")
    (resume / "summary.json").unlink()
    shutil.rmtree(resume / "checkpoints" / "step-00000003")
    assert main([str(path), "--out", str(out), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert re.search(rf"{re.escape(ids[0])} +2 +0 +3 +restart", dry)
    assert re.search(rf"{re.escape(ids[2])} +2 +0 +3 +resume", dry)
    third = _sweep(path, out, "--remove-checkpoints")
    assert "4 complete (skipped), 2 to run" in third.stdout
    assert f"done   {ids[2]} (" in third.stdout and ", resumed)" in third.stdout
    after = _mtimes(out)
    assert {k for k in after if after[k] != before[k]} == {ids[0], ids[2]}
    assert len(list(restart.parent.glob("s0.incomplete-*"))) == 1
    assert not (restart / "checkpoints").exists() and not (resume / "checkpoints").exists()
    assert (out / "cells" / ids[1] / "checkpoints").exists()  # skipped: left as it was

    # the same sweep with another config is refused, before anything runs
    assert main([str(path), "--out", str(out), "--set", "run.steps=4"]) == 2
    assert "use a different --out" in capsys.readouterr().err

    # --report-only: no training, only the sweep folder
    for name in ("results.json", "results.md", "metric_vs_coverage.png"):
        (out / name).unlink()
    assert main(["--out", str(out), "--report-only"]) == 0
    assert _mtimes(out) == after and (out / "results.md").exists() and (out / "metric_vs_coverage.png").exists()
    assert len(json.loads((out / "results.json").read_text())["conditions"]) == 3


def test_a_run_recorded_before_a_schema_key_was_added_is_still_complete(tmp_path: Path) -> None:
    from subnetdp.app.config import load_config
    from subnetdp.app.study.cells import cell_state
    from subnetdp.app.study.grid import Cell
    wanted = load_config(None, ["strategy.coverage=0.5"]).to_dict()
    cell = Cell(id="sdp/n2/s0", group="sdp", workers=2, seed=0, overrides={"strategy.coverage": 0.5}, config=wanted)
    summary = tmp_path / "cells" / cell.id / "summary.json"
    summary.parent.mkdir(parents=True)

    def state_with(recorded: dict | None) -> str:
        summary.write_text(json.dumps({"config": recorded} if recorded is not None else {"steps": 3}))
        return cell_state(cell, tmp_path, "simulate")

    older = json.loads(json.dumps(wanted))
    del older["strategy"]["full_phase"]  # a key that did not exist when the run was made
    assert state_with(older) == "complete" == state_with(wanted)
    older["strategy"]["coverage"] = 0.25
    with pytest.raises(SweepError, match=r"sdp/n2/s0: .* different config \(strategy.coverage: 0.25 there, 0.5 now\)"):
        state_with(older)
    with pytest.raises(SweepError, match="was written with a different config; use a different --out"):
        state_with(None)  # a summary that records no config


def test_a_sweep_or_base_config_that_is_not_utf8_is_one_line(tmp_path: Path, capsys) -> None:
    """Issue 17, item 7: was a UnicodeDecodeError traceback."""
    path = _write(tmp_path, '[sweep]\nname = "tiny"\nbase = "../configs/base.toml"\n')
    out = tmp_path / "out"
    (tmp_path / "configs" / "base.toml").write_bytes(b"[run]\nname = \"\xff\"\n")
    assert main([str(path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {path}: base config: {tmp_path / 'configs' / 'base.toml'}: not a "
                                       "TOML file: byte 14 is not UTF-8 text (b'\\xff')\n")
    path.write_bytes('[sweep]\nname = "tiny ±"\n'.encode("latin-1"))
    for argv in ([str(path), "--out", str(out)], [str(path), "--out", str(out), "--dry-run"]):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"error: {path}: not a TOML file: byte 21 is not UTF-8 text (b'\\xb1')\n"
    assert not out.exists()
