"""`subnetdp bench`: strategies parse, every strategy runs on a fake process group (exact per-rank
memory, no communication), and two run on real gloo ranks through torchrun (the GPU script on CPU);
the report is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from subnetdp.app.bench.runner import blocks_run_forward, main, parse_strategy
from subnetdp.app.parallelism import RealSDP

from _models import batch_for, make
from _runs import assert_chart

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_strategy_names() -> None:
    s = parse_strategy("sdp-neuron-bwd@0.25")
    assert (s.kind, s.level, s.masking, s.coverage, s.checkpointing) == ("sdp", "neuron", "backward", 0.25, False)
    assert parse_strategy("sdp-block-fwd-ckpt@0.5").checkpointing
    assert parse_strategy("ddp-sd@0.5").stochastic_depth == 0.5
    assert parse_strategy("sdp-block-fwd-ckpt-shard@0.5").shard and not parse_strategy("sdp-block-fwd@0.5").shard
    shared = parse_strategy("sdp-block-fwd-ckpt-shard-shared@0.5")
    assert shared.shard and shared.shard_shared_weights and shared.checkpointing and shared.coverage == 0.5
    assert not parse_strategy("sdp-block-fwd-shard@0.5").shard_shared_weights
    with pytest.raises(ValueError, match="valid: ddp, fsdp"):
        parse_strategy("zero3")


@pytest.mark.slow
def test_every_strategy_on_a_fake_process_group(tmp_path: Path) -> None:
    main(["--model", "resnet18", "--width", "4", "--batch-size", "4", "--workers", "4", "--backend", "fake",
          "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    bench = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["strategy"]: r for r in bench["summary"]}
    assert not [r["strategy"] for r in bench["results"] if r["failed"]]
    assert len(rows) == 10 and all(len(r["ranks"]) == 4 for r in bench["results"])
    ddp, sdp, fsdp = rows["ddp"], rows["sdp-block-fwd@0.5"], rows["fsdp"]
    # measured, per worker: SDP and FSDP hold less than DDP; FSDP shards parameters 4 ways
    assert sdp["param_mib"] < ddp["param_mib"] and fsdp["param_mib"] == pytest.approx(ddp["param_mib"] / 4, rel=0.05)
    assert sdp["peak_tensor_mib"] < ddp["peak_tensor_mib"]
    assert rows["ddp-ckpt"]["kinds_mib"]["saved_activations"] < ddp["kinds_mib"]["saved_activations"]
    assert sdp["comm_mib_per_step"] < ddp["comm_mib_per_step"] and fsdp["comm_mib_per_step"] > 0
    # ring model: DDP all-reduces over all 4 (2 x 3/4 of its bytes); SDP's units over k = 2 holders (1x)
    assert ddp["wire_mib_per_step"] == pytest.approx(1.5 * ddp["comm_mib_per_step"])
    assert sdp["comm_mib_per_step"] <= sdp["wire_mib_per_step"] < 1.5 * sdp["comm_mib_per_step"]
    assert sdp["wire_mib_per_step"] < ddp["wire_mib_per_step"] and fsdp["wire_mib_per_step"] > 0
    text = (tmp_path / "bench.md").read_text()
    assert "| ddp | " in text and "## Targets" in text
    # bench_report.charts: 10 x 4.5 in, 10 x 4.5 in and 7 x 5 in at 120 dpi
    for png, size in (("memory_by_kind.png", (1200, 540)), ("step_time.png", (1200, 540)),
                      ("memory_vs_time.png", (840, 600))):
        assert_chart(tmp_path / png, *size)


@pytest.mark.slow
def test_sharded_sdp_keeps_less_optimizer_state_for_the_same_wire_bytes(tmp_path: Path) -> None:
    main(["--model", "llama", "--preset", "debug", "--seq-len", "32", "--vocab", "256", "--batch-size", "2",
          "--workers", "4", "--backend", "fake", "--steps", "2", "--warmup", "1", "--out", str(tmp_path),
          "--strategies", "sdp-block-fwd@0.5,sdp-block-fwd-shard@0.5,sdp-neuron-bwd-shard@0.5"])
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "bench.json").read_text())["summary"]}
    plain, sharded = rows["sdp-block-fwd@0.5"], rows["sdp-block-fwd-shard@0.5"]
    # units split over k = 2 holders, shared parameters over 4: well under half the AdamW state
    assert sharded["optimizer_mib"] < 0.5 * plain["optimizer_mib"]
    assert sharded["grad_mib"] < 0.5 * plain["grad_mib"]  # after backward: the shards' gradients only
    # a reduce-scatter and an all-gather put the all-reduce's bytes on the wire
    assert sharded["wire_mib_per_step"] == pytest.approx(plain["wire_mib_per_step"], rel=0.02)
    assert not rows["sdp-neuron-bwd-shard@0.5"].get("failed")


def test_checkpointed_blocks_are_the_ones_the_plan_runs_forward() -> None:
    """sdp-*-ckpt checkpoints the blocks whose forward this rank runs: under block-level forward
    masking the plan's held blocks, otherwise every block."""
    from subnetdp.measure.fake_group import init_fake_process_group
    paths = [f"blocks.{i}" for i in range(4)]
    for rank in range(4):
        init_fake_process_group(rank, 4)
        try:
            torch.manual_seed(0)
            par = RealSDP(make("mlp"), blocks="blocks", coverage=0.25, example_input=batch_for("mlp", 0)[0])
            held = blocks_run_forward(parse_strategy("sdp-block-fwd-ckpt@0.25"), par, paths)
            assert held and held == sorted(par.plan.held_units(rank)) and len(held) < len(paths)
            assert blocks_run_forward(parse_strategy("sdp-block-bwd-ckpt@0.25"), par, paths) == paths
            assert blocks_run_forward(parse_strategy("sdp-neuron-fwd-ckpt@0.25"), par, paths) == paths
        finally:
            dist.destroy_process_group()


