"""SubnetworkDataParallel on real multi-process gloo groups (CPU)."""

from __future__ import annotations

import copy
import gc
import os
import re
import time
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from subnetdp import (
    CollectiveError,
    PlanMismatchError,
    SDPConfigError,
    SubnetworkDataParallel,
    SubnetworkSimulator,
    plan_for,
)

from _dist import run_distributed
from _models import batch_for, loss_of, make, train_simulated

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
    train_simulated(sim, [_optimizer("sgd", w.parameters()) for w in sim.workers], range(STEPS), kind, stride=1000)
    return sim.full_state_dict()


@pytest.fixture(scope="module")
def trained() -> list[dict]:
    return run_distributed(_train, 4, list(CONFIGS), timeout=300)


@pytest.mark.slow
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
        time.sleep(6)  # longer than rank 0's 3 s timeout
        return {"rank": 1}
    x, y = batch_for("mlp", rank)
    start = time.monotonic()
    try:
        loss_of("mlp", sdp, x, y).backward()
    except CollectiveError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None}


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["stuck", "dead"])
def test_failing_peer_raises_collective_error_within_timeout(failure: str) -> None:
    result = run_distributed(_failing_peer, 2, failure, timeout=60, fresh=True)[0]  # it kills or stalls a rank
    assert result["error"] is not None, "backward should have raised"
    assert "gradient all_reduce over workers [0, 1]" in result["error"]
    assert result["seconds"] < 11  # the 3 s timeout, with room for a slow machine


def _mismatched_plans(rank: int, world: int, field: str) -> tuple[str, float]:
    kwargs = {"seed": rank} if field == "seed" else {"coverage": 0.5 if rank == 0 else 1.0}
    started = time.monotonic()
    try:
        SubnetworkDataParallel(make("mlp"), blocks="blocks", timeout=30, **{"coverage": 0.5, **kwargs})
    except PlanMismatchError as exc:
        return f"PlanMismatchError: {exc}", time.monotonic() - started
    return "no error", time.monotonic() - started


@pytest.mark.parametrize("field,named", [("seed", "seed: rank 0 0, rank 1 1"),
                                         ("coverage", "coverage: rank 0 0.5, rank 1 1.0")])
def test_plan_mismatch_is_an_error_on_every_rank_naming_what_differs(field: str, named: str) -> None:
    # different coverages give different holder sets: the check must come before any group exists
    results = run_distributed(_mismatched_plans, 2, field, timeout=60)
    for message, seconds in results:
        assert message.startswith("PlanMismatchError") and named in message, message
        assert seconds < 20  # at once, not after the 30 s timeout


def _initial_weights(rank: int, world: int) -> dict:
    model = make("mlp", seed=rank)  # each rank initialised differently
    sdp = SubnetworkDataParallel(model, blocks="blocks", coverage=0.5)
    comm_bytes = sdp.comm_bytes
    return {"full": sdp.full_state_dict(), "shared": sdp.module.head.weight.detach().clone(),
            "comm_bytes": comm_bytes}


def test_initial_weights_come_from_rank_zero_as_ddp() -> None:
    results = run_distributed(_initial_weights, 2)
    rank0 = make("mlp", seed=0).state_dict()
    for result in results:
        torch.testing.assert_close(result["shared"], rank0["head.weight"], rtol=0, atol=0)
        for key, value in result["full"].items():
            torch.testing.assert_close(value, rank0[key], rtol=0, atol=0, msg=key)
        assert result["comm_bytes"] == 0  # set-up traffic is not counted as training communication


