"""Resume a run on another number of workers, or at another coverage: "re-plan and move".

    subnetdp train CONFIG --nproc 4 --out runs/r            # killed at step 400
    subnetdp train CONFIG --nproc 3 --out runs/r --resume   # continues on 3 workers
    subnetdp train CONFIG --nproc 4 --out runs/r --resume --set strategy.coverage=0.75

Every process rebuilds the old workers' subnetworks in one process (as ``subnetdp export`` does),
loads each old rank's model and optimizer from the checkpoint files, and assembles the full model
and the full optimizer state (``SubnetworkSimulator.full_state_dict`` / ``full_optimizer_state``).
Each new worker then takes its share under the new plan (``load_full_state_dict`` /
``load_full_optimizer_state``): a unit that moves to a new holder moves with its optimizer moments.
DDP replicas are identical, so a DDP run (or the full-model phase) resumes from rank 0's file on any
number of workers. The assembly holds the whole model and optimizer state in each process's memory.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..engine import DisconnectedPlanWarning, SubnetworkSimulator
from . import checkpoint as ckpt
from .builders import MODELS, rebuild_model
from .config import Config, from_dict
from .parallelism import level_kwargs

OptimizerFactory = Callable[[Config, list[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class FullRunState:
    """A checkpoint's training state, independent of how many workers wrote it."""

    model: dict[str, torch.Tensor]          # the full model, original keys
    optimizer: dict[str, Any]               # SDP: full optimizer state; DDP: the replica's state_dict
    scheduler: dict[str, Any]
    replicated: bool                        # a DDP-style checkpoint (one full model)


def rebuild_simulator(manifest: dict[str, Any]) -> SubnetworkSimulator:
    """The checkpoint's workers, rebuilt in one process from the recorded plan arguments."""
    config = from_dict(manifest["config"])
    s = config.section("strategy")
    model = rebuild_model(manifest["model"], manifest["model_kwargs"])
    example = torch.zeros(manifest["example_input_shape"],
                          dtype=torch.long if MODELS[manifest["model"]][2] == "lm" else torch.float32)
    with warnings.catch_warnings():  # the run's plan, rebuilt: the run itself said whether it was disconnected
        warnings.simplefilter("ignore", DisconnectedPlanWarning)
        sim = SubnetworkSimulator(model, manifest["virtual_world_size"],
                                  **level_kwargs(s["level"], MODELS[manifest["model"]][1]), coverage=s["coverage"],
                                  masking=s["masking"], seed=s["plan_seed"],
                                  scale=s["scale"],
                                  neuron_groups=s["neuron_groups"] or None, example_input=example, shard=s["shard"])
    if manifest.get("plan_seed_drawn", s["plan_seed"]) != s["plan_seed"]:  # strategy.redraw_every: that plan
        sim.redraw(manifest["plan_seed_drawn"], [torch.optim.SGD(w.parameters()) for w in sim.workers])
    if sim.plan.fingerprint() != (manifest.get("plan_fingerprint_drawn") or manifest["plan_fingerprint"]):
        raise ckpt.CheckpointError("the rebuilt plan does not match the one the run trained with")
    return sim


def is_replicated(config: Config, manifest: dict[str, Any]) -> bool:
    """A DDP-style checkpoint: every rank held the same full model (DDP, or the full-model phase)."""
    return config["strategy.name"] == "ddp" or manifest.get("phase") == "full"


def replica_state(folder: Path) -> dict[str, Any]:
    """Rank 0's {model, optimizer, scheduler} of a DDP-style checkpoint, model keys as the plain
    model's (DistributedDataParallel prefixes them with "module."; a simulated DDP run does not)."""
    replica = ckpt.load_rank_state(folder, 0)["workers"][0]
    return {**replica, "model": {k.removeprefix("module."): v for k, v in replica["model"].items()}}


def worker_states(folder: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each old worker's {model, optimizer, scheduler}, from one file (simulated) or one per rank."""
    if manifest["simulate"]:
        return ckpt.load_rank_state(folder, 0)["workers"]
    return [ckpt.load_rank_state(folder, r)["workers"][0] for r in range(manifest["virtual_world_size"])]


def full_run_state(folder: Path, manifest: dict[str, Any], make_optimizer: OptimizerFactory) -> FullRunState:
    """Assemble the checkpoint's model and optimizer state in this process."""
    config = from_dict(manifest["config"])
    if is_replicated(config, manifest):
        replica = replica_state(folder)
        return FullRunState(replica["model"], replica["optimizer"], replica["scheduler"], replicated=True)
    sim = rebuild_simulator(manifest)
    states = worker_states(folder, manifest)
    optimizers = [make_optimizer(config, w.shard_parameters()) for w in sim.workers]
    for worker, optimizer, state in zip(sim.workers, optimizers, states):
        worker.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    return FullRunState(sim.full_state_dict(), sim.full_optimizer_state(optimizers), states[0]["scheduler"],
                        replicated=False)


def load_resharded(models: list[nn.Module], plain_models: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                   schedulers: list[Any], state: FullRunState) -> None:
    """Give each local worker (``models``: SDP subnetworks, or DDP's ``plain_models``) its share."""
    for model, plain, optimizer, scheduler in zip(models, plain_models, optimizers, schedulers):
        if state.replicated:
            plain.load_state_dict(state.model)
            optimizer.load_state_dict(state.optimizer)  # same parameters in the same order on any N
        else:
            model.load_full_state_dict(state.model)
            model.load_full_optimizer_state(optimizer, state.optimizer)
        scheduler.load_state_dict(state.scheduler)
