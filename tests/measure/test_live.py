"""LiveTensorTracker: exact byte counts on known workloads, kinds at the peak, FSDP2-style resizes."""

from __future__ import annotations

import torch
from torch import nn

from subnetdp.measure.live import LiveTensorTracker


def test_counts_a_known_allocation_and_its_release() -> None:
    tracker = LiveTensorTracker(params=[])
    with tracker:
        a = torch.ones(1000)          # 4000 bytes
        b = torch.ones(500)           # +2000 -> peak 6000
        del a
        c = torch.ones(250)           # 3000 live
        del b, c
    assert tracker.report()["peak_bytes"] == 6000
    assert not tracker.live  # everything created inside was freed


def test_kinds_at_the_peak_of_a_training_step() -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(128, 64)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tracker = LiveTensorTracker(model.parameters(), opt, extra=[x])
    with tracker:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    report = tracker.report()
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert report["parameters"] == param_bytes and report["optimizer_state"] == param_bytes  # momentum
    # autograd keeps the hidden activations (128 x 256, after the first linear and the ReLU mask)
    assert report["saved_activations"] >= 128 * 256 * 4

    # a spike allocated after the step, while every gradient is alive, is the peak: each kind is
    # then known from the sizes alone (3 copies of the parameters' bytes: weights, .grad, momentum)
    spike_bytes = 1_000_000
    tracker = LiveTensorTracker(model.parameters(), opt, extra=[x])
    with tracker:
        model(x).sum().backward()
        opt.step()
        spike = torch.empty(spike_bytes // 4)
        del spike
        opt.zero_grad(set_to_none=True)
    x_bytes = 128 * 64 * 4
    param_bytes = 4 * (64 * 256 + 256 + 256 * 64 + 64)  # counted by hand: 132,352
    assert tracker.report() == {"peak_bytes": 3 * param_bytes + x_bytes + spike_bytes,
                                "parameters": param_bytes, "gradients": param_bytes,
                                "optimizer_state": param_bytes, "saved_activations": 0,
                                "other": x_bytes + spike_bytes}


def test_storage_resized_in_place_is_read_at_its_current_size() -> None:
    tracker = LiveTensorTracker(params=[])
    with tracker:
        full = torch.empty(4096)        # 16 KiB, as an unsharded FSDP2 parameter
        full.untyped_storage().resize_(0)
        small = torch.ones(10)          # the peak is read after this op: the 16 KiB are gone
        full.untyped_storage().resize_(4096 * 4)
        torch.ones(1)                   # now they are back
        del full, small
    assert tracker.report()["peak_bytes"] == 4096 * 4 + 40 + 4


def _worker(width: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(width)
    model = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 32)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, x


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return list(model.parameters()) + [v for s in opt.state.values() for v in s.values()]


def test_each_worker_played_in_turn_is_measured_as_if_alone() -> None:
    """Two workers of different sizes in one process, each step attributed to its worker: each
    peak is the one a tracker measures for that worker alone, and the other's tensors never count."""
    from subnetdp.measure.live import WorkerPeakTracker

    alone = {}
    for rank, width in enumerate((64, 512)):
        model, opt, x = _worker(width)
        tracker = WorkerPeakTracker({rank: _state(model, opt)}, {rank: list(model.parameters())})
        with tracker, tracker.worker(rank):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        alone[rank] = tracker.peaks[rank]
    workers = [_worker(width) for width in (64, 512)]
    tracker = WorkerPeakTracker({r: _state(m, o) for r, (m, o, _) in enumerate(workers)},
                                {r: list(m.parameters()) for r, (m, _, _) in enumerate(workers)})
    with tracker:
        for rank, (model, _, x) in enumerate(workers):
            with tracker.worker(rank):
                model(x).sum().backward()
        for rank, (_, opt, _) in enumerate(workers):  # the gradients of both are alive meanwhile
            with tracker.worker(rank):
                opt.step()
            opt.zero_grad(set_to_none=True)
    assert tracker.peaks == alone
    # the larger worker holds more than the state of both models together would let the smaller one
    assert alone[1] > 4 * alone[0]
