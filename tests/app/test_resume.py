"""Resume is exact for every SDP variant: a run stopped at a checkpoint and resumed logs the same
losses, step for step, as the run that never stopped (--workers 2 --simulate, CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subnetdp.app.train.export import assemble_from_checkpoint

from _runs import SYNTHETIC, _config, _train, assert_chart, cli

# a constant learning rate: the stopped run may then end early (run.steps = 3) and be resumed to 6
CONSTANT = SYNTHETIC.replace("steps = 12", "steps = 6").replace("checkpoint_interval = 4", "checkpoint_interval = 3") \
    .replace("lr = 0.05", "lr = 0.05\nlr_schedule = \"constant\"")


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.mark.parametrize("level,masking", [("block", "forward"), ("block", "backward"),
                                           ("neuron", "forward"), ("neuron", "backward")])
@pytest.mark.slow
def test_resume_is_exact(tmp_path: Path, level: str, masking: str) -> None:
    config = _config(tmp_path, CONSTANT)
    sets = ["--workers", "2", "--simulate", "--set", "strategy.name=sdp", "--set", f"strategy.level={level}",
            "--set", f"strategy.masking={masking}", "--set", "strategy.coverage=0.5"]
    _train(config, tmp_path / "whole", *sets)
    _train(config, tmp_path / "stopped", *sets, "--set", "run.steps=3")
    _train(config, tmp_path / "stopped", *sets, "--set", "run.steps=6", "--resume")
    whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "stopped")
    assert sorted(resumed) == sorted(whole) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # after the resume: the same batches and the same state give the same loss
        assert resumed[step] == whole[step], (step, resumed, whole)


@pytest.mark.slow
def test_resume_on_another_kind_of_worker_moves_model_and_optimizer_exactly(tmp_path: Path) -> None:
    """Simulated workers, then the same 2 workers as real processes: the state goes through the
    assembly and the cut again (the re-plan-and-move path) and training continues as if unmoved."""
    config = _config(tmp_path, CONSTANT)
    sets = ["--set", "strategy.name=sdp", "--set", "strategy.level=neuron", "--set", "strategy.masking=forward"]
    _train(config, tmp_path / "whole", "--workers", "2", "--simulate", *sets)
    _train(config, tmp_path / "moved", "--workers", "2", "--simulate", *sets, "--set", "run.steps=3")
    result = _train(config, tmp_path / "moved", "--workers", "2", *sets, "--set", "run.steps=6", "--resume")
    assert "re-planned and moved" in result.stdout
    whole, moved = _losses(tmp_path / "whole"), _losses(tmp_path / "moved")
    for step in (4, 5, 6):
        assert moved[step] == pytest.approx(whole[step], rel=1e-5), (step, moved, whole)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["sdp", "ddp"])
def test_four_then_three_then_four_workers_continue_the_loss_curve(tmp_path: Path, strategy: str) -> None:
    text = CONSTANT.replace("steps = 6", "steps = 24").replace("checkpoint_interval = 3", "checkpoint_interval = 8")
    config = _config(tmp_path, text)
    sets = ["--set", f"strategy.name={strategy}", "--set", "strategy.coverage=0.5"]
    _train(config, tmp_path / "whole", "--workers", "4", "--simulate", *sets)
    out = tmp_path / "elastic"
    _train(config, out, "--workers", "4", "--simulate", *sets, "--set", "run.steps=8")
    _train(config, out, "--workers", "3", "--simulate", *sets, "--set", "run.steps=16", "--resume")
    _train(config, out, "--workers", "4", "--simulate", *sets, "--set", "run.steps=24", "--resume")
    whole, elastic = _losses(tmp_path / "whole"), _losses(out)
    assert sorted(elastic) == list(range(1, 25))
    assert elastic[8] == whole[8]  # the same run up to the first stop

    def late(losses: dict[int, float]) -> float:
        return sum(losses[s] for s in range(17, 25)) / 8

    # no restart from scratch at either move: the loss keeps going down from where it was
    assert sum(elastic[s] for s in range(9, 13)) / 4 < sum(elastic[s] for s in range(1, 5)) / 4
    assert late(elastic) == pytest.approx(late(whole), rel=0.15), (late(elastic), late(whole))


@pytest.mark.slow
def test_auto_resume_starts_then_resumes_on_other_workers(tmp_path: Path) -> None:
    config = _config(tmp_path, CONSTANT)
    out = tmp_path / "run"
    _train(config, out, "--workers", "2", "--simulate", "--auto-resume", "--set",
           "run.steps=3")  # nothing there: starts
    assert sorted(_losses(out)) == [1, 2, 3]
    # the launcher decides, and hands its workers --resume: simulated workers become 2 real ones
    result = _train(config, out, "--workers", "2", "--auto-resume", "--set", "run.steps=6")
    assert "re-planned and moved" in result.stdout
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]
    refused = _train(config, out, "--workers", "2", "--simulate", "--auto-resume", "--resume", check=False)
    assert refused.returncode == 2 and "--auto-resume decides between --resume and --overwrite" in refused.stderr


@pytest.mark.slow
def test_elastic_demo_script_runs_end_to_end(tmp_path: Path) -> None:
    """docs/reliability.md's `python scripts/elastic_demo.py`, a few steps on synthetic images."""
    import subprocess

    from _runs import ENV
    script = Path(__file__).resolve().parents[2] / "scripts" / "elastic_demo.py"
    out = tmp_path / "elastic"
    result = subprocess.run([sys.executable, str(script), "--out", str(out), "--steps", "6",
                             "--set", "data.name=synthetic-images", "--set", "eval.recalibrate_norm_batches=2"],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert_chart(out / "elastic_loss.png", 840, 480)  # 7 x 4 in at 120 dpi
    assert sorted(_losses(out / "elastic")) == sorted(_losses(out / "whole"))
    assert "| elastic |" in (out / "elastic.md").read_text()


@pytest.mark.slow
def test_sharded_runs_train_as_unsharded_resume_exactly_and_move_to_unsharded(tmp_path: Path) -> None:
    """strategy.shard = true (AdamW state split over holders) logs the unsharded run's losses; a
    sharded checkpoint resumes exactly, and resumes unsharded through the re-plan-and-move path."""
    adamw = CONSTANT.replace("[optim]", "[optim]\nname = \"adamw\"").replace("lr = 0.05", "lr = 0.01")
    config = _config(tmp_path, adamw)
    sets = ["--workers", "4", "--simulate", "--set", "strategy.name=sdp", "--set", "strategy.level=neuron",
            "--set", "strategy.coverage=0.5"]
    _train(config, tmp_path / "plain", *sets)
    _train(config, tmp_path / "sharded", *sets, "--set", "strategy.shard=true")
    _train(config, tmp_path / "stopped", *sets, "--set", "strategy.shard=true", "--set", "run.steps=3")
    _train(config, tmp_path / "stopped", *sets, "--set", "strategy.shard=true", "--set", "run.steps=6", "--resume")
    _train(config, tmp_path / "moved", *sets, "--set", "strategy.shard=true", "--set", "run.steps=3")
    moved = _train(config, tmp_path / "moved", *sets, "--set", "strategy.shard=false", "--set", "run.steps=6",
                   "--resume")
    assert "re-planned and moved" in moved.stdout
    plain, sharded = _losses(tmp_path / "plain"), _losses(tmp_path / "sharded")
    assert sorted(sharded) == [1, 2, 3, 4, 5, 6]
    for step in sharded:
        assert sharded[step] == pytest.approx(plain[step], rel=1e-5), (step, sharded, plain)
    assert _losses(tmp_path / "stopped") == sharded
    for step in (4, 5, 6):
        assert _losses(tmp_path / "moved")[step] == pytest.approx(plain[step], rel=1e-5)


@pytest.mark.slow
def test_runs_with_the_shared_weights_sharded_train_and_resume_as_sharded_runs(tmp_path: Path) -> None:
    """strategy.shard_shared_weights = true (ZeRO-3 of the shared weights) logs the losses of
    shard = true alone, bit for bit, full phase included (where every weight is shared, and the
    peak falls), and resumes exactly."""
    adamw = CONSTANT.replace("[optim]", "[optim]\nname = \"adamw\"").replace("lr = 0.05", "lr = 0.01")
    config = _config(tmp_path, adamw)
    sets = ["--workers", "4", "--simulate", "--set", "strategy.name=sdp", "--set", "strategy.coverage=0.5",
            "--set", "strategy.shard=true"]
    zero3 = [*sets, "--set", "strategy.shard_shared_weights=true"]
    full = ["--set", "strategy.full_phase=0.5"]
    _train(config, tmp_path / "sharded", *sets, *full)
    _train(config, tmp_path / "zero3", *zero3, *full)
    _train(config, tmp_path / "whole", *zero3)
    _train(config, tmp_path / "stopped", *zero3, "--set", "run.steps=3")
    _train(config, tmp_path / "stopped", *zero3, "--set", "run.steps=6", "--resume")
    sharded = _losses(tmp_path / "sharded")
    assert sorted(sharded) == [1, 2, 3, 4, 5, 6]
    assert _losses(tmp_path / "zero3") == sharded
    assert _losses(tmp_path / "stopped") == _losses(tmp_path / "whole")

    def full_phase_peak(run: str) -> int:
        return json.loads((tmp_path / run / "summary.json").read_text())["peak_memory_per_worker"]["full_phase"]
    assert full_phase_peak("zero3") < full_phase_peak("sharded")

    # on 2 real ranks (torchrun, gloo), full phase and evaluations included, as the simulated workers
    two = ["--set", "strategy.name=sdp", "--set", "strategy.coverage=0.5", "--set", "strategy.shard=true",
           "--set", "strategy.shard_shared_weights=true", *full]
    _train(config, tmp_path / "real", "--workers", "2", *two)
    _train(config, tmp_path / "simulated", "--workers", "2", "--simulate", *two)
    real, simulated = _losses(tmp_path / "real"), _losses(tmp_path / "simulated")
    assert sorted(real) == [1, 2, 3, 4, 5, 6]
    for step in real:
        assert real[step] == pytest.approx(simulated[step], rel=1e-5), (step, real, simulated)


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`subnetdp ARGS` (no CONFIG put in front, unlike ``_train``), which must succeed."""
    result = cli(*args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _stop_after(out: Path, step: int) -> None:
    """As if the run had been killed right after its checkpoint of ``step``."""
    for folder in (out / "checkpoints").iterdir():
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    (out / "summary.json").unlink()


@pytest.mark.slow
def test_a_plain_resume_continues_the_run_as_it_was_started(tmp_path: Path) -> None:
    """Started with --set run.steps=6 where the file says 12, stopped at step 3: `--resume` with
    only --out continues to step 6 on the same 2 simulated workers and says so; the CONFIG file,
    given as well, is not applied (a note says what differs); --set changes what a resume may
    change, and each change is printed."""
    config = _config(tmp_path, CONSTANT.replace("steps = 6", "steps = 12"))
    out = tmp_path / "run"
    _train(config, out, "--workers", "2", "--simulate", "--set", "run.steps=6")
    whole = _losses(out)
    _stop_after(out, 3)
    result = _cli("train", "--out", str(out), "--resume", "--no-progress")
    assert f"resuming {out} at step 3 of 6 (checkpoint step-00000003)\n" in result.stdout
    assert "re-planned" not in result.stdout  # the same 2 simulated workers: nothing moved
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["workers"], summary["simulated"], summary["resumed_from"]) == (6, 2, True, 3)
    assert _losses(out) == whole  # the uninterrupted run's losses, step for step

    _stop_after(out, 3)
    result = _cli("train", str(config), "--out", str(out), "--resume", "--no-progress")
    assert "note: --resume continues the run as it was started" in result.stderr
    assert "not applied: run.steps = 12 (the run's: 6)" in result.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 6

    result = _cli("train", "--out", str(out), "--resume", "--no-progress", "--set", "run.steps=8")
    assert f"resuming {out} at step 6 of 8 (checkpoint step-00000006); run.steps changed 6 -> 8\n" in result.stdout
    assert sorted(_losses(out)) == list(range(1, 9))


@pytest.mark.slow
def test_a_resume_that_stretches_the_schedule_trains_on_at_the_new_rate(tmp_path: Path) -> None:
    """A cosine run that ended (learning rate 0 at its last step) resumed with a larger run.steps:
    its next step follows the new schedule; the optimizer's stored rate of 0 is not kept."""
    config = _config(tmp_path, SYNTHETIC.replace("checkpoint_interval = 4", "checkpoint_interval = 0"))
    out = tmp_path / "run"
    _train(config, out, "--workers", "2", "--simulate", "--set", "run.steps=4")
    _train(config, out, "--workers", "2", "--simulate", "--set", "run.steps=5", "--resume")

    def conv_weights(step: int) -> list[torch.Tensor]:
        state, _ = assemble_from_checkpoint(out, step)
        return [v for k, v in state.items() if k.endswith("conv1.weight")]

    assert any(not torch.equal(a, b) for a, b in zip(conv_weights(4), conv_weights(5)))
