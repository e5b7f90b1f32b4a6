"""`subnetdp train` end to end: real torchrun workers on synthetic data, --simulate, exact resume
after killing a real multi-process run, and export to safetensors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from subnetdp.app.builders import build_task
from subnetdp.app.config import load_config
from subnetdp.app.train.export import assemble_from_checkpoint

from _runs import ENV, SYNTHETIC, _config, _train, cli


def _process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += parents.get(tree[-1], [])
    return tree


def _losses(out: Path) -> list[tuple]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x.get("loss"), json.dumps(x.get("eval"), sort_keys=True)) for x in lines]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic config on 2 real ranks (torchrun), shared by the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("real")
    out = tmp_path / "run"
    _train(_config(tmp_path), out, "--workers", "2")
    return out


@pytest.mark.slow
def test_two_workers_train_evaluate_checkpoint_and_export(real_run: Path, tmp_path: Path) -> None:
    out = real_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["steps"] == 12 and summary["strategy"] == "B-SDP fwd C=0.5"
    assert [e["step"] for e in summary["evals"]] == [6, 12]
    assert {"accuracy", "test_loss", "accuracy_recalibrated"} <= set(summary["final_eval"])
    ranks = summary["per_rank"]
    assert len(ranks) == 2 and all(r["comm_bytes_per_step"] > 0 and r["peak_rss_bytes_training"] > 0 for r in ranks)
    assert all(r["trainable_param_bytes"] == r["grad_bytes"] == r["optimizer_state_bytes"] for r in ranks)
    assert summary["plan"]["k"] == 1 and summary["config"]["strategy"]["coverage"] == 0.5
    assert [x[0] for x in _losses(out) if x[1] is not None] == list(range(1, 13))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]

    exported = tmp_path / "model.safetensors"
    result = cli("export", str(out), "--out", str(exported))
    assert result.returncode == 0, result.stderr
    task = build_task(load_config(_config(tmp_path)))
    model = task.make_model()
    model.load_state_dict(load_file(str(exported)), strict=True)
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for x, y in task.eval_batches(256, 0, 1, None):
            correct += (model(x).argmax(1) == y).sum().item()
            count += len(y)
    # the exported model is the one the run evaluated at its end
    assert correct / count == pytest.approx(summary["final_eval"]["accuracy"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, kill", [("sdp", True), ("ddp", False)])
def test_killed_multi_process_run_resumes_exactly(tmp_path: Path, strategy: str, kill: bool) -> None:
    """2 real ranks: a run SIGKILLed mid-run (torchrun and both workers) after its checkpoint at
    step 10 resumes to the uninterrupted run's losses and evaluations, bit for bit. For DDP (rank
    0's replica restores every rank) the stop is a copy of the finished run cut back to that
    checkpoint, which saves a third torchrun launch."""
    config = _config(tmp_path, SYNTHETIC.replace("steps = 12", "steps = 40").replace(
        "checkpoint_interval = 4", "checkpoint_interval = 10\nkeep_checkpoints = 5").replace(
        "batch_size = 8", "batch_size = 32"))
    sets = ["--workers", "2", "--set", f"strategy.name={strategy}"]
    reference = tmp_path / "reference"
    _train(config, reference, *sets)

    out = tmp_path / "killed"
    if kill:
        proc = subprocess.Popen([sys.executable, "-m", "subnetdp.app.cli", "train", str(config), "--out", str(out),
                                 "--no-progress", *sets], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-00000010").is_dir():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for pid in _process_tree(proc.pid):  # torchrun and both workers, mid-run
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    else:
        shutil.copytree(reference, out)
        for folder in (out / "checkpoints").iterdir():
            if folder.name != "step-00000010":
                shutil.rmtree(folder)
        (out / "summary.json").unlink()
    assert not (out / "summary.json").exists()

    _train(None, out, "--resume")  # on the run's own 2 real workers
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["resumed_from"] < 40
    assert summary["workers"] == 2 and not summary["simulated"]
    assert _losses(out) == _losses(reference)  # every loss and evaluation, bit for bit


def test_resume_with_a_different_config_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(_config(tmp_path), out, "--workers", "2", "--simulate")
    result = _train(_config(tmp_path), out, "--workers", "2", "--simulate", "--resume", "--set", "optim.lr=0.5",
                    check=False)
    assert result.returncode == 2 and "optim.lr: checkpoint 0.05, now 0.5" in result.stderr
    # another worker count is not a config change: tests/app/test_resume.py moves runs between counts


@pytest.mark.slow
def test_simulated_workers_match_real_ones(real_run: Path, tmp_path: Path) -> None:
    config = _config(tmp_path)
    _train(config, tmp_path / "sim", "--workers", "2", "--simulate")
    real = [x[1] for x in _losses(real_run) if x[1] is not None]
    sim = [x[1] for x in _losses(tmp_path / "sim") if x[1] is not None]
    assert sim == pytest.approx(real, rel=1e-4)


@pytest.mark.parametrize("model, data, extra, loss_key, accuracy_key, least_accuracy", [
    # 10 classes: chance is 0.1 (an untrained ViT scores 0.08, these 4 steps 0.21)
    ("vit", "synthetic-images", "preset = 'tiny32'\npatch_size = 8\ndepth = 4", "test_loss", "accuracy", 0.15),
    # 64 tokens: chance is 1/64 (an untrained LLaMA scores 0.003, these 4 steps 0.6)
    ("llama", "synthetic-text", "preset = 'debug'", "val_loss", "token_accuracy", 0.3),
])
@pytest.mark.slow
def test_other_models_train_at_block_and_neuron_level(tmp_path: Path, model: str, data: str, extra: str,
                                                      loss_key: str, accuracy_key: str, least_accuracy: float) -> None:
    """4 steps learn: the final evaluation's loss is well below the first step's training loss (the
    untrained model's, on its batch), and its accuracy well above chance. Without training (lr
    1e-12), the ViT's evaluation loss is 0.07 below its first loss and its accuracy 0.08; the
    LLaMA's is its first loss and 0.003."""
    text = (SYNTHETIC.replace('name = "resnet18"\nwidth = 4', f'name = "{model}"\n{extra}')
            .replace('name = "synthetic-images"\nbatch_size = 8\ntrain_size = 512\ntest_size = 128',
                     f'name = "{data}"\nbatch_size = 4')
            .replace("steps = 12", "steps = 4").replace("eval_interval = 6", "eval_interval = 0")
            .replace("[eval]", "[eval]\nmax_batches = 4"))
    for level in ("block", "neuron"):
        out = tmp_path / level
        _train(_config(tmp_path, text), out, "--workers", "4", "--simulate", "--set", f"strategy.level={level}",
               "--set", "optim.name=adamw", "--set", "optim.lr=0.001", "--set", "optim.grad_clip=1.0")
        summary = json.loads((out / "summary.json").read_text())
        first_loss = next(loss for _, loss, _ in _losses(out) if loss is not None)  # step 1's, before any update
        final = summary["final_eval"]
        assert final["step"] == 4 and final[loss_key] < first_loss - 0.1, (level, first_loss, final)
        assert final[accuracy_key] > least_accuracy, (level, final)
        assert len(summary["plan"]["holders"]) >= 2


