"""Issue 18's levers in `subnetdp train`: re-drawn plans (strategy.redraw_every) resume exactly and
export; the sharded full phase trains as the replicated one did, inside the SDP phase's measured
memory per worker; the options that cannot apply are refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from _runs import SYNTHETIC, _config, _train, cli

CONSTANT = SYNTHETIC.replace("steps = 12", "steps = 6").replace("checkpoint_interval = 4", "checkpoint_interval = 3") \
    .replace("lr = 0.05", "lr = 0.05\nlr_schedule = \"constant\"")
REDRAW = ["--workers", "4", "--simulate", "--set", "strategy.name=sdp", "--set", "strategy.coverage=0.5",
          "--set", "strategy.redraw_every=2"]


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_a_run_with_redrawn_plans_resumes_exactly_and_exports(tmp_path: Path) -> None:
    config = _config(tmp_path, CONSTANT)
    _train(config, tmp_path / "whole", *REDRAW)
    _train(config, tmp_path / "stopped", *REDRAW, "--set", "run.steps=3")
    _train(config, tmp_path / "stopped", *REDRAW, "--set", "run.steps=6", "--resume")
    whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "stopped")
    for step in (4, 5, 6):  # steps 3-4 and 5-6 ran under plans drawn after the checkpoint of step 3
        assert resumed[step] == whole[step], (step, resumed, whole)
    summary = _summary(tmp_path / "whole")
    assert summary["redraw"]["plans_drawn"] == 3 and summary["redraw"]["bytes_moved_per_redraw"] > 0
    manifest = json.loads(next((tmp_path / "whole" / "checkpoints").glob("step-*6/manifest.json")).read_text())
    assert manifest["plan_seed_drawn"] != 0
    result = cli("export", str(tmp_path / "whole"), "--out", str(tmp_path / "model.safetensors"))
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_the_sharded_full_phase_trains_as_the_replicated_one_inside_the_sdp_phase_memory(tmp_path: Path) -> None:
    config = _config(tmp_path, CONSTANT)
    sets = ["--workers", "4", "--simulate", "--set", "strategy.name=sdp", "--set", "strategy.coverage=0.5",
            "--set", "strategy.full_phase=0.5", "--set", "strategy.full_phase_checkpointing=true"]
    _train(config, tmp_path / "sharded", *sets)
    _train(config, tmp_path / "replicated", *sets, "--set", "strategy.full_phase_shard=false")
    sharded, replicated = _losses(tmp_path / "sharded"), _losses(tmp_path / "replicated")
    own_steps = _summary(tmp_path / "sharded")["full_phase"]["from_step"]
    assert own_steps < 6
    for step in range(own_steps + 1, 7):  # DDP's updates either way (AdamW and SGD are elementwise)
        assert sharded[step] == pytest.approx(replicated[step], rel=1e-4), step
    memory = _summary(tmp_path / "sharded")["peak_memory_per_worker"]
    replicated_memory = _summary(tmp_path / "replicated")["peak_memory_per_worker"]
    assert memory["full_phase"] <= memory["sdp_phase"] == memory["whole_run"], memory
    # the sharded phase keeps 1/N of the gradients and momentum per worker
    assert memory["full_phase"] < replicated_memory["full_phase"], (memory, replicated_memory)


@pytest.mark.parametrize("sets,named", [
    (["strategy.level=neuron", "strategy.redraw_every=5"], "redraw_every"),
    (["strategy.shard=true", "strategy.redraw_every=5"], "redraw_every"),
    (["strategy.level=neuron", "strategy.full_phase=0.1", "strategy.full_phase_start=scaled"], "full_phase_start"),
])
def test_levers_that_cannot_apply_are_refused_in_one_line(tmp_path: Path, sets: list[str], named: str) -> None:
    args = [a for s in ["strategy.name=sdp", *sets] for a in ("--set", s)]
    result = _train(_config(tmp_path, CONSTANT), tmp_path / "run", "--workers", "2", "--simulate", *args, check=False)
    assert result.returncode == 2
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_activation_checkpointing_changes_no_update(tmp_path: Path) -> None:
    """strategy.checkpointing recomputes what the forward computed: the same losses, step for step
    (so a recipe's accuracy with it is the one measured without it, on models without BatchNorm,
    whose running statistics the recomputation updates a second time)."""
    text = CONSTANT.replace('name = "resnet18"\nwidth = 4', 'name = "llama"\npreset = "debug"').replace(
        'name = "synthetic-images"\nbatch_size = 8\ntrain_size = 512\ntest_size = 128',
        'name = "synthetic-text"\nbatch_size = 4\nseq_len = 16')
    config = _config(tmp_path, text)
    sets = ["--workers", "2", "--simulate", "--set", "strategy.name=sdp", "--set", "strategy.full_phase=0.5"]
    _train(config, tmp_path / "plain", *sets)
    _train(config, tmp_path / "ckpt", *sets, "--set", "strategy.checkpointing=true",
           "--set", "strategy.full_phase_checkpointing=true")
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "ckpt")


@pytest.mark.slow
def test_export_scale_branches_writes_the_scaled_evaluation_as_plain_weights(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from subnetdp.engine import scale_residual_branches
    from subnetdp.models import resnet18

    _train(_config(tmp_path, CONSTANT), tmp_path / "run", "--workers", "4", "--simulate", "--set", "strategy.name=sdp",
           "--set", "strategy.coverage=0.5")
    for name, extra in (("plain", []), ("scaled", ["--scale-branches"])):
        result = cli("export", str(tmp_path / "run"), "--out", str(tmp_path / f"{name}.safetensors"), *extra)
        assert result.returncode == 0, result.stderr
    kwargs = _summary(tmp_path / "run")["config"]["model"]
    plain, scaled = (resnet18(num_classes=10, in_channels=1, width=kwargs["width"]).eval() for _ in range(2))
    plain.load_state_dict(load_file(str(tmp_path / "plain.safetensors")))
    scaled.load_state_dict(load_file(str(tmp_path / "scaled.safetensors")))  # the plain class, strict keys
    scale_residual_branches(plain, "blocks", 2 / 4)  # what the run evaluated as scaled_*
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(scaled(x), plain(x))
    _train(_config(tmp_path, CONSTANT), tmp_path / "ddp", "--workers", "2", "--simulate", "--set", "run.steps=1",
           "--set", "strategy.name=ddp")
    refused = cli("export", str(tmp_path / "ddp"), "--out", str(tmp_path / "x.safetensors"), "--scale-branches")
    assert refused.returncode == 2 and "B-SDP" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_a_redrawn_run_resumes_on_its_own_workers_and_the_sharded_full_phase_moves(tmp_path: Path) -> None:
    """A re-drawn run resumes on the same workers only (one line); a run in its sharded full phase
    moves to 2 workers, each reading its chunks of the DCP checkpoint, and finishes."""
    config = _config(tmp_path, CONSTANT)
    _train(config, tmp_path / "redrawn", *REDRAW, "--set", "run.steps=3")
    result = _train(None, tmp_path / "redrawn", "--resume", "--workers", "2", "--simulate", "--set", "run.steps=6",
                    check=False)
    assert result.returncode == 2 and "re-drawn plans" in result.stderr, result.stderr
    full = ["--set", "strategy.name=sdp", "--set", "strategy.full_phase=0.5", "--set", "run.checkpoint_interval=1",
            "--set", "run.keep_checkpoints=10"]
    _train(config, tmp_path / "full", "--workers", "4", "--simulate", *full)
    for step in (5, 6):  # as if stopped at step 4, inside the full phase (steps 4-6)
        shutil.rmtree(tmp_path / "full" / "checkpoints" / f"step-{step:08d}")
    result = _train(None, tmp_path / "full", "--resume", "--workers", "2", "--simulate")
    assert "re-planned and moved" in result.stdout
    losses = _losses(tmp_path / "full")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    assert _summary(tmp_path / "full")["workers"] == 2


@pytest.mark.slow
def test_redrawn_plans_on_real_ranks_train_as_the_simulator(tmp_path: Path) -> None:
    config = _config(tmp_path, CONSTANT)
    sets = ["--set", "strategy.name=sdp", "--set", "strategy.coverage=0.5", "--set", "strategy.redraw_every=2"]
    _train(config, tmp_path / "simulated", "--workers", "2", "--simulate", *sets)
    _train(config, tmp_path / "real", "--workers", "2", *sets)
    simulated, real = _losses(tmp_path / "simulated"), _losses(tmp_path / "real")
    assert sorted(real) == sorted(simulated) == [1, 2, 3, 4, 5, 6]
    for step in simulated:
        assert real[step] == pytest.approx(simulated[step], rel=1e-5), (step, real, simulated)
    moved = [_summary(tmp_path / run)["redraw"]["bytes_moved_per_redraw"] for run in ("simulated", "real")]
    assert moved[0] == moved[1] > 0