@pytest.mark.slow
def test_chunked_loss_option_on_a_language_model(tmp_path: Path) -> None:
    for chunk in ("0", "8"):
        main(["--model", "llama", "--preset", "debug", "--vocab", "64", "--seq-len", "16", "--batch-size", "2",
              "--workers", "2", "--backend", "fake", "--strategies", "ddp,sdp-block-fwd@0.5", "--steps", "1",
              "--warmup", "1", "--loss-chunk", chunk, "--out", str(tmp_path / chunk)])
        bench = json.loads((tmp_path / chunk / "bench.json").read_text())
        assert not [r["strategy"] for r in bench["results"] if r["failed"]]
    assert bench["args"]["loss_chunk"] == 8


@pytest.mark.slow
def test_gpu_script_runs_each_strategy_in_its_own_process_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu/bench_final.sh as its docstring's CPU line runs it (a shorter strategy list):
    each strategy a torchrun job of 4 real gloo ranks."""
    env = {**ENV, "OUT": str(tmp_path), "DEVICE": "cpu", "PRESETS": "debug", "SEQ": "32", "VOCAB": "256",
           "BATCH": "2", "CHUNK": "16", "STEPS": "2", "STRATEGIES_debug": "ddp sdp-block-fwd-ckpt-shard-shared@0.5"}
    result = subprocess.run(["bash", "benchmarks/gpu/bench_final.sh"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads((tmp_path / "llama-debug" / "bench.json").read_text())
    assert {r["strategy"]: len(r["ranks"]) for r in bench["results"]} == {"ddp": 4,
                                                                         "sdp-block-fwd-ckpt-shard-shared@0.5": 4}
    assert not any(r["failed"] for r in bench["results"]) and "allocated at start" in result.stdout
    # real gloo ranks through torchrun (the script's bench launches them), measured per rank
    rows = {r["strategy"]: r for r in bench["summary"]}
    assert rows["sdp-block-fwd-ckpt-shard-shared@0.5"]["param_mib"] < rows["ddp"]["param_mib"]


def test_scaling_plot_over_committed_runs(tmp_path: Path) -> None:
    """scripts/plot_scaling.py as benchmarks/scaling-cpu/README.md runs it."""
    folders = [f"benchmarks/scaling-cpu/n{n}" for n in (2, 4, 8)]
    result = subprocess.run([sys.executable, "scripts/plot_scaling.py", *folders, "--out", str(tmp_path / "s.png")],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_chart(tmp_path / "s.png", 1650, 495)  # 15 x 4.5 in at 110 dpi
    sys.path.insert(0, "scripts")
    try:
        from plot_scaling import labels, ratios
    finally:
        sys.path.pop(0)
    assert labels("sdp-block-fwd@0.25", 8) == ["sdp-block-fwd@0.25", "sdp-block-fwd@2/N"]
    assert labels("sdp-block-fwd@0.5", 2) == ["sdp-block-fwd@0.5"]
    lines = ratios([Path(f) for f in folders])
    assert set(lines["sdp-block-fwd@0.5"]) == {2, 4, 8} and set(lines["sdp-block-fwd@2/N"]) == {4, 8}
    assert all(0 < r["peak_tensor_mib"] < 1 for r in lines["sdp-block-fwd@0.5"].values())


def test_the_shared_weight_figures_in_the_docs_are_those_of_the_committed_runs() -> None:
    """benchmarks/README.md's issue-20 table quotes the committed bench.json files (ratios to DDP)."""
    text = Path("benchmarks/README.md").read_text()
    section = text[text.index("## What they show: issue 20"):text.index("## What they show: issue 11")]
    for folder in ("cpu-resnet18-shared", "cpu-llama-tiny-v8192-shared", "cpu-llama-tiny-v8192-b2-shared"):
        bench = json.loads((Path("benchmarks") / folder / "bench.json").read_text())
        rows = {r["strategy"]: r for r in bench["summary"]}
        for name in ("sdp-block-fwd-shard@0.5", "sdp-block-fwd-shard-shared@0.5",
                     "sdp-block-fwd-ckpt-shard-shared@0.5"):
            ratio = rows[name]["peak_tensor_mib"] / rows["ddp"]["peak_tensor_mib"]
            assert f"{ratio:.2f}x" in section, (folder, name, ratio)