@pytest.mark.slow
def test_flop_matched_schedule_extends_training_by_one_over_coverage(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(_config(tmp_path), out, "--workers", "4", "--simulate", "--set", "run.schedule=flops", "--set",
           "run.steps=3",
           "--set", "strategy.coverage=0.25", "--set", "run.eval_interval=0")
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


@pytest.mark.slow
def test_chunked_loss_trains_as_the_plain_loss_under_ddp_and_sdp(tmp_path: Path) -> None:
    text = (SYNTHETIC.replace('name = "resnet18"\nwidth = 4', 'name = "llama"\npreset = "debug"')
            .replace('name = "synthetic-images"\nbatch_size = 8\ntrain_size = 512\ntest_size = 128',
                     'name = "synthetic-text"\nbatch_size = 4')
            .replace("steps = 12", "steps = 4").replace("eval_interval = 6", "eval_interval = 0")
            .replace("[eval]", "[eval]\nmax_batches = 2"))
    config = _config(tmp_path, text)
    for strategy in ("ddp", "sdp"):
        sets = ["--workers", "2", "--simulate", "--set", f"strategy.name={strategy}", "--set", "optim.name=adamw",
                "--set", "optim.lr=0.001"]
        _train(config, tmp_path / f"{strategy}-plain", *sets)
        _train(config, tmp_path / f"{strategy}-chunked", *sets, "--set", "model.loss_chunk=16")
        plain, chunked = _losses(tmp_path / f"{strategy}-plain"), _losses(tmp_path / f"{strategy}-chunked")
        assert [r[0] for r in chunked] == [r[0] for r in plain] and len(plain) >= 4
        for (_, a, _), (_, b, _) in zip(chunked, plain):
            if b is not None:  # a training-loss line
                assert a == pytest.approx(b, rel=1e-5), (strategy, chunked, plain)


@pytest.mark.slow
def test_gradients_sent_in_bfloat16_train_close_to_float32(tmp_path: Path) -> None:
    config = _config(tmp_path, SYNTHETIC.replace("steps = 12", "steps = 6").replace("eval_interval = 6",
                                                                                   "eval_interval = 0"))
    sets = ["--workers", "4", "--simulate", "--set", "strategy.name=sdp", "--set", "strategy.coverage=0.5"]
    _train(config, tmp_path / "fp32", *sets)
    _train(config, tmp_path / "bf16", *sets, "--set", "strategy.reduce_dtype=bfloat16")
    exact = [x[1] for x in _losses(tmp_path / "fp32") if x[1] is not None]
    narrow = [x[1] for x in _losses(tmp_path / "bf16") if x[1] is not None]
    assert len(exact) == 6 and narrow[0] == exact[0]  # the first loss comes before any sync
    assert narrow == pytest.approx(exact, rel=2e-2) and narrow != exact
    refused = _train(config, tmp_path / "ddp", "--workers", "2", "--simulate", "--set", "strategy.name=ddp",
                     "--set", "strategy.reduce_dtype=bfloat16", check=False)
    assert refused.returncode == 2 and "reduce_dtype sets SDP's gradient buckets" in refused.stderr


def test_tensorboard_events_mirror_metrics_jsonl(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _train(_config(tmp_path), out, "--workers", "2", "--simulate", "--set", "run.tensorboard=true", "--set",
           "run.steps=4")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [x for x in _losses(out) if x[1] is not None]
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("loss")] == [(s, round(v, 5)) for s, v, _ in logged]
    assert "eval/accuracy" in events.Tags()["scalars"]  # the evaluation records too


def _strict_json(line: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant} in {line}")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.slow
@pytest.mark.parametrize("launch, interval", [(["--workers", "2", "--simulate"], 1), (["--workers", "2"], 0)])
def test_a_diverged_run_stops_at_its_first_non_finite_step(tmp_path: Path, launch: list[str], interval: int) -> None:
    """optim.lr = 1e6: the weights overflow within a few steps. Every rank stops there with one
    line naming the step (exit 1): a checkpoint due finds infinite weights and is not written (the
    newest finite checkpoint is kept), else the next step's loss is not finite and its update is not
    applied. metrics.jsonl stays strict JSON."""
    out = tmp_path / "run"
    result = _train(_config(tmp_path), out, *launch, "--set", "optim.lr=1e6",
                    "--set", f"run.checkpoint_interval={interval}", check=False)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run diverged at step ") and "NaN or infinite" in last, last
    step = int(last.split("the run diverged at step ")[1].split(":")[0])
    assert 1 <= step < 12 and not (out / "summary.json").exists()
    if "--simulate" in launch:
        assert "Traceback" not in result.stderr
    records = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] <= step and math.isfinite(r.get("loss", 0.0)) for r in records)
    if interval == 0:  # caught by the loss of the step after the overflow
        assert "the training loss" in last and not (out / "checkpoints").exists()
        return
    assert "the weights hold NaN or infinite values" in last
    kept = sorted((out / "checkpoints").iterdir())
    assert kept and int(kept[-1].name.split("-")[1]) == step - 1  # the newest finite state, not pruned
    for folder in kept:
        state, _ = assemble_from_checkpoint(out, int(folder.name.split("-")[1]))
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), folder
