"""SubnetworkDataParallel on real multi-process gloo groups (CPU)."""

from __future__ import annotations

import copy
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from _dist import run_distributed
from _models import batch_for, loss_of, make
from subnetdp import CollectiveError, PlanMismatchError, SubnetworkDataParallel, SubnetworkSimulator

STEPS = 3


def _optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


# ---------------------------------------------------------------------------------------------
# C = 1 is DDP


def _c1_versus_ddp(rank: int, world: int, opt_name: str) -> float:
    model = make("mlp")
    ddp = DistributedDataParallel(copy.deepcopy(model))
    sdp = SubnetworkDataParallel(model, blocks="blocks", coverage=1.0)
    opt_sdp, opt_ddp = _optimizer(opt_name, sdp.parameters()), _optimizer(opt_name, ddp.parameters())
    for step in range(5):
        x, y = batch_for("mlp", 1000 * step + rank)
        for wrapped, opt in ((sdp, opt_sdp), (ddp, opt_ddp)):
            loss_of("mlp", wrapped, x, y).backward()
            opt.step()
            opt.zero_grad()
    ours, theirs = sdp.module.state_dict(), ddp.module.state_dict()
    return max((ours[k] - theirs[k]).abs().max().item() for k in theirs)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_coverage_one_equals_ddp(opt_name: str) -> None:
    diffs = run_distributed(_c1_versus_ddp, 4, opt_name)
    assert max(diffs) < 1e-6, diffs


# ---------------------------------------------------------------------------------------------
# Averaging equals an independent single-process reference


def _one_backward_grads(rank: int, world: int) -> dict:
    model = make("mlp")
    sdp = SubnetworkDataParallel(model, blocks="blocks", coverage=0.5, seed=3)
    x, y = batch_for("mlp", rank)
    loss_of("mlp", sdp, x, y).backward()
    return {"holders": sdp.plan.holders,
            "grads": {n: p.grad.clone() for n, p in sdp.module.named_parameters()}}


def test_gradients_are_averaged_over_holders_only() -> None:
    results = run_distributed(_one_backward_grads, 4)
    holders = results[0]["holders"]
    full = make("mlp")
    per_rank = []
    for rank in range(4):  # reference: each worker's subnetwork, computed on the full model
        model = copy.deepcopy(full)
        x, y = batch_for("mlp", rank)
        h = model.inp(x)
        for i, block in enumerate(model.blocks):
            if rank in holders[f"blocks.{i}"]:
                h = block(h)
        nn.functional.cross_entropy(model.head(h), y).backward()
        per_rank.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                         for n, p in model.named_parameters()})
    for name in per_rank[0]:
        unit = next((u for u in holders if name.startswith(u + ".")), None)
        group = holders[unit] if unit else tuple(range(4))
        expected = sum(per_rank[r][name] for r in group) / len(group)
        for r in group:
            torch.testing.assert_close(results[r]["grads"][name], expected, rtol=1e-5, atol=1e-6)
        for r in set(range(4)) - set(group):
            assert name not in results[r]["grads"], f"rank {r} should not hold {name}"


# ---------------------------------------------------------------------------------------------
# Training: multi-process equals the simulator; bytes held; replicas; full_state_dict

# TINY: gradient buckets of a few hundred bytes, so each holder set's gradients travel in many
# all-reduces issued during backward (the overlapped path), not one at its end
TINY = 0.0005
CONFIGS = {
    "resnet-block-forward": ("resnet", dict(blocks="blocks", coverage=0.5)),
    "resnet-neuron-forward-scaled": ("resnet", dict(neurons="blocks", coverage=0.75, scale="inverse-coverage",
                                                    bucket_cap_mb=TINY)),
    "llama-block-forward-k1": ("llama", dict(blocks="model.layers", coverage=0.25)),
    "llama-neuron-forward": ("llama", dict(neurons="model.layers", coverage=0.5, bucket_cap_mb=TINY)),
    "llama-block-backward": ("llama", dict(blocks="model.layers", coverage=0.5, masking="backward",
                                           bucket_cap_mb=TINY)),
    "mlp-neuron-backward": ("mlp", dict(neurons="blocks", coverage=0.5, masking="backward")),
}


def _train(rank: int, world: int, names: list[str]) -> dict:
    report = {}
    for name in names:
        kind, kwargs = CONFIGS[name]
        sdp = SubnetworkDataParallel(make(kind), seed=7, **kwargs)
        opt = _optimizer("sgd", sdp.parameters())  # linear in the gradients: no amplified rounding
        for step in range(STEPS):
            x, y = batch_for(kind, 1000 * step + rank)
            loss_of(kind, sdp, x, y).backward()
            grad_bytes = sdp.held_bytes()["grads"]
            opt.step()
            opt.zero_grad(set_to_none=True)
        state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values()
                          for k, v in s.items() if k == "momentum_buffer")
        entry = {"plan_bytes": sdp.plan.worker_bytes[rank], "held": sdp.held_bytes(),
                 "grad_bytes": grad_bytes, "optimizer_bytes": state_bytes,
                 "full": sdp.full_state_dict()}
        if sdp.masking == "backward":
            entry["local_full"] = sdp.local_full_state_dict()
            entry["param_keys"] = [k for k, _ in make(kind).named_parameters()]
        report[name] = entry
    return report


