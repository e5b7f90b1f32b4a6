"""Gradient buckets: their cap, their issue order, and that averaging does not depend on either."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from subnetdp import SDPConfigError, SubnetworkDataParallel, SubnetworkSimulator

from _dist import run_distributed
from _models import batch_for, loss_of, make


def test_buckets_respect_the_cap_and_never_split_a_parameter() -> None:
    cap_mb = 1e-3  # about 1 KiB: several buckets per holder set
    sim = SubnetworkSimulator(make("mlp"), 4, blocks="blocks", coverage=0.5, bucket_cap_mb=cap_mb)
    for worker in sim.workers:
        buckets = [b for bucket_list in worker.buckets.values() for b in bucket_list]
        assert len(buckets) > len(worker.buckets), "the cap should cut some holder set into several buckets"
        for bucket in buckets:
            last = sum(v.numel() for v in bucket.segments[-1].views()) * bucket.dtype.itemsize
            # a bucket closes as soon as it reaches the cap: without its last parameter it is below
            assert bucket.nbytes - last < cap_mb * 2 ** 20
        # every trained parameter is in exactly one bucket (block level: whole parameters)
        bucketed = [id(s.tensor) for b in buckets for s in b.segments]
        assert sorted(bucketed) == sorted(id(p) for p in worker.parameters())


def _backward_and_sync(sim: SubnetworkSimulator) -> None:
    for rank, worker in enumerate(sim.workers):
        x, y = batch_for("mlp", rank)
        loss_of("mlp", worker, x, y).backward()
    sim.sync_gradients()


def _grads_after_one_step(sim: SubnetworkSimulator) -> list[dict[str, torch.Tensor]]:
    _backward_and_sync(sim)
    return [{n: p.grad.clone() for n, p in w.named_parameters()} for w in sim.workers]


def test_averaged_gradients_do_not_depend_on_the_bucket_cap() -> None:
    small = _grads_after_one_step(SubnetworkSimulator(make("mlp"), 4, blocks="blocks", coverage=0.5,
                                                      bucket_cap_mb=1e-4))
    large = _grads_after_one_step(SubnetworkSimulator(make("mlp"), 4, blocks="blocks", coverage=0.5))
    for a, b in zip(small, large):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class Branches(nn.Module):
    """Residual blocks whose use order is a per-instance permutation: backward then produces their
    gradients in a different order on each rank."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.ModuleList(Residual() for _ in range(4))
        self.head = nn.Linear(8, 3)
        self.order = [0, 1, 2, 3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        outs = {}
        for i in self.order:  # each block reads the same input: independent subgraphs
            outs[i] = self.blocks[i](x)
        return self.head(sum(outs[i] for i in range(4)))


def _issue_order(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = Branches()
    model.order = [3, 2, 1, 0] if rank % 2 else [0, 1, 2, 3]
    # C = 1: one holder set, every parameter its own bucket (cap ~100 bytes)
    sdp = SubnetworkDataParallel(model, blocks=[f"blocks.{i}" for i in range(4)], coverage=1.0,
                                 bucket_cap_mb=1e-4)
    ready: list[str] = []
    names = {id(p): n for n, p in sdp.named_parameters()}
    for p in sdp.parameters():
        p.register_post_accumulate_grad_hook(lambda p: ready.append(names[id(p)]))
    x, y = batch_for("mlp", rank)
    loss_of("mlp", sdp, x, y).backward()
    return {"ready": ready, "issued": list(sdp.reducer.issued),
            "grads": {n: p.grad.clone() for n, p in sdp.named_parameters()}}


@pytest.mark.slow
def test_bucket_issue_order_is_the_same_on_every_holder_whatever_order_gradients_arrive_in() -> None:
    results = run_distributed(_issue_order, 2)
    # the premise: backward produced the gradients in a different order on the two ranks
    assert results[0]["ready"] != results[1]["ready"]
    assert len(results[0]["issued"]) > 4
    assert results[0]["issued"] == results[1]["issued"]
    # and the buckets were matched up correctly: both ranks hold the same averaged gradients,
    # equal to the mean of the two ranks' gradients computed without SDP
    for name, grad in results[0]["grads"].items():
        torch.testing.assert_close(grad, results[1]["grads"][name], rtol=0, atol=0)
    reference = {}
    for rank in range(2):
        torch.manual_seed(0)
        plain = Branches()
        x, y = batch_for("mlp", rank)
        loss_of("mlp", plain, x, y).backward()
        for name, p in plain.named_parameters():
            reference[name] = reference.get(name, 0) + p.grad / 2
    for name, grad in results[0]["grads"].items():
        torch.testing.assert_close(grad, reference[name.removeprefix("module.")], rtol=1e-5, atol=1e-6)


def _stepped_grads(sim: SubnetworkSimulator) -> list[dict[str, torch.Tensor]]:
    """The gradients each worker's optimizer would step (sharded: the shards')."""
    _backward_and_sync(sim)
    return [{str(i): p.grad.clone() for i, p in enumerate(w.shard_parameters())} for w in sim.workers]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shard", [False, True])
def test_gradients_sent_in_a_narrower_dtype_average_to_its_precision(dtype: torch.dtype, shard: bool) -> None:
    kwargs = dict(neurons="blocks", coverage=0.5, bucket_cap_mb=1e-3, shard=shard)
    exact = _stepped_grads(SubnetworkSimulator(make("mlp"), 4, **kwargs))
    narrow = _stepped_grads(SubnetworkSimulator(make("mlp"), 4, reduce_dtype=dtype, **kwargs))
    differs = False
    for rank, (e, n) in enumerate(zip(exact, narrow)):
        assert e.keys() == n.keys()
        for name in e:
            assert n[name].dtype == torch.float32  # cast back: the optimizer steps fp32
            torch.testing.assert_close(n[name], e[name], rtol=2e-2, atol=1e-3, msg=f"rank {rank} {name}")
            differs |= not torch.equal(n[name], e[name])
    assert differs  # the narrower dtype was used


def test_narrower_gradients_hand_half_the_bytes_and_bad_dtypes_are_refused() -> None:
    from subnetdp.measure.fake_group import init_fake_process_group

    init_fake_process_group(0, 4)
    try:
        sent = {}
        for dtype in (None, torch.bfloat16):
            sdp = SubnetworkDataParallel(make("mlp"), blocks="blocks", coverage=0.5, reduce_dtype=dtype)
            x, y = batch_for("mlp", 0)
            loss_of("mlp", sdp, x, y).backward()
            sent[dtype] = sdp.comm_bytes
        assert sent[torch.bfloat16] * 2 == sent[None] > 0
        with pytest.raises(SDPConfigError, match="reduce_dtype"):
            SubnetworkDataParallel(make("mlp"), blocks="blocks", coverage=0.5, reduce_dtype=torch.int8)
    finally:
        dist.destroy_process_group()
