"""How a model is parallelised over the workers of a run, kept apart from the training loop that
uses it (as torchtitan keeps ``parallelize`` apart from its trainer).

One interface, :class:`Parallelism`, and four implementations:

    strategy   real ranks (torchrun)                 virtual workers (one process, --workers N --simulate)
    DDP        RealDDP: DistributedDataParallel      SimulatedDDP: one model; each of the N workers'
               with a byte-counting comm hook        losses backpropagated as loss / N
    SDP        RealSDP: SubnetworkDataParallel       SimulatedSDP: SubnetworkSimulator

A training step reads the same whatever the strategy:

    for rank, model in par.local_workers:          # the workers this process plays
        par.backward(loss_fn(model(x[rank]), y[rank]))
    par.after_backward()                           # simulated SDP: average over holders
    par.clip_grad_norm_(max_norm)
    for optimizer in optimizers: optimizer.step()  # one per model, over par.optimized_parameters(model)
    par.after_step()                               # SDP: share the stepped weights (backward masking, shards)

:func:`parallelize` picks the implementation; :func:`level_kwargs` and :func:`ddp_counting_bytes`
are the two set-up pieces `subnetdp bench` shares with it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..engine import Plan, SubnetworkDataParallel, SubnetworkSimulator
from ..engine.errors import DisconnectedPlanWarning
from ..measure import ByteCounter, counting_allreduce_hook


def level_kwargs(level: str, blocks: Any) -> dict[str, Any]:
    """The engine's keyword for the SDP level: ``blocks=`` (whole blocks) or ``neurons=`` (hidden
    neuron groups inside the blocks), both naming the model's block container(s)."""
    return {("blocks" if level == "block" else "neurons"): blocks}


