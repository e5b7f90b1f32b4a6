"""Gradient alignment of SDP with DDP: C = 1 is exact, and g_SDP matches gradients computed by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subnetdp import SubnetworkSimulator
from subnetdp.measure.alignment import ddp_gradient, gradient_alignment, sdp_gradient

from _models import batch_for, make
from _runs import TINY_TASK, assert_chart, cli

VARIANTS = [("block", "forward"), ("block", "backward"), ("neuron", "forward"), ("neuron", "backward")]


def _mlp_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch_for("mlp", 10 + r) for r in range(n)]


@pytest.mark.parametrize("level,masking", VARIANTS)
def test_full_coverage_is_ddp(level: str, masking: str) -> None:
    torch.manual_seed(0)
    for model, batches in (
            (make("mlp"), _mlp_batches(3)),
            # BatchNorm: each worker's gradient uses its own batch's statistics, in both
            (make("resnet"), [(torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)])):
        r = gradient_alignment(model, batches, F.cross_entropy, level=level, masking=masking, coverage=1.0,
                               blocks="blocks")
        assert r["k"] == r["workers"] == len(batches) and r["coverage"] == 1.0
        for key in ("cosine", "cosine_shared", "cosine_units", "norm_ratio"):
            assert abs(r[key] - 1) < 1e-5, (type(model).__name__, key, r[key])


def _brute_force(model: nn.Module, batches: list, level: str, masking: str, coverage: float) -> dict[str, torch.Tensor]:
    """g_SDP by hand: each worker's gradient of its own (masked) model on its batch, averaged per
    entry over the workers holding that entry. Only who-holds-what comes from the engine."""
    n = len(batches)
    kwargs = {"blocks" if level == "block" else "neurons": "blocks"}
    sim = SubnetworkSimulator(model, n, coverage=coverage, masking=masking, **kwargs)
    names = [name for name, _ in model.named_parameters()]
    shapes = dict(model.named_parameters())
    holds = [{k: torch.zeros(shapes[k].shape, dtype=torch.bool) for k in names} for _ in range(n)]
    for piece in sim.workers[0].layout.pieces:
        if piece.key not in shapes:
            continue
        for r in piece.holders:
            for part in piece.of_full(holds[r][piece.key]):
                part.fill_(True)
    total = {k: torch.zeros(shapes[k].shape) for k in names}
    count = {k: torch.zeros(shapes[k].shape) for k in names}
    for r, (x, y) in enumerate(batches):
        ref = copy.deepcopy(model).train()
        if masking == "forward" and level == "block":  # a dropped MLPBlock is the identity
            held = set(sim.plan.held_units(r))
            for i in range(len(ref.blocks)):
                if f"blocks.{i}" not in held:
                    ref.blocks[i] = nn.Identity()
        elif masking == "forward":  # dropped hidden neurons contribute nothing: zero them
            for i, block in enumerate(ref.blocks):
                keep = holds[r][f"blocks.{i}.mlp.0.bias"].float()
                block.mlp[2].register_forward_pre_hook(lambda m, a, keep=keep: (a[0] * keep,))
        F.cross_entropy(ref(x), y).backward()
        grads = dict(ref.named_parameters())
        for k in names:
            if k in grads and grads[k].grad is not None:
                total[k] += torch.where(holds[r][k], grads[k].grad, 0.0)
            count[k] += holds[r][k].float()
    return {k: total[k] / count[k] for k in names}


@pytest.mark.slow
@pytest.mark.parametrize("level,masking", VARIANTS)
@pytest.mark.parametrize("workers,coverage", [(2, 0.5), (4, 0.5)])
def test_matches_brute_force(level: str, masking: str, workers: int, coverage: float) -> None:
    model, batches = make("mlp", seed=3), _mlp_batches(workers)
    expected = _brute_force(model, batches, level, masking, coverage)
    got = sdp_gradient(model, batches, F.cross_entropy, level=level, masking=masking, coverage=coverage,
                       blocks="blocks")
    assert got["k"] == round(coverage * workers)
    for key, value in expected.items():
        torch.testing.assert_close(got["grad"][key], value, rtol=1e-5, atol=1e-7, msg=key)
        assert bool(got["held"][key].all())
    flat_e = torch.cat([v.reshape(-1) for v in expected.values()]).double()
    g_ddp, _ = ddp_gradient(model, batches, F.cross_entropy)
    flat_d = torch.cat([g_ddp[k].reshape(-1) for k in expected]).double()
    cosine = (flat_e @ flat_d / (flat_e.norm() * flat_d.norm())).item()
    r = gradient_alignment(model, batches, F.cross_entropy, level=level, masking=masking, coverage=coverage,
                           blocks="blocks")
    assert abs(r["cosine"] - cosine) < 1e-5
    # C < 1: a different direction, but not an opposite one
    assert -1 < r["cosine"] < 1 - 1e-4 and -1 < r["cosine_units"] < 1 - 1e-4
    if masking == "backward":  # full forward: shared gradients are exactly DDP's
        assert abs(r["cosine_shared"] - 1) < 1e-6 and abs(r["norm_ratio_shared"] - 1) < 1e-5


def test_resnet_block_forward_matches_dropped_blocks_by_hand() -> None:
    """ResNet-18 (BatchNorm, down-sampling shortcuts): each worker's model with its non-held blocks
    replaced by their dropped form (shortcut only), gradients averaged over the workers having them."""
    from subnetdp.engine.units import analyse_block
    torch.manual_seed(0)
    model = make("resnet")
    batches = [(torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    plan = SubnetworkSimulator(model, 2, blocks="blocks", coverage=0.5).plan
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    count = dict.fromkeys(total, 0)
    for r, (x, y) in enumerate(batches):
        ref = copy.deepcopy(model).train()
        for i, block in enumerate(ref.blocks):
            if f"blocks.{i}" not in plan.held_units(r):
                ref.blocks[i] = analyse_block(block, f"blocks.{i}").dropped_module(block)
        F.cross_entropy(ref(x), y).backward()
        for k, p in ref.named_parameters():
            total[k] += p.grad
            count[k] += 1
    got = sdp_gradient(model, batches, F.cross_entropy, level="block", masking="forward", coverage=0.5,
                       blocks="blocks")
    for k in total:
        assert count[k] >= 1
        torch.testing.assert_close(got["grad"][k], total[k] / count[k], rtol=1e-5, atol=1e-7, msg=k)


def test_unit_split_and_micro_batches() -> None:
    model = make("mlp")
    batches = _mlp_batches(2)
    got = sdp_gradient(model, batches, F.cross_entropy, level="block", masking="forward", coverage=0.5,
                       blocks="blocks")
    assert not got["unit"]["inp.weight"].any() and not got["unit"]["head.bias"].any()
    assert got["unit"]["blocks.2.mlp.0.weight"].all() and got["unit"]["blocks.0.norm.weight"].all()
    # a worker's list of micro-batches is accumulated: for an MLP (no BatchNorm) the same as one
    # batch of twice the size
    split = [[(x[:2], y[:2]), (x[2:], y[2:])] for x, y in batches]
    a = gradient_alignment(model, batches, F.cross_entropy, level="block", masking="forward", coverage=0.5,
                           blocks="blocks")
    b = gradient_alignment(model, split, F.cross_entropy, level="block", masking="forward", coverage=0.5,
                           blocks="blocks")
    assert abs(a["cosine"] - b["cosine"]) < 1e-5 and abs(a["norm_ratio"] - b["norm_ratio"]) < 1e-5


CONFIG = """
[run]
name = "align-test"
steps = 4
checkpoint_interval = 2
keep_checkpoints = 5
log_interval = 2
""" + TINY_TASK + """[optim]
lr = 0.05
[strategy]
name = "ddp"
[eval]
batch_size = 64
"""


@pytest.mark.slow
def test_align_command_on_a_ddp_run(tmp_path) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    run = tmp_path / "run"
    train = cli("train", str(cfg), "--workers", "2", "--simulate", "--out", str(run),
                "--no-progress")  # in this process
    assert train.returncode == 0, train.stderr[-3000:]
    out, plot = tmp_path / "align.json", tmp_path / "align.png"
    result = cli("align", str(run), "--coverage", "0.5", "1", "--level", "block", "neuron", "--out", str(out),
                 "--plot", str(plot), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["workers"] == 2 and sorted({r["step"] for r in rows}) == [2, 4]
    assert len(rows) == 2 * 2 * 2 * 2  # steps x levels x maskings x coverages
    for row in rows:
        if row["coverage"] == 1:
            assert abs(row["cosine"] - 1) < 1e-5 and abs(row["norm_ratio"] - 1) < 1e-5
        else:
            assert -1 < row["cosine"] < 1
    assert "cosine" in result.stdout and "neuron" in result.stdout
    assert_chart(plot, 960, 576)  # 8 x 4.8 in at 120 dpi