def _optimizer_before_wrapping(rank: int, world: int, masking: str, before: bool) -> dict:
    model = make("mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2) if before else None
    sdp = SubnetworkDataParallel(model, neurons="blocks", coverage=0.5, masking=masking)
    opt = opt or torch.optim.AdamW(sdp.parameters(), lr=1e-2)
    for step in range(2):
        x, y = batch_for("mlp", 10 * step + rank)
        loss_of("mlp", sdp, x, y).backward()
        opt.step()
        opt.zero_grad()
    return sdp.full_state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("masking", ["forward", "backward"])
def test_an_optimizer_built_before_wrapping_trains_the_sliced_weights(masking: str) -> None:
    before = run_distributed(_optimizer_before_wrapping, 2, masking, True)[0]
    after = run_distributed(_optimizer_before_wrapping, 2, masking, False)[0]
    initial = make("mlp").state_dict()
    assert not torch.equal(before["blocks.0.mlp.0.weight"], initial["blocks.0.mlp.0.weight"])
    for key, value in after.items():
        torch.testing.assert_close(before[key], value, rtol=1e-6, atol=1e-7, msg=key)


def _single_worker(rank: int, world: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sdp = SubnetworkDataParallel(make("mlp"), blocks="blocks", coverage=0.5)
    x, y = batch_for("mlp", 0)
    loss_of("mlp", sdp, x, y).backward()
    return [str(w.message) for w in caught]


@pytest.mark.slow
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


# no_sync below C = 1: the first micro-batch's gradient stays local, the second backward averages
# the accumulated sum
NO_SYNC = {"block-forward": dict(blocks="blocks", coverage=0.5),
           "neuron-backward": dict(neurons="blocks", coverage=0.5, masking="backward")}


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _no_sync_below_one(rank: int, world: int, name: str) -> dict:
    (x1, y1), (x2, y2) = batch_for("mlp", rank), batch_for("mlp", 100 + rank)
    sdp = SubnetworkDataParallel(make("mlp"), seed=2, **NO_SYNC[name])
    with sdp.no_sync():
        loss_of("mlp", sdp, x1, y1).backward()
    out = {"local": _grads(sdp), "bytes_inside": sdp.comm_bytes}
    loss_of("mlp", sdp, x2, y2).backward()
    out.update(accumulated=_grads(sdp), bytes_after=sdp.comm_bytes)
    one = SubnetworkDataParallel(make("mlp"), seed=2, **NO_SYNC[name])
    (loss_of("mlp", one, x1, y1) + loss_of("mlp", one, x2, y2)).backward()
    out["summed"] = _grads(one)
    return out


@pytest.mark.parametrize("name", list(NO_SYNC))
def test_no_sync_below_coverage_one_accumulates_then_averages(name: str) -> None:
    results = run_distributed(_no_sync_below_one, 4, name)
    sim = SubnetworkSimulator(make("mlp"), 4, seed=2, **NO_SYNC[name])
    for rank, worker in enumerate(sim.workers):  # the simulator averages only when told to
        loss_of("mlp", worker, *batch_for("mlp", rank)).backward()
    local = [_grads(w) for w in sim.workers]
    for rank, worker in enumerate(sim.workers):
        loss_of("mlp", worker, *batch_for("mlp", 100 + rank)).backward()
    sim.sync_gradients()
    for rank, r in enumerate(results):
        assert r["bytes_inside"] == 0 and r["bytes_after"] > 0, rank
        expected = _grads(sim.workers[rank])
        assert r["local"].keys() == local[rank].keys() == r["accumulated"].keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(r["local"][key], local[rank][key], msg=f"rank {rank} {key}")
            torch.testing.assert_close(r["accumulated"][key], r["summed"][key], rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank} {key}")
            torch.testing.assert_close(r["accumulated"][key], expected[key], rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank} {key}")


# ---------------------------------------------------------------------------------------------
# Mixed parameter dtypes under autocast: float32 and bfloat16 gradients in one set of buckets


def _mixed_mlp() -> nn.Module:
    model = make("mlp")
    model.inp.to(torch.bfloat16)            # shared parameters of both dtypes (the head stays float32)
    model.blocks[1].mlp.to(torch.bfloat16)  # one unit with both dtypes (its norm stays float32)
    return model


MIXED = {"block-forward": dict(blocks="blocks", coverage=0.5, bucket_cap_mb=TINY),
         "neuron-backward": dict(neurons="blocks", coverage=0.5, masking="backward", bucket_cap_mb=TINY)}


def _mixed_backward(worker: nn.Module, rank: int) -> None:
    x, y = batch_for("mlp", rank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of("mlp", worker, x, y)
    loss.backward()


def _mixed_grads(rank: int, world: int, name: str) -> dict:
    sdp = SubnetworkDataParallel(_mixed_mlp(), seed=4, **MIXED[name])
    _mixed_backward(sdp, rank)
    return {n: (p.dtype, p.grad.clone()) for n, p in sdp.named_parameters()}


@pytest.mark.parametrize("name", list(MIXED))
def test_mixed_dtypes_under_autocast_equal_the_simulator(name: str) -> None:
    results = run_distributed(_mixed_grads, 4, name)
    sim = SubnetworkSimulator(_mixed_mlp(), 4, seed=4, **MIXED[name])
    for rank, worker in enumerate(sim.workers):
        _mixed_backward(worker, rank)
    sim.sync_gradients()
    dtypes = set()
    # parameters that a worker holds whole, under the plain model's name (under backward masking a
    # worker's slice of a neuron-level weight has a name of its own, and differs between workers)
    whole = {n for n, _ in _mixed_mlp().named_parameters()}
    for rank, grads in enumerate(results):
        expected = dict(sim.workers[rank].named_parameters())
        assert grads.keys() == expected.keys()
        for key, (dtype, grad) in grads.items():
            assert grad.dtype == dtype == expected[key].dtype, (rank, key, grad.dtype, dtype)
            dtypes.add(dtype)
            # bfloat16: the all-reduce sums in another order than the simulator; allow one bf16
            # epsilon (2^-7) of the tensor's largest entry
            atol = 2 ** -7 * expected[key].grad.abs().max().item() if dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(grad, expected[key].grad, rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-5,
                                       atol=atol, msg=f"rank {rank} {key}")
            for other in results[:rank]:  # every worker that trains it got the same average
                if key in other and key in whole:
                    assert torch.equal(other[key][1], grad), (rank, key)
    assert dtypes == {torch.float32, torch.bfloat16}
    assert any(dt == torch.bfloat16 for dt, _ in results[0].values())  # shared bf16 parameters on every rank


# ---------------------------------------------------------------------------------------------
# Backward masking with two optimizers and sync_weights_after_step=False


def _two_optimizers(rank: int, world: int, steps: int) -> dict:
    sdp = SubnetworkDataParallel(make("mlp"), blocks="blocks", coverage=0.5, masking="backward", seed=5,
                                 sync_weights_after_step=False)
    params = list(sdp.parameters())
    opts = [torch.optim.SGD(params[:len(params) // 2], lr=0.1, momentum=0.9),
            torch.optim.AdamW(params[len(params) // 2:], lr=1e-2)]
    for step in range(steps):
        loss_of("mlp", sdp, *batch_for("mlp", 100 * step + rank)).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        if step == steps - 1:
            before = sdp.local_full_state_dict()
        sdp.sync_weights()
    return {"before": before, "after": sdp.local_full_state_dict(),
            "keys": [k for k, _ in make("mlp").named_parameters()]}


def test_two_optimizers_without_the_step_hook_need_one_sync_weights_call() -> None:
    steps = 2
    results = run_distributed(_two_optimizers, 4, steps)
    keys = results[0]["keys"]
    for rank in range(1, 4):  # replicas are bitwise identical after the explicit call
        for key in keys:
            assert torch.equal(results[rank]["after"][key], results[0]["after"][key]), (rank, key)
    # ... and not before it: the automatic broadcast after step() is off
    stale = [(rank, key) for rank in range(1, 4) for key in keys
             if not torch.equal(results[rank]["before"][key], results[0]["before"][key])]
    assert stale
    # the values are those of the simulator with the same two optimizers
    sim = SubnetworkSimulator(make("mlp"), 4, blocks="blocks", coverage=0.5, masking="backward", seed=5)
    opts = []
    for worker in sim.workers:
        params = list(worker.parameters())
        opts += [torch.optim.SGD(params[:len(params) // 2], lr=0.1, momentum=0.9),
                 torch.optim.AdamW(params[len(params) // 2:], lr=1e-2)]
    for step in range(steps):
        for rank, worker in enumerate(sim.workers):
            loss_of("mlp", worker, *batch_for("mlp", 100 * step + rank)).backward()
        sim.sync_gradients()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        sim.sync_weights()
    full = sim.full_state_dict()
    for key in keys:
        torch.testing.assert_close(results[0]["after"][key], full[key], rtol=1e-5, atol=1e-6, msg=key)


def test_requires_initialised_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(SDPConfigError, match="torch.distributed is not initialised: call dist.init_process_group"):
        SubnetworkDataParallel(make("mlp"), blocks="blocks", coverage=0.5)


# ---------------------------------------------------------------------------------------------
# Bad arguments: a clear SDPConfigError before the first step, from every public entry point


class _Widen(nn.Module):  # untraceable (data-dependent branch), output wider than input
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > -1e9 else x


class _WideningNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Widen(), _Widen()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


def _bad_model(kind: str) -> nn.Module:
    if kind == "non-residual":
        return nn.Sequential(nn.ModuleList([nn.Linear(5, 8), nn.Linear(8, 8)]))
    if kind == "widening":
        torch.manual_seed(0)
        return _WideningNet()
    if kind == "meta":
        with torch.device("meta"):
            return make("mlp")
    return make(kind)


# name: (model, keyword arguments, message); coverage 0.1 rounds to 0 holders for N = 2 and N = 4
BAD_ARGUMENTS = {
    "coverage-zero": ("mlp", dict(blocks="blocks", coverage=0), r"coverage must be in \(0, 1\]"),
    "coverage-negative": ("mlp", dict(blocks="blocks", coverage=-0.1), r"coverage must be in \(0, 1\]"),
    "coverage-above-one": ("mlp", dict(blocks="blocks", coverage=1.01), r"coverage must be in \(0, 1\]"),
    "coverage-two": ("mlp", dict(blocks="blocks", coverage=2), r"coverage must be in \(0, 1\]"),
    "coverage-rounds-to-zero-holders": ("mlp", dict(blocks="blocks", coverage=0.1), r"round\(C\*N\) = 0"),
    "path-names-nothing": ("mlp", dict(blocks="layers", coverage=0.5),
                           r"'layers' names nothing.*\['inp', 'blocks', 'head'\]"),
    "path-in-list-names-nothing": ("mlp", dict(blocks=["blocks.0", "blocks.9"], coverage=0.5), "names nothing"),
    "blocks-and-neurons": ("mlp", dict(blocks="blocks", neurons="blocks"), "exactly one"),
    "neither-blocks-nor-neurons": ("mlp", dict(coverage=0.5), "exactly one"),
    "unknown-masking": ("mlp", dict(blocks="blocks", masking="sideways"), "masking must be"),
    "unknown-scale": ("mlp", dict(blocks="blocks", scale="double"), "scale must be"),
    "non-residual-block": ("non-residual", dict(blocks="0", coverage=0.5), "not residual"),
    "untraceable-block-changes-shape": ("widening", dict(blocks="blocks", coverage=0.5,
                                                         example_input=torch.randn(2, 4)), "no traceable shortcut"),
    "timeout-not-positive": ("mlp", dict(blocks="blocks", timeout=0), "timeout must be positive"),
    "model-on-meta-device": ("meta", dict(blocks="blocks", coverage=0.5), "meta device"),
}
# plan_for only plans: a model on the meta device or a timeout are none of its business
PLAN_ERRORS = [n for n in BAD_ARGUMENTS if n not in ("model-on-meta-device", "timeout-not-positive")]


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_config_errors_in_the_simulator(case: str) -> None:
    kind, kwargs, message = BAD_ARGUMENTS[case]
    with pytest.raises(SDPConfigError, match=message):
        SubnetworkSimulator(_bad_model(kind), 4, **kwargs)


@pytest.mark.parametrize("case", PLAN_ERRORS)
def test_bad_arguments_are_config_errors_in_plan_for(case: str) -> None:
    kind, kwargs, message = BAD_ARGUMENTS[case]
    with pytest.raises(SDPConfigError, match=message):
        plan_for(_bad_model(kind), 4, **kwargs)


def _bad_arguments(rank: int, world: int) -> dict[str, str]:
    out = {}
    for case, (kind, kwargs, _) in BAD_ARGUMENTS.items():
        try:
            SubnetworkDataParallel(_bad_model(kind), **kwargs)
        except SDPConfigError as exc:
            out[case] = f"SDPConfigError: {exc}"
        else:
            out[case] = "no error"
    return out


@pytest.fixture(scope="module")
def bad_arguments_with_a_process_group() -> list[dict[str, str]]:
    return run_distributed(_bad_arguments, 2, timeout=120)


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_config_errors_with_a_process_group(
        bad_arguments_with_a_process_group: list[dict[str, str]], case: str) -> None:
    message = BAD_ARGUMENTS[case][2]
    for rank, errors in enumerate(bad_arguments_with_a_process_group):
        assert errors[case].startswith("SDPConfigError: "), (rank, errors[case])
        assert re.search(message, errors[case], flags=re.DOTALL), (rank, errors[case])


def test_nccl_backend_with_cpu_model_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: pretend an NCCL group exists, and check the device test that runs first.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: [0, 1])
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(SDPConfigError, match="NCCL but the model is on 'cpu'"):
        SubnetworkDataParallel(make("mlp"), blocks="blocks", coverage=0.5, process_group=object())


# ---------------------------------------------------------------------------------------------
# Gradient clipping by the full model's norm, the same on every worker


MAX_NORM = 1e-3


def _clipped_gradients(rank: int, world: int) -> tuple[float, dict]:
    sdp = SubnetworkDataParallel(make("resnet"), blocks="blocks", coverage=0.5, seed=1)
    x, y = batch_for("resnet", rank)
    loss_of("resnet", sdp, x, y).backward()
    norm = sdp.clip_grad_norm_(MAX_NORM).item()
    return norm, {n: p.grad.clone() for n, p in sdp.named_parameters()}


def test_clip_grad_norm_uses_the_full_models_norm_on_every_worker() -> None:
    results = run_distributed(_clipped_gradients, 4)
    sim = SubnetworkSimulator(make("resnet"), 4, blocks="blocks", coverage=0.5, seed=1)
    for rank, worker in enumerate(sim.workers):
        x, y = batch_for("resnet", rank)
        loss_of("resnet", worker, x, y).backward()
    sim.sync_gradients()
    # the full model's averaged gradient in a plain, unwrapped model: each parameter once, a unit's
    # from one of its holders (block level: a worker's parameter names are the plain model's)
    plain = make("resnet")
    worker_params = [dict(w.module.named_parameters()) for w in sim.workers]
    for name, p in plain.named_parameters():
        unit = next((u for u in sim.plan.holders if name.startswith(u + ".")), None)
        source = sim.plan.holders[unit][0] if unit else 0
        p.grad = worker_params[source][name].grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), MAX_NORM).item()
    assert expected > 100 * MAX_NORM  # the gradients are clipped
    clipped = {n: p.grad for n, p in plain.named_parameters()}
    for rank, (norm, grads) in enumerate(results):
        assert norm == pytest.approx(expected, rel=1e-5), rank
        # held units, shared parameters and the shortcuts that dropped blocks keep
        held = {n for n in clipped if ".downsample." in n or not any(
            n.startswith(u + ".") for u in sim.plan.holders if rank not in sim.plan.holders[u])}
        assert set(grads) == held, rank
        for name, grad in grads.items():  # scaled by the same factor as torch's own clipping
            torch.testing.assert_close(grad, clipped[name], rtol=1e-4, atol=1e-9, msg=f"rank {rank} {name}")
    assert sim.clip_grad_norm_(MAX_NORM).item() == pytest.approx(expected, rel=1e-5)


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


def _optimizer_state_round_trip(rank: int, world: int) -> dict:
    sdp = SubnetworkDataParallel(make("mlp"), neurons="blocks", coverage=0.5, masking="forward")
    opt = torch.optim.AdamW(sdp.parameters(), lr=1e-2)
    for step in range(2):
        x, y = batch_for("mlp", 100 * step + rank)
        loss_of("mlp", sdp, x, y).backward()
        opt.step()
        opt.zero_grad()
    full = sdp.full_optimizer_state(opt)
    fresh = torch.optim.AdamW(sdp.parameters(), lr=1e-2)
    sdp.load_full_optimizer_state(fresh, full)
    same = all(torch.equal(fresh.state[p][k], opt.state[p][k]) for p in sdp.parameters() for k in opt.state[p])
    return {"full": full, "same": same}


def test_full_optimizer_state_over_real_ranks_equals_the_simulators() -> None:
    results = run_distributed(_optimizer_state_round_trip, 2)
    assert all(r["same"] for r in results)  # each rank takes back exactly the moments it had
    sim = SubnetworkSimulator(make("mlp"), 2, neurons="blocks", coverage=0.5, masking="forward")
    opts = [torch.optim.AdamW(w.parameters(), lr=1e-2) for w in sim.workers]
    train_simulated(sim, opts, range(2))
    expected = sim.full_optimizer_state(opts)
    for full in (r["full"] for r in results):
        assert full["state"].keys() == expected["state"].keys()
        for key, names in expected["state"].items():
            for name, value in names.items():
                torch.testing.assert_close(full["state"][key][name], value, rtol=1e-5, atol=1e-7, msg=f"{key} {name}")


def _live_storage_bytes() -> int:
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, nn.Parameter):
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.slow
@pytest.mark.parametrize("level,masking,shared", [("blocks", "forward", False), ("blocks", "backward", False),
                                                  ("neurons", "forward", False), ("blocks", "forward", True)])
def test_a_dropped_wrapper_leaves_no_tensor_behind(level: str, masking: str, shared: bool) -> None:
    """Everything the wrapper, its plan (the example input's forward) and a training step
    allocated is freed once the user drops them (on a GPU, held memory is allocated memory)."""
    from subnetdp.measure.fake_group import init_fake_process_group

    init_fake_process_group(0, 4)
    try:
        before = _live_storage_bytes()
        model = make("resnet")
        x, y = batch_for("resnet", 0)
        sdp = SubnetworkDataParallel(model, **{level: "blocks"}, coverage=0.5, masking=masking, example_input=x,
                                     shard=shared, shard_shared_weights=shared)  # shared: hooks on the weights
        opt = torch.optim.AdamW(sdp.parameters(), lr=1e-3)
        for _ in range(2):
            loss_of("resnet", sdp, x, y).backward()
            opt.step()
            opt.zero_grad()
        param = weakref.ref(next(sdp.parameters()))
        del model, sdp, opt, x, y
        assert _live_storage_bytes() == before
        assert param() is None
    finally:
        dist.destroy_process_group()