def ddp_counting_bytes(model: nn.Module, device: torch.device) -> tuple[DistributedDataParallel, ByteCounter]:
    """``model`` under torch DDP, with a comm hook that counts the bytes it all-reduces."""
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    counter = ByteCounter()
    ddp.register_comm_hook(counter, counting_allreduce_hook)
    return ddp, counter


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class Parallelism:
    """How this process's part of the model is parallelised. Subclasses set ``models`` (what this
    process trains, one optimizer each) and ``ranks`` (the worker index each local worker plays)."""

    models: list[nn.Module]
    ranks: list[int]
    plan: Plan | None = None
    is_sdp: bool = False
    # every rank holds the same model and optimizer state (DDP), so rank 0's checkpoint speaks for all
    replicated: bool = True

    @property
    def local_workers(self) -> list[tuple[int, nn.Module]]:
        """(worker index, the module that worker's forward pass calls), for every local worker."""
        return list(zip(self.ranks, self.models))

    @property
    def unwrapped_models(self) -> list[nn.Module]:
        """The local models as they compute, without the DDP or SDP wrapper around them."""
        return [m.module for m in self.models]

    def optimized_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """What the optimizer of local model ``model`` steps (sharded SDP: the shards)."""
        return list(model.parameters())

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def after_backward(self) -> None:
        """Whatever gradients need once every local worker has run backward."""

    def clip_grad_norm_(self, max_norm: float) -> None:
        raise NotImplementedError

    def after_step(self) -> None:
        """Whatever weights need once every optimizer has stepped."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The assembled full model, loadable into the plain model (collective under real SDP)."""
        raise NotImplementedError

    def comm_bytes(self) -> int | None:
        """Bytes handed to collectives so far; None where nothing is communicated (virtual workers)."""
        return None

    def wire_bytes(self) -> float | None:
        """Bytes sent for those collectives under a ring model (``exchange.ring_wire_bytes``)."""
        return None

    def ensemble_log_probs(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """The ensemble of the N subnetworks from the local workers' outputs on one batch (SDP only)."""
        raise TypeError(f"{type(self).__name__} has no subnetworks to ensemble")

    def redraw(self, seed: int, optimizers: list[torch.optim.Optimizer]) -> int:
        """SDP: re-draw the plan with ``seed``; the units that change hands move with their optimizer
        state. Returns the bytes moved."""
        raise TypeError(f"{type(self).__name__} has no plan to re-draw")

    @property
    def engine(self) -> SubnetworkDataParallel | SubnetworkSimulator:
        """SDP: the engine object that checkpoints this process's workers (engine/checkpoint.py)."""
        raise TypeError(f"{type(self).__name__} is not SDP")


class RealDDP(Parallelism):
    """torch DistributedDataParallel on this rank, its all-reduced bytes counted by a comm hook."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.ddp, self.counter = ddp_counting_bytes(model, device)
        self.models, self.ranks = [self.ddp], [dist.get_rank()]

    def clip_grad_norm_(self, max_norm: float) -> None:
        # DDP gradients are already averaged and identical on every rank: clipping is local
        torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), max_norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return _plain_state(self.ddp.module)

    def comm_bytes(self) -> int:
        return self.counter.bytes

    def wire_bytes(self) -> float:
        return self.counter.wire


class SimulatedDDP(Parallelism):
    """DDP with N virtual workers: one model, each worker's loss backpropagated as loss / N, so
    the accumulated gradient is the mean over N batches that N workers' all-reduce gives."""

    def __init__(self, model: nn.Module, world_size: int) -> None:
        self.model, self.world_size = model, world_size
        self.models, self.ranks = [model], list(range(world_size))

    @property
    def local_workers(self) -> list[tuple[int, nn.Module]]:
        return [(rank, self.model) for rank in self.ranks]

    @property
    def unwrapped_models(self) -> list[nn.Module]:
        return [self.model]  # nothing wraps it

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.world_size).backward()

    def clip_grad_norm_(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return _plain_state(self.model)


class RealSDP(Parallelism):
    """SubnetworkDataParallel on this rank: it averages gradients over holders during backward;
    ``after_step`` shares the stepped weights (backward masking, shards) at once, so evaluation
    reading the inner module sees them."""

    is_sdp, replicated = True, False

    def __init__(self, model: nn.Module, **sdp_kwargs: Any) -> None:
        self.sdp = SubnetworkDataParallel(model, **sdp_kwargs)
        self.models, self.ranks, self.plan = [self.sdp], [self.sdp.rank], self.sdp.plan

    def optimized_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(self.sdp.parameters())  # sharded: the shards

    def clip_grad_norm_(self, max_norm: float) -> None:
        self.sdp.clip_grad_norm_(max_norm)

    def after_step(self) -> None:
        self.sdp.sync_weights_if_stepped()  # now, not at the next forward: evaluation reads the module

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.sdp.full_state_dict()

    def comm_bytes(self) -> int:
        return self.sdp.comm_bytes

    def wire_bytes(self) -> float:
        return self.sdp.wire_bytes

    def ensemble_log_probs(self, outs: list[torch.Tensor]) -> torch.Tensor:
        return self.sdp.ensemble_log_probs(outs[0])  # collective: the other ranks bring theirs

    def redraw(self, seed: int, optimizers: list[torch.optim.Optimizer]) -> int:
        moved = self.sdp.redraw(seed, optimizers[0])
        self.plan = self.sdp.plan
        return moved

    @property
    def engine(self) -> SubnetworkDataParallel:
        return self.sdp


class SimulatedSDP(Parallelism):
    """SubnetworkSimulator: N virtual SDP workers, one module each, synchronised explicitly."""

    is_sdp, replicated = True, False

    def __init__(self, model: nn.Module, world_size: int, **sdp_kwargs: Any) -> None:
        self.simulator = SubnetworkSimulator(model, world_size, **sdp_kwargs)
        self.models, self.ranks = list(self.simulator.workers), list(range(world_size))
        self.plan = self.simulator.plan

    def optimized_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.parameters())  # sharded: the shards

    def after_backward(self) -> None:
        self.simulator.sync_gradients()

    def clip_grad_norm_(self, max_norm: float) -> None:
        self.simulator.clip_grad_norm_(max_norm)

    def after_step(self) -> None:
        self.simulator.sync_weights()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.simulator.full_state_dict()

    def ensemble_log_probs(self, outs: list[torch.Tensor]) -> torch.Tensor:
        return self.simulator.ensemble_log_probs(outs)

    def redraw(self, seed: int, optimizers: list[torch.optim.Optimizer]) -> int:
        moved = self.simulator.redraw(seed, optimizers)
        self.plan = self.simulator.plan
        return moved

    @property
    def engine(self) -> SubnetworkSimulator:
        return self.simulator


def parallelize(model: nn.Module, *, sdp: bool, device: torch.device, virtual_workers: int | None = None,
                timeout: float | None = None, **sdp_kwargs: Any) -> Parallelism:
    """``model`` parallelised as DDP or (``sdp``) SDP, over real ranks of the initialised process
    group, or over ``virtual_workers`` workers in this process. ``sdp_kwargs`` go to the engine
    (``blocks=``/``neurons=``, ``coverage``, ``masking``, ...); ``timeout`` bounds real SDP's
    collectives (the engine's default when None)."""
    with warnings.catch_warnings():  # `subnetdp train` says it once, before it starts (config_warnings)
        warnings.simplefilter("ignore", DisconnectedPlanWarning)
        if sdp and virtual_workers is not None:
            return SimulatedSDP(model, virtual_workers, **sdp_kwargs)
        if sdp:
            return RealSDP(model, **sdp_kwargs, **({} if timeout is None else {"timeout": timeout}))
    if virtual_workers is not None:
        return SimulatedDDP(model, virtual_workers)
    return RealDDP(model, device)
