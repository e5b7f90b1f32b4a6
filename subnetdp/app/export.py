"""`subnetdp export`: one safetensors file of the assembled full model, from a run's checkpoint.

    subnetdp export runs/r18 --out r18.safetensors          # newest complete checkpoint
    subnetdp export runs/r18 --step 400 --out r18-400.safetensors

Runs in one process, without torch.distributed: for SDP it rebuilds every worker's subnetwork from
the recorded plan arguments, loads each rank's file and assembles the model exactly as
``full_state_dict()`` does (each unit from its first holder, norm statistics averaged over holders).
The file loads into the plain model: ``model.load_state_dict(safetensors.torch.load_file(path))``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..engine import SubnetworkSimulator
from . import checkpoint as ckpt
from .builders import MODELS, rebuild_model
from .config import from_dict
from .parallelism import level_kwargs


def assemble_from_checkpoint(run_dir: Path, step: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The full model's state dict (original keys, CPU) and the checkpoint's manifest."""
    root = run_dir / "checkpoints"
    if step is None:
        found = ckpt.latest(root)
        if found is None:
            raise ckpt.CheckpointError(f"no complete checkpoint under {root}")
        folder, manifest = found
    else:
        folder = ckpt.step_dir(root, step)
        manifest = ckpt.read_manifest(folder)
    config = from_dict(manifest["config"])
    model = rebuild_model(manifest["model"], manifest["model_kwargs"])
    world = manifest["virtual_world_size"]
    if config["strategy.name"] == "ddp" or manifest.get("phase") == "full":  # one full model (DDP-style)
        state = ckpt.load_rank_state(folder, 0)["workers"][0]["model"]
        prefix = "module."  # DistributedDataParallel's; a simulated DDP run saved the plain model
        return {k.removeprefix(prefix): v.contiguous() for k, v in state.items()}, manifest
    s = config.section("strategy")
    example = torch.zeros(manifest["example_input_shape"],
                          dtype=torch.long if MODELS[manifest["model"]][2] == "lm" else torch.float32)
    sim = SubnetworkSimulator(model, world, **level_kwargs(s["level"], MODELS[manifest["model"]][1]),
                              coverage=s["coverage"], masking=s["masking"], seed=s["plan_seed"], scale=s["scale"],
                              neuron_groups=s["neuron_groups"] or None, example_input=example)
    if sim.plan.fingerprint() != manifest["plan_fingerprint"]:
        raise ckpt.CheckpointError(f"{folder}: the rebuilt plan does not match the one the run trained with")
    if manifest["simulate"]:
        workers = [w["model"] for w in ckpt.load_rank_state(folder, 0)["workers"]]
    else:
        workers = [ckpt.load_rank_state(folder, r)["workers"][0]["model"] for r in range(world)]
    for worker, state in zip(sim.workers, workers):
        worker.load_state_dict(state)
    return sim.full_state_dict(), manifest


def export(run_dir: Path, out: Path, step: int | None = None) -> Path:
    state, manifest = assemble_from_checkpoint(run_dir, step)
    metadata = {"step": str(manifest["step"]), "model": manifest["model"],
                "model_kwargs": json.dumps(manifest["model_kwargs"]), "strategy": manifest["strategy"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out
