"""Reliability of the commands (issue 10): nothing is removed before everything is checked, a
finished run is left alone, torn metrics lines and damaged checkpoints are survived and reported,
and bad input is one line (`error: ...` on stderr, exit code 2), never a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from subnetdp.app.cli import main
from subnetdp.app.train import checkpoint as ckpt
from subnetdp.app.train import export as export_module

from _runs import _train

# 4 steps on 2 simulated workers, checkpoints at steps 2 and 4
SMALL = """
[run]
name = "small"
steps = 4
log_interval = 1
checkpoint_interval = 2
eval_interval = 0
[model]
name = "resnet18"
width = 4
[data]
name = "synthetic-images"
batch_size = 4
train_size = 64
test_size = 32
[eval]
recalibrate_norm_batches = 0
max_batches = 1
"""
LM = """
[model]
name = "llama"
preset = "debug"
[data]
name = "synthetic-text"
batch_size = 2
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, run folder) of a finished run; tests work on copies (``_copy``)."""
    base = tmp_path_factory.mktemp("finished")
    config = base / "small.toml"
    config.write_text(SMALL)
    out = base / "run"
    assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(out), "--no-progress"]) == 0
    return config, out


def _copy(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    config, run = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return config, out


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (but the lock) with its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _one_error_line(err: str) -> str:
    """The one line a failing command printed on stderr (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `--workers` launcher must fail before it builds a torchrun command."""
    def refuse(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("torchrun was launched")
    monkeypatch.setattr("subnetdp.app.launch.torchrun_command", refuse)


# ---------------------------------------------------------------------------------------------
# 1. a rerun into a run folder


def test_rerun_with_a_bad_coverage_leaves_the_run_folder_untouched(finished, tmp_path, capsys) -> None:
    config, out = _copy(finished, tmp_path)
    before = _snapshot(out)
    # 2 checkpoints, each: its manifest, the rank file, and the model's DCP files (.metadata, __0_0.distcp)
    assert len([k for k in before if k.startswith("checkpoints/")]) == 8
    code = main(["train", str(config), "--workers", "2", "--simulate", "--out", str(out), "--set",
                 "strategy.coverage=0.1"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("error: --set strategy.coverage=0.1: ")
    assert "the smallest valid coverage for 2 workers is 0.5" in line
    assert _snapshot(out) == before


def test_rerun_without_resume_or_overwrite_is_refused(finished, tmp_path, capsys, no_torchrun) -> None:
    config, out = _copy(finished, tmp_path)
    before = _snapshot(out)
    for launch in (["--workers", "2", "--simulate"], ["--workers", "2"]):  # the launcher refuses before torchrun starts
        assert main(["train", str(config), *launch, "--out", str(out)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"--out {out} already holds a run (metrics.jsonl, summary.json, checkpoints/)" in line
        assert "--resume" in line and "--overwrite" in line
    assert _snapshot(out) == before
    assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(out), "--resume",
                 "--overwrite"]) == 2
    assert "give one of them" in _one_error_line(capsys.readouterr().err)


def test_overwrite_replaces_only_what_a_run_writes(finished, tmp_path, capsys) -> None:
    config, out = _copy(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    # a stale checkpoint the new run would not write: it must not survive into the new run
    shutil.copytree(out / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000010")
    assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(out), "--no-progress",
                 "--overwrite",
                 "--set", "run.steps=2"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2] and json.loads((out / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_overwrite_reaches_the_torchrun_workers(finished, tmp_path) -> None:
    """The workers check the folder again: the launcher passes --overwrite on to them."""
    config, out = _copy(finished, tmp_path)
    _train(config, out, "--workers", "2", "--overwrite", "--set", "run.steps=2")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and not summary["simulated"] and summary["steps"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]


def test_coverage_below_one_over_n_is_one_line_before_torchrun(tmp_path, capsys, no_torchrun) -> None:
    config = tmp_path / "c.toml"
    config.write_text(SMALL + "[strategy]\ncoverage = 0.1\n")
    assert main(["train", str(config), "--workers", "4", "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == (f"error: {config}: [strategy] coverage 0.1 is below 1/N for N = 4 workers (no worker would "
                    "hold a unit); the smallest valid coverage for 4 workers is 0.25")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 2. --resume of a finished run


def test_resume_of_a_finished_run_changes_nothing(finished, tmp_path, capsys, no_torchrun) -> None:
    config, out = _copy(finished, tmp_path)
    before = _snapshot(out)
    for launch in (["--workers", "2", "--simulate"], ["--workers", "2"]):
        assert main(["train", str(config), *launch, "--out", str(out), "--resume"]) == 0
        text = capsys.readouterr().out.strip()
        assert text == (f"{out}: the run is already complete (checkpoint at step 4 of 4); nothing to resume, "
                        "summary.json and the checkpoints are kept; to train longer, resume with --set "
                        "run.steps=N larger than 4")
    assert _snapshot(out) == before
    # a resume under a changed config is still refused, complete or not
    assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(out), "--resume",
                 "--set", "optim.lr=0.5"]) == 2
    assert "optim.lr: checkpoint 0.1, now 0.5" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_resume_without_a_checkpoint_is_one_line_before_torchrun(tmp_path, capsys, no_torchrun) -> None:
    config = tmp_path / "c.toml"
    config.write_text(SMALL)
    assert main(["train", str(config), "--workers", "2", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "--resume: no complete checkpoint under" in _one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# 3. a torn metrics line


def test_torn_metrics_line_is_dropped_on_resume(finished, tmp_path, capsys) -> None:
    config, out = _copy(finished, tmp_path)
    (out / "summary.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 2.3, "l')  # the disk filled up mid-line
    assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(out), "--resume", "--no-progress",
                 "--set", "run.steps=6"]) == 0
    assert "dropped 1 unreadable line (torn by an interrupted write)" in capsys.readouterr().err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 4


# ---------------------------------------------------------------------------------------------
# 4. export


def _damage(folder: Path) -> None:
    target = folder / "rank-00000.pt"
    data = target.read_bytes()
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, another hash


def test_latest_reports_the_checkpoints_it_skipped(finished, tmp_path) -> None:
    _, out = _copy(finished, tmp_path)
    root = out / "checkpoints"
    _damage(root / "step-00000004")
    skipped: list[tuple[Path, str]] = []
    assert ckpt.latest(root, skipped=skipped)[1]["step"] == 2
    assert skipped == [(root / "step-00000004", "rank 0's file rank-00000.pt does not match its hash")]
    assert ckpt.latest(root)[1]["step"] == 2  # the callers that pass no list


def test_export_names_its_step_and_why_it_skipped_newer_ones(finished, tmp_path, capsys) -> None:
    _, out = _copy(finished, tmp_path)
    _damage(out / "checkpoints" / "step-00000004")
    target = tmp_path / "m.safetensors"
    assert main(["export", str(out), "--out", str(target)]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"warning: skipped the newer checkpoint {out}/checkpoints/step-00000004: "
                                    "rank 0's file rank-00000.pt does not match its hash")
    assert captured.out.strip() == f"written: {target} (checkpoint step 2; the newest complete one, 1 newer skipped)"
    _damage(out / "checkpoints" / "step-00000002")
    assert main(["export", str(out), "--out", str(tmp_path / "n.safetensors")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no complete checkpoint" in line and "skipped step-00000004: rank 0's file" in line


def test_export_of_a_missing_step_or_folder_is_one_line(finished, tmp_path, capsys) -> None:
    _, out = _copy(finished, tmp_path)
    assert main(["export", str(out), "--step", "3", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: --step 3: no checkpoint {out}/checkpoints/step-00000003; complete ones: step 2, 4")
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: {tmp_path}/nope is not a run folder (no such folder)"


def test_export_refuses_an_existing_out_unless_overwrite(finished, tmp_path, capsys, monkeypatch) -> None:
    _, out = _copy(finished, tmp_path)
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"an older export")
    assert main(["export", str(out), "--out", str(target)]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: --out {target} already exists: pass --overwrite to replace it, or choose another --out")
    assert target.read_bytes() == b"an older export"
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["export", str(out), "--out", str(folder), "--overwrite"]) == 2
    assert "is a folder: give a file name" in _one_error_line(capsys.readouterr().err)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "save_file", full_disk)
    assert main(["export", str(out), "--out", str(target), "--overwrite"]) == 2
    assert "No space left on device" in _one_error_line(capsys.readouterr().err)
    assert target.read_bytes() == b"an older export"
    monkeypatch.undo()
    assert main(["export", str(out), "--out", str(target), "--overwrite"]) == 0
    assert target.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.safetensors", "run"]  # no .tmp left


# ---------------------------------------------------------------------------------------------
# 5. bad input: one line, exit code 2


@pytest.mark.parametrize("args, message", [
    (["--set", "data.batch_size=0"], "error: --set data.batch_size=0: [data] batch_size = 0 for "
                                     "'synthetic-images': must be >= 1"),
    (["--set", "data.batch_size=-4"], "error: --set data.batch_size=-4: [data] batch_size = -4 for "
                                      "'synthetic-images': must be >= 1"),
    (["--set", "run.timeout=0"], "error: --set run.timeout=0: [run] timeout must be positive seconds, got 0"),
    (["--set", "run.timeout=-1.5"], "error: --set run.timeout=-1.5: [run] timeout must be positive seconds, "
                                    "got -1.5"),
    (["--set", "strategy.neuron_groups=-1"], "error: --set strategy.neuron_groups=-1: [strategy] neuron_groups "
                                             "must be >= 0 (0: one group per worker), got -1"),
    (["--set", "strategy.coverage=1.5"], "error: --set strategy.coverage=1.5: [strategy] coverage must be in "
                                         "(0, 1], got 1.5"),
    (["--set", "run.steps=ten"], "error: --set run.steps=ten: [run] steps = 'ten': expected a int like 100"),
    (["--set", "run.step=3"], "error: --set run.step=3: unknown key in [run] 'step' (did you mean 'steps'?)"),
    (["--set", "model.width=0"], "error: --set model.width=0: [model] width = 0 for 'resnet18': must be >= 1"),
    (["--workers", "0"], "error: --workers must be >= 1 workers, got 0"),
    (["--workers", "-2"], "error: --workers must be >= 1 workers, got -2"),
    (["--workers", "0", "--simulate"], "error: --workers must be >= 1 workers, got 0"),
])
def test_bad_train_values_are_one_line(tmp_path, capsys, no_torchrun, args, message) -> None:
    config = tmp_path / "c.toml"
    config.write_text(SMALL)
    if "--workers" not in args:
        args = [*args, "--workers", "2", "--simulate"]
    assert main(["train", str(config), "--out", str(tmp_path / "run"), *args]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value, message", [
    ("vocab_size", 0, "[data] vocab_size = 0 for 'synthetic-text': must be >= 1"),
    ("seq_len", 0, "[data] seq_len = 0 for 'synthetic-text': must be >= 1"),
    ("seq_len", -8, "[data] seq_len = -8 for 'synthetic-text': must be >= 1"),
])
def test_bad_data_sizes_in_the_config_file_name_the_file(tmp_path, capsys, key, value, message) -> None:
    config = tmp_path / "lm.toml"
    config.write_text(LM + f"{key} = {value}\n")
    assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"error: {config}: {message}" and "--set" not in line


def test_out_that_is_a_file_or_not_writable_is_one_line(tmp_path, capsys, monkeypatch, no_torchrun) -> None:
    config = tmp_path / "c.toml"
    config.write_text(SMALL)
    assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(config)]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: --out {config} is a file, not a folder: give a folder for the run")
    assert main(["train", str(config), "--workers", "2", "--out", str(config / "run")]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: --out {config}/run: {config} is a file, not a folder"
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: pretend the folder is read-only
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    else:
        locked.chmod(0o500)
    try:
        assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(locked / "run")]) == 2
        assert _one_error_line(capsys.readouterr().err) == f"error: --out {locked}/run: {locked} is not writable"
    finally:
        locked.chmod(0o700)


def test_warmup_longer_than_the_run_warns(tmp_path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text(SMALL)
    assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", "run.steps=2", "--set", "optim.warmup_steps=10"]) == 0
    assert ("warning: optim.warmup_steps = 10 is more than the run's 2 steps: the learning rate never leaves "
            "warm-up and peaks at 2/10 of optim.lr = 0.1") in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "error: --workers must be >= 1, got 0"),
    (["--workers", "-3"], "error: --workers must be >= 1, got -3"),
    (["--level", "neuron", "--neuron-groups", "-1"], "error: --neuron-groups must be >= 0 (0: one group per worker), "
                                                     "got -1"),
    (["--width", "0"], "error: --width must be >= 1, got 0"),
    (["--workers", "4", "--coverage", "0.1"], "error: coverage 0.1 with 4 workers gives round(C*N) = 0 holders"),
])
def test_bad_plan_values_are_one_line(capsys, args, message) -> None:
    assert main(["plan", "--width", "4", *args]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(message)


BENCH = ["bench", "--model", "resnet18", "--width", "4", "--batch-size", "2", "--backend", "fake",
         "--steps", "1", "--warmup", "0"]


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "error: --workers must be >= 1, got 0"),
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["--strategies", "zero3"], "error: --strategies: unknown strategy 'zero3'"),
    (["--workers", "4", "--strategies", "sdp-block-fwd@0.1"],
     "error: --strategies sdp-block-fwd@0.1: coverage 0.1 is below 1/N for N = 4 workers; the smallest valid "
     "coverage for 4 workers is 0.25"),
])
def test_bad_bench_values_are_one_line(tmp_path, capsys, args, message) -> None:
    assert main([*BENCH, "--out", str(tmp_path / "bench"), *args]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(message)
    assert not (tmp_path / "bench").exists()


def test_bench_fails_when_every_strategy_failed(tmp_path, capsys, monkeypatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr("subnetdp.app.bench.runner.measure", broken)
    out = tmp_path / "bench"
    assert main([*BENCH, "--workers", "2", "--strategies", "ddp,fsdp", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: every strategy failed (ddp, fsdp); see {out / 'bench.log'}" in err
    assert "ddp rank 0: failed: RuntimeError: out of memory" in (out / "bench.log").read_text()


# ---------------------------------------------------------------------------------------------
# 5. issue 17: resumes that say what they do, data that cannot feed a step, settings not meant


def test_a_resume_that_skips_a_damaged_checkpoint_says_so(finished, tmp_path, capsys) -> None:
    _, out = _copy(finished, tmp_path)
    (out / "summary.json").unlink()
    _damage(out / "checkpoints" / "step-00000004")
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--set", "run.steps=6"]) == 0
    captured = capsys.readouterr()
    assert (f"warning: skipped the newer checkpoint {out}/checkpoints/step-00000004: rank 0's file rank-00000.pt "
            "does not match its hash") in captured.err
    assert f"resuming {out} at step 2 of 6 (checkpoint step-00000002); run.steps changed 4 -> 6" in captured.out


@pytest.mark.slow
@pytest.mark.parametrize("launch", [["--workers", "2", "--simulate"], ["--workers", "2"]])
def test_data_smaller_than_one_global_batch_is_one_line_and_writes_nothing(tmp_path, capsys, launch) -> None:
    """64 training images, 2 workers x 40: one line naming the key, exit 2; the folder holds no
    run afterwards, so the corrected command runs without --overwrite."""
    config = tmp_path / "c.toml"
    config.write_text(SMALL)
    out = tmp_path / "run"
    if launch[0] == "--simulate":
        assert main(["train", str(config), *launch, "--out", str(out), "--set", "data.batch_size=40",
                     "--set", "strategy.coverage=1"]) == 2  # (coverage 1: no warning of k = 1 before the error)
        line = _one_error_line(capsys.readouterr().err)
    else:
        result = _train(config, out, *launch, "--set", "data.batch_size=40", check=False)
        assert result.returncode == 2, result.stderr[-3000:]
        line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --set data.batch_size=40: [data] batch_size = 40 on 2 workers is a global "
                           "batch of 80 examples, more than the 64 of the train set: lower data.batch_size (at most "
                           "32)"), line
    assert not any((out / name).exists() for name in ("metrics.jsonl", "summary.json", "checkpoints"))
    assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(out), "--no-progress",
                 "--set", "data.batch_size=32", "--set", "run.steps=1"]) == 0


def test_settings_that_are_valid_but_probably_not_meant_warn() -> None:
    from subnetdp.app.config import config_warnings, load_config

    def warnings(*sets: str, workers: int = 4) -> str:
        return "\n".join(config_warnings(load_config(None, list(sets)), workers))

    assert "strategy.full_phase = 0.01 of run.steps = 10 rounds to 0 steps: the run has no full-model phase" in \
        warnings("run.steps=10", "strategy.full_phase=0.01")
    assert "rounds to 0" not in warnings("run.steps=10", "strategy.full_phase=0.1")
    assert "strategy.full_phase with masking = 'backward'" in \
        warnings("strategy.full_phase=0.1", "strategy.masking=backward")
    single = warnings("strategy.coverage=0.25")
    assert "strategy.coverage = 0.25 on 4 workers gives each unit a single holder (k = 1)" in single
    assert "disconnected" in single and "a coverage of at least 0.5 gives k >= 2" in single
    assert warnings("strategy.coverage=0.5") == "" and warnings("strategy.coverage=0.25", workers=1) == ""
    assert warnings("strategy.name=ddp", "strategy.coverage=0.25") == ""


def test_full_phase_with_backward_masking_trains_and_ends_as_ddp(tmp_path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text(SMALL)
    out = tmp_path / "run"
    assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(out), "--no-progress",
                 "--set", "strategy.masking=backward", "--set", "strategy.full_phase=0.5"]) == 0
    assert "strategy.full_phase with masking = 'backward'" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["full_phase"]["from_step"] == 2 and summary["steps"] == 4
