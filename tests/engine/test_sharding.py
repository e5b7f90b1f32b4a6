"""Sharding inside holder sets (engine/sharding.py): the same training as the unsharded engine,
with each holder keeping 1/k of every bucket's optimizer state, over virtual and real ranks."""

from __future__ import annotations

import pytest
import torch

from subnetdp import SubnetworkDataParallel, SubnetworkSimulator

from _dist import run_distributed
from _models import batch_for, loss_of, make

WORKERS = 4
CAP_MB = 0.002  # buckets of ~2 KB: several per holder set, shard boundaries cut through parameters

CASES = {
    "mlp-block-forward": ("mlp", dict(blocks="blocks", coverage=0.5)),
    "mlp-neuron-forward": ("mlp", dict(neurons="blocks", coverage=0.5)),
    "mlp-block-backward": ("mlp", dict(blocks="blocks", coverage=0.5, masking="backward")),
    "mlp-block-k1": ("mlp", dict(blocks="blocks", coverage=0.25)),
    "resnet-neuron-forward": ("resnet", dict(neurons="blocks", coverage=0.5)),
}


def _optimizer(name: str, params: list) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _step(sim: SubnetworkSimulator, opts: list, kind: str, step: int, clip: float | None) -> None:
    for rank, worker in enumerate(sim.workers):
        x, y = batch_for(kind, 100 * step + rank)
        loss_of(kind, worker, x, y).backward()
    sim.sync_gradients()
    if clip is not None:
        sim.clip_grad_norm_(clip)
    for opt in opts:
        opt.step()
        opt.zero_grad()
    sim.sync_weights()


def _pair(case: str, opt_name: str) -> tuple[SubnetworkSimulator, list, SubnetworkSimulator, list]:
    kind, kwargs = CASES[case]
    plain = SubnetworkSimulator(make(kind), WORKERS, bucket_cap_mb=CAP_MB, **kwargs)
    sharded = SubnetworkSimulator(make(kind), WORKERS, bucket_cap_mb=CAP_MB, shard=True, **kwargs)
    return (plain, [_optimizer(opt_name, w.parameters()) for w in plain.workers],
            sharded, [_optimizer(opt_name, w.shard_parameters()) for w in sharded.workers])


def _assert_same_weights(a: SubnetworkSimulator, b: SubnetworkSimulator, msg: str) -> None:
    for wa, wb in zip(a.workers, b.workers):
        for (name, pa), pb in zip(wa.module.named_parameters(), wb.module.parameters()):
            torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=f"{msg}, worker {wa.rank}, {name}")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("opt_name,clip", [("adamw", 0.05), ("sgd", None)])
def test_sharded_training_equals_the_unsharded_engine_after_every_step(case: str, opt_name: str,
                                                                      clip: float | None) -> None:
    kind = CASES[case][0]
    plain, plain_opts, sharded, sharded_opts = _pair(case, opt_name)
    assert any(len(s.holders) > 1 for s in sharded.workers[0].shards)
    for step in range(3):
        _step(plain, plain_opts, kind, step, clip)
        _step(sharded, sharded_opts, kind, step, clip)
        _assert_same_weights(plain, sharded, f"step {step}")
    # the gradients of sharded buckets live in the shards only
    worker = sharded.workers[0]
    x, y = batch_for(kind, 0)
    loss_of(kind, worker, x, y).backward()
    for other in sharded.workers[1:]:
        loss_of(kind, other, x, y).backward()
    sharded.sync_gradients()
    in_shards = {id(s.tensor) for shard in worker.shards for s in shard.bucket.segments}
    assert all(p.grad is None for p in worker.parameters() if id(p) in in_shards)
    assert all(shard.param.grad is not None for shard in worker.shards)