def _simulate(name: str) -> dict[str, torch.Tensor]:
    kind, kwargs = CONFIGS[name]
    sim = SubnetworkSimulator(make(kind), 4, seed=7, **kwargs)
    opts = [_optimizer("sgd", w.parameters()) for w in sim.workers]
    for step in range(STEPS):
        for rank, worker in enumerate(sim.workers):
            x, y = batch_for(kind, 1000 * step + rank)
            loss_of(kind, worker, x, y).backward()
        sim.sync_gradients()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sim.sync_weights()
    return sim.full_state_dict()


@pytest.fixture(scope="module")
def trained() -> list[dict]:
    return run_distributed(_train, 4, list(CONFIGS), timeout=300)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_simulator_equals_multiprocess(trained: list[dict], name: str) -> None:
    simulated = _simulate(name)
    for rank in range(4):
        full = trained[rank][name]["full"]
        assert full.keys() == simulated.keys()
        for key in full:
            torch.testing.assert_close(full[key], simulated[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_workers_hold_exactly_their_units(trained: list[dict], name: str) -> None:
    for rank in range(4):
        r = trained[rank][name]
        assert r["held"]["trainable_params"] == r["plan_bytes"]
        assert r["grad_bytes"] == r["plan_bytes"]
        assert r["optimizer_bytes"] == r["plan_bytes"]  # SGD momentum: one buffer per held parameter
        if "forward" in name:  # nothing else is allocated for parameters
            assert r["held"]["all_params"] == r["plan_bytes"]
    total = sum(p.numel() * p.element_size() for p in make(CONFIGS[name][0]).parameters())
    coverage = CONFIGS[name][1]["coverage"]
    if coverage < 1:
        assert max(trained[r][name]["plan_bytes"] for r in range(4)) < total


@pytest.mark.parametrize("name", [n for n in CONFIGS if "backward" in n])
def test_backward_masking_replicas_are_bitwise_identical(trained: list[dict], name: str) -> None:
    reference = trained[0][name]["local_full"]
    for rank in range(1, 4):
        local = trained[rank][name]["local_full"]
        for key in trained[0][name]["param_keys"]:
            assert torch.equal(local[key], reference[key]), (rank, key)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_state_dict_loads_into_the_plain_model(trained: list[dict], name: str) -> None:
    kind = CONFIGS[name][0]
    plain = make(kind, seed=123)
    plain.load_state_dict(trained[0][name]["full"], strict=True)
    for rank in range(1, 4):  # every rank assembles the same model
        for key, value in trained[rank][name]["full"].items():
            assert torch.equal(value, trained[0][name]["full"][key])


# ---------------------------------------------------------------------------------------------
# Norm running statistics are averaged over the holders


def _bn_stats(rank: int, world: int) -> dict:
    sdp = SubnetworkDataParallel(make("resnet"), blocks="blocks", coverage=0.5)
    x, _ = batch_for("resnet", rank)
    sdp(x)
    local = {k: v.clone() for k, v in sdp.module.state_dict().items() if "running_mean" in k}
    return {"local": local, "full": sdp.full_state_dict(), "holders": sdp.plan.holders}


def test_running_statistics_are_averaged_over_holders() -> None:
    results = run_distributed(_bn_stats, 4)
    holders = results[0]["holders"]
    full = results[0]["full"]
    for key in full:
        if "running_mean" not in key:
            continue
        unit = next((u for u in holders if key.startswith(u + ".") and "downsample" not in key), None)
        group = holders[unit] if unit else range(4)
        expected = sum(results[r]["local"][key] for r in group) / len(group)
        torch.testing.assert_close(full[key], expected)


# ---------------------------------------------------------------------------------------------
# Failures end the run with a clear error


def _failing_peer(rank: int, world: int, failure: str) -> dict:
    """Rank 1 is stuck (never joins the all-reduce) or dead (exits); rank 0 must get an error."""
    sdp = SubnetworkDataParallel(make("mlp"), blocks="blocks", coverage=0.5, timeout=3)
    if rank == 1:
        if failure == "dead":
            os._exit(0)
        time.sleep(12)
        return {"rank": 1}
    x, y = batch_for("mlp", rank)
    start = time.monotonic()
    try:
        loss_of("mlp", sdp, x, y).backward()
    except CollectiveError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None}


@pytest.mark.parametrize("failure", ["stuck", "dead"])
def test_failing_peer_raises_collective_error_within_timeout(failure: str) -> None:
    result = run_distributed(_failing_peer, 2, failure, timeout=60)[0]
    assert result["error"] is not None, "backward should have raised"
    assert "gradient all_reduce over workers [0, 1]" in result["error"]
    assert result["seconds"] < 11  # the 3 s timeout, with room for a slow machine


def _mismatched_plans(rank: int, world: int) -> str:
    try:
        SubnetworkDataParallel(make("mlp"), blocks="blocks", coverage=0.5, seed=rank, timeout=30)
    except PlanMismatchError as exc:
        return f"PlanMismatchError: {exc}"
    return "no error"


def test_plan_mismatch_is_an_error_on_every_rank() -> None:
    results = run_distributed(_mismatched_plans, 2, timeout=60)
    assert all(r.startswith("PlanMismatchError") for r in results), results


def _single_worker(rank: int, world: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sdp = SubnetworkDataParallel(make("mlp"), blocks="blocks", coverage=0.5)
    x, y = batch_for("mlp", 0)
    loss_of("mlp", sdp, x, y).backward()
    return [str(w.message) for w in caught]


def test_world_of_one_is_allowed_with_a_warning() -> None:
    [messages] = run_distributed(_single_worker, 1)
    assert any("plain" in m for m in messages), messages


def _no_sync_accumulates(rank: int, world: int) -> float:
    model = make("mlp")
    ddp = DistributedDataParallel(copy.deepcopy(model))
    sdp = SubnetworkDataParallel(model, blocks="blocks", coverage=1.0)
    for wrapped in (sdp, ddp):
        with wrapped.no_sync():
            x, y = batch_for("mlp", rank)
            loss_of("mlp", wrapped, x, y).backward()
        x, y = batch_for("mlp", 10 + rank)
        loss_of("mlp", wrapped, x, y).backward()
    ours = dict(sdp.module.named_parameters())
    return max((ours[n].grad - p.grad).abs().max().item() for n, p in ddp.module.named_parameters())


def test_no_sync_accumulates_like_ddp() -> None:
    assert max(run_distributed(_no_sync_accumulates, 2)) < 1e-6


def test_requires_initialised_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(Exception, match="not initialised"):
        SubnetworkDataParallel(make("mlp"), blocks="blocks", coverage=0.5)


# ---------------------------------------------------------------------------------------------
# Gradient clipping by the full model's norm, the same on every worker


def _clipped_norms(rank: int, world: int) -> tuple[float, dict]:
    model = make("resnet")
    sdp = SubnetworkDataParallel(model, blocks="blocks", coverage=0.5, seed=1)
    x, y = batch_for("resnet", rank)
    loss_of("resnet", sdp, x, y).backward()
    norm = sdp.clip_grad_norm_(1e-3).item()
    return norm, {n: p.grad.norm().item() for n, p in sdp.named_parameters()}


def test_clip_grad_norm_uses_the_full_models_norm_on_every_worker() -> None:
    results = run_distributed(_clipped_norms, 4)
    sim = SubnetworkSimulator(make("resnet"), 4, blocks="blocks", coverage=0.5, seed=1)
    for rank, worker in enumerate(sim.workers):
        x, y = batch_for("resnet", rank)
        loss_of("resnet", worker, x, y).backward()
    sim.sync_gradients()
    # the full model's averaged gradient: each unit once (from its owner), shared parameters once
    full = sum(flat.double().pow(2).sum() for w in sim.workers for key, flat in w.grad_buckets().items()
               if key[0][0] == w.rank).sqrt().item()
    assert sim.clip_grad_norm_(1e-3).item() == pytest.approx(full)
    assert [r[0] for r in results] == pytest.approx([full] * 4, rel=1e-5)
    # holders of the same unit scaled their (identical) gradients by the same factor
    for rank, (_, grads) in enumerate(results):
        for name, value in grads.items():
            assert value == pytest.approx(dict(sim.workers[rank].named_parameters())[name].grad.norm().item(),
                                          rel=1e-4, abs=1e-9)


def _comm_bytes_with_single_holders(rank: int, world: int) -> tuple[int, int]:
    sdp = SubnetworkDataParallel(make("resnet"), blocks="blocks", coverage=0.5)  # N=2: k=1
    x, y = batch_for("resnet", rank)
    loss_of("resnet", sdp, x, y).backward()
    shared = sum(p.numel() * p.element_size() for n, p in sdp.named_parameters()
                 if not n.startswith("blocks.") or ".downsample." in n)
    return sdp.comm_bytes, shared


def test_units_with_one_holder_are_not_communicated() -> None:
    for sent, shared in run_distributed(_comm_bytes_with_single_holders, 2):
        assert sent == shared  # only the shared parameters are all-reduced
