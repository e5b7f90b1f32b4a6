"""Resume a run on another number of workers, or at another coverage: "re-plan and move".

    subnetdp train CONFIG --workers 4 --out runs/r            # killed at step 400
    subnetdp train CONFIG --workers 3 --out runs/r --resume   # continues on 3 workers
    subnetdp train CONFIG --workers 4 --out runs/r --resume --set strategy.coverage=0.75

SDP checkpoints hold the model and optimizer state as chunks of the full tensors
(torch.distributed.checkpoint, ``engine/checkpoint.py``): each new worker, cut under the new plan,
reads only the chunks it holds, a unit that moves to a new holder with its optimizer moments. No
process assembles the whole model. DDP replicas are identical, so a DDP run (or the replicated
full-model phase) resumes from rank 0's file on any number of workers; this module reads that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from . import checkpoint as ckpt


def is_replicated(config: Config, manifest: dict[str, Any]) -> bool:
    """A DDP-style checkpoint: rank 0's file holds the one full model (DDP, or the replicated
    full-model phase); SDP state, the sharded full phase's included, is in ``model/`` instead."""
    if ckpt.holds_dcp(manifest):
        return False
    return config["strategy.name"] == "ddp" or manifest.get("phase") == "full"


def replica_state(folder: Path) -> dict[str, Any]:
    """Rank 0's {model, optimizer, scheduler} of a DDP-style checkpoint, model keys as the plain
    model's (DistributedDataParallel prefixes them with "module."; a simulated DDP run does not)."""
    replica = ckpt.load_rank_state(folder, 0)["workers"][0]
    return {**replica, "model": {k.removeprefix("module."): v for k, v in replica["model"].items()}}


def load_replica(trainer: Any, replica: dict[str, Any]) -> None:
    """Every local DDP replica of ``trainer`` takes the checkpoint's model, optimizer and schedule
    (the same parameters in the same order on any number of workers)."""
    for plain, optimizer, scheduler in zip(trainer.par.unwrapped_models, trainer.optimizers, trainer.schedulers):
        plain.load_state_dict(replica["model"])
        optimizer.load_state_dict(replica["optimizer"])
        scheduler.load_state_dict(replica["scheduler"])