@pytest.mark.parametrize("case", ["mlp-block-forward", "mlp-block-k1", "resnet-neuron-forward"])
def test_each_holder_keeps_one_kth_of_the_optimizer_state(case: str) -> None:
    kind = CASES[case][0]
    plain, plain_opts, sharded, sharded_opts = _pair(case, "adamw")
    _step(plain, plain_opts, kind, 0, None)
    _step(sharded, sharded_opts, kind, 0, None)
    for wp, ws, op, os_ in zip(plain.workers, sharded.workers, plain_opts, sharded_opts):
        expected = 0
        for holders, buckets in ws.buckets.items():
            for bucket in buckets:
                expected += -(-bucket.numel // len(holders))  # ceil(n / k): the shard, padded
        moments = sum(s["exp_avg"].numel() for s in os_.state.values())
        assert moments == expected
        assert moments < sum(s["exp_avg"].numel() for s in op.state.values())


def test_full_optimizer_state_of_shards_equals_the_unsharded_and_loads_back() -> None:
    plain, plain_opts, sharded, sharded_opts = _pair("mlp-neuron-forward", "adamw")
    for step in range(2):
        _step(plain, plain_opts, "mlp", step, None)
        _step(sharded, sharded_opts, "mlp", step, None)
    expected, got = plain.full_optimizer_state(plain_opts), sharded.full_optimizer_state(sharded_opts)
    assert got["state"].keys() == expected["state"].keys()
    for key, states in expected["state"].items():
        for name, value in states.items():
            torch.testing.assert_close(got["state"][key][name], value, rtol=1e-5, atol=1e-7, msg=f"{key} {name}")
    # loaded into fresh shards (another plan's workers would do the same), training goes on alike
    fresh = [_optimizer("adamw", w.shard_parameters()) for w in sharded.workers]
    sharded.load_full_optimizer_state(fresh, got)
    for opt, new in zip(sharded_opts, fresh):
        for p in opt.param_groups[0]["params"]:
            for name, value in opt.state[p].items():
                torch.testing.assert_close(new.state[p][name], value, msg=name)
    _step(plain, plain_opts, "mlp", 2, None)
    _step(sharded, fresh, "mlp", 2, None)
    _assert_same_weights(plain, sharded, "after reloading")


def _train_sharded(rank: int, world: int) -> dict:
    kind, kwargs = CASES["mlp-neuron-forward"]
    sdp = SubnetworkDataParallel(make(kind), bucket_cap_mb=CAP_MB, shard=True, timeout=60, **kwargs)
    # parameters() are the shards (as FSDP2's): an optimizer built the usual way steps them
    same = [id(p) for p in sdp.parameters()] == [id(p) for p in sdp.shard_parameters()]
    opt = torch.optim.AdamW(sdp.parameters(), lr=1e-2, weight_decay=0.1)
    orders = []
    for step in range(3):
        x, y = batch_for(kind, 100 * step + rank)
        loss_of(kind, sdp, x, y).backward()
        orders.append(list(sdp.reducer.issued))
        sdp.clip_grad_norm_(0.05)
        opt.step()  # the updated shards are gathered into the weights before the next forward
        opt.zero_grad()
    sdp.sync_weights_if_stepped()  # ... or now: the last step's
    return {"weights": {n: p.detach().clone() for n, p in sdp.module.named_parameters()}, "orders": orders,
            "same": same, "full_optimizer": sdp.full_optimizer_state(opt), "full": sdp.full_state_dict()}


@pytest.mark.slow
def test_sharded_ranks_equal_the_sharded_simulator_and_issue_in_one_order() -> None:
    results = run_distributed(_train_sharded, WORKERS)
    assert all(r["same"] for r in results)
    _, _, sim, opts = _pair("mlp-neuron-forward", "adamw")
    for step in range(3):
        _step(sim, opts, "mlp", step, 0.05)
    for rank, (result, worker) in enumerate(zip(results, sim.workers)):
        for name, p in worker.module.named_parameters():
            torch.testing.assert_close(result["weights"][name], p, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
    # members of a holder set issue its reduce-scatters in one order, whatever order backward ran in
    for holders in {h for r in results for step in r["orders"] for h, _ in step}:
        orders = [[i for h, i in step if h == holders] for r in (results[m] for m in holders) for step in r["orders"]]
        assert all(order == orders[0] for order in orders), holders
    expected = sim.full_optimizer_state(opts)
    for name, value in expected["state"]["blocks.0.mlp.0.weight"].items():
        torch.testing.assert_close(results[0]["full_optimizer"]["state"]["blocks.0.mlp.0.weight"][name], value,
                                   rtol=1e-5, atol=1e-7)
    for key, value in sim.full_state_dict().items():
        torch.testing.assert_close(results[1]["full"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_shards_of_whole_parameters_are_views_of_the_weights() -> None:
    """Block level: a bucket's whole parameters become views of one flat buffer and each shard a
    view of its part, so sharding adds no copy of the weights; neuron slices keep a copy."""
    sim = SubnetworkSimulator(make("mlp"), WORKERS, blocks="blocks", coverage=0.5, bucket_cap_mb=CAP_MB, shard=True)
    for worker in sim.workers:
        for shard in worker.shards:
            assert shard.weights is not None
            ptr = shard.weights.untyped_storage().data_ptr()
            assert shard.param.untyped_storage().data_ptr() == ptr
            assert all(s.tensor.untyped_storage().data_ptr() == ptr for s in shard.bucket.segments)
    initial = make("mlp").state_dict()  # the views hold the values the parameters had
    for key, value in sim.full_state_dict().items():
        torch.testing.assert_close(value, initial[key], rtol=0, atol=0, msg=key)
    neuron = SubnetworkSimulator(make("mlp"), WORKERS, neurons="blocks", coverage=0.5, shard=True)
    assert any(shard.weights is None for shard in neuron.workers[0].shards)


def test_parameters_are_the_shards_and_zero_grad_clears_the_models_gradients_too() -> None:
    """Under shard=True `parameters()` is what the optimizer steps (as FSDP2's); a backward that
    was not reduced (no_sync) leaves gradients on the model's parameters: zero_grad clears them."""
    sim = SubnetworkSimulator(make("mlp"), 4, neurons="blocks", coverage=0.5, shard=True)
    worker = sim.workers[0]
    assert [id(p) for p in worker.parameters()] == [id(p) for p in worker.shard_parameters()]
    assert {id(p) for p in worker.parameters()} != {id(p) for p in worker.trained_parameters()}
    x, y = batch_for("mlp", 0)
    loss_of("mlp", worker, x, y).backward()  # not reduced: the gradients stay on the model
    assert any(p.grad is not None for p in worker.trained_parameters())
    worker.zero_grad()
    assert all(p.grad is None for p in worker.trained_parameters()) and all(p.grad is None for p in worker.parameters())


def _fused_or_not(rank: int, world: int, fused: bool) -> dict:
    sdp = SubnetworkDataParallel(make("mlp"), neurons="blocks", coverage=0.5, masking="backward", timeout=60)
    opt = torch.optim.AdamW(sdp.parameters(), lr=1e-2, fused=fused, foreach=None if fused else False)
    for step in range(3):
        x, y = batch_for("mlp", 100 * step + rank)
        loss_of("mlp", sdp, x, y).backward()
        opt.step()  # fused: no in-place version counter moves; the sync follows the synced backward
        opt.zero_grad()
    return sdp.full_state_dict()


@pytest.mark.slow
def test_a_fused_optimizer_gets_its_weights_shared_as_a_plain_one() -> None:
    fused, plain = run_distributed(_fused_or_not, 2, True)[0], run_distributed(_fused_or_not, 2, False)[0]
    for key, value in plain.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-5, atol=1e-6, msg=key)
