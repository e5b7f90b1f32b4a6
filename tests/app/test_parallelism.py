"""The one interface of how a model is parallelised (subnetdp.app.parallelism) and the shared
runtime helpers: the four implementations agree where they must, hand back the plain model's
weights, and report communication only where there is some."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from subnetdp.app.launch import torchrun_command, worker_env
from subnetdp.app.parallelism import (
    Parallelism,
    RealDDP,
    RealSDP,
    SimulatedDDP,
    SimulatedSDP,
    level_kwargs,
    parallelize,
)
from subnetdp.app.runtime import percentiles

from _models import batch_for, make

WORKERS = 2


def _train(par: Parallelism, steps: int = 4, clip: float = 0.5) -> list[float]:
    """The loop of subnetdp.app.train.workers.train_step, on the residual MLP: the mean loss per step."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in par.models]
    losses = []
    for step in range(steps):
        step_losses = []
        for rank, model in par.local_workers:
            x, y = batch_for("mlp", seed=100 * step + rank)
            loss = nn.functional.cross_entropy(model(x), y)
            par.backward(loss)
            step_losses.append(loss.item())
        par.after_backward()
        par.clip_grad_norm_(clip)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        par.after_step()
        losses.append(sum(step_losses) / len(step_losses))
    return losses


def _sdp(level: str = "block", coverage: float = 0.5, **kwargs: object) -> dict:
    return {**level_kwargs(level, "blocks"), "coverage": coverage, "example_input": batch_for("mlp", 0)[0], **kwargs}


def test_level_kwargs_name_the_engine_keyword() -> None:
    assert level_kwargs("block", "layers") == {"blocks": "layers"}
    assert level_kwargs("neuron", "layers") == {"neurons": "layers"}


@pytest.mark.parametrize("masking", ["forward", "backward"])
def test_simulated_sdp_at_full_coverage_trains_as_simulated_ddp(masking: str) -> None:
    """C = 1: every worker holds every unit, so SDP's holder averaging is DDP's all-reduce."""
    ddp = parallelize(make("mlp"), sdp=False, device=torch.device("cpu"), virtual_workers=WORKERS)
    sdp = parallelize(make("mlp"), sdp=True, device=torch.device("cpu"), virtual_workers=WORKERS,
                      **_sdp(coverage=1.0, masking=masking))
    assert isinstance(ddp, SimulatedDDP) and isinstance(sdp, SimulatedSDP)
    assert sdp.plan is not None and sdp.plan.k == WORKERS and ddp.plan is None
    ddp_losses, sdp_losses = _train(ddp), _train(sdp)
    assert ddp_losses == pytest.approx(sdp_losses, rel=1e-5)
    assert ddp_losses[-1] < ddp_losses[0]  # it trained
    for key, value in ddp.full_state_dict().items():
        torch.testing.assert_close(sdp.full_state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_simulated_ddp_is_one_model_playing_every_worker() -> None:
    model = make("mlp")
    par = SimulatedDDP(model, WORKERS)
    assert par.models == [model] and par.unwrapped_models == [model]
    assert [rank for rank, _ in par.local_workers] == [0, 1] and all(m is model for _, m in par.local_workers)
    # each worker's loss counts 1/N: two equal batches give the gradient of one
    x, y = batch_for("mlp", 0)
    reference = copy.deepcopy(model)
    nn.functional.cross_entropy(reference(x), y).backward()
    for _, m in par.local_workers:
        par.backward(nn.functional.cross_entropy(m(x), y))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert par.comm_bytes() is None and not par.is_sdp and par.replicated
    with pytest.raises(TypeError, match="no subnetworks"):
        par.ensemble_log_probs([torch.zeros(1, 3)])


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_simulated_sdp_hands_back_the_plain_model(level: str) -> None:
    par = SimulatedSDP(make("mlp"), WORKERS, **_sdp(level))
    _train(par, steps=2)
    assert par.is_sdp and not par.replicated and par.comm_bytes() is None
    assert [rank for rank, _ in par.local_workers] == [0, 1] and par.models[0] is not par.models[1]
    # each worker trains part of the model; the assembled state is the whole plain model
    held = sum(p.numel() for p in par.models[0].parameters())
    assert held < sum(p.numel() for p in make("mlp").parameters())
    make("mlp").load_state_dict(par.full_state_dict(), strict=True)
    outs = [m(batch_for("mlp", 1)[0]) for m in par.models]
    assert torch.exp(par.ensemble_log_probs(outs)).sum(-1) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture
def fake_group() -> object:
    """A process group of two ranks whose collectives do nothing: real DDP and SDP can be built
    and stepped in this one process (values that would come from the other rank stay local)."""
    from subnetdp.measure.fake_group import init_fake_process_group
    init_fake_process_group(0, WORKERS)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sdp", [False, True])
def test_real_ranks_count_their_bytes_and_hand_back_the_plain_model(fake_group: object, sdp: bool) -> None:
    par = parallelize(make("mlp"), sdp=sdp, device=torch.device("cpu"), timeout=30.0, **(_sdp() if sdp else {}))
    assert isinstance(par, RealSDP if sdp else RealDDP)
    assert [rank for rank, _ in par.local_workers] == [0] and len(par.models) == 1
    assert par.comm_bytes() == 0
    _train(par, steps=1)
    assert par.comm_bytes() > 0  # gradients handed to collectives, counted where issued
    assert par.is_sdp == sdp and par.replicated == (not sdp) and (par.plan is not None) == sdp
    make("mlp").load_state_dict(par.full_state_dict(), strict=True)
    assert isinstance(par.unwrapped_models[0], nn.Module) and par.unwrapped_models[0] is not par.models[0]


def test_percentiles_interpolate_like_numpy() -> None:
    values = [0.3, 0.1, 0.2, 0.5, 0.4, 0.9, 0.7, 0.8]
    assert percentiles(values, [10, 90]) == pytest.approx(list(np.percentile(values, [10, 90])))
    assert percentiles([2.0], [10, 50, 90]) == [2.0, 2.0, 2.0]
    assert percentiles([], [10, 90]) is None


def test_torchrun_command_and_worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = torchrun_command(3, "subnetdp.app.cli", "train", "c.toml")
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m"]
    assert cmd[6:] == ["subnetdp.app.cli", "train", "c.toml"]
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert worker_env(1)["OMP_NUM_THREADS"] == "1"
    assert worker_env(1, keep_if_set=True)["OMP_NUM_THREADS"] == "4"
    assert worker_env(None)["OMP_NUM_THREADS"] == "4"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert worker_env(2, keep_if_set=True)["OMP_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in worker_env(None) and os.environ.get("OMP_NUM_THREADS") is None
