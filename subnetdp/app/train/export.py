"""`subnetdp export`: one safetensors file of the assembled full model, from a run's checkpoint.

    subnetdp export runs/r18 --out r18.safetensors          # newest complete checkpoint
    subnetdp export runs/r18 --step 400 --out r18-400.safetensors
    subnetdp export runs/r18 --out r18.safetensors --overwrite  # replace r18.safetensors
    subnetdp export runs/r18 --out r18.safetensors --scale-branches   # B-SDP: branches x k/N, folded

The newest complete checkpoint is the newest whose files match the sizes and hashes of its manifest;
newer ones that do not are skipped, and the command says which and why before it names the step it
exported. An --out that exists is refused unless --overwrite; the file is written to a temporary name
next to it and renamed into place, so --out is either the old file or the new one, and the
temporary file is removed when writing fails.

Runs in one process, without torch.distributed: for SDP it builds the plain model from the
manifest's sizes and reads every chunk of the checkpoint's `model/` (torch.distributed.checkpoint)
into it: the model ``full_state_dict()`` assembles (each unit from its first holder, norm
statistics averaged over holders). DDP: rank 0's replica.
The file loads into the plain model: ``model.load_state_dict(safetensors.torch.load_file(path))``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ...engine import checkpoint as sdp_checkpoint
from ...engine.evaluation import fold_residual_scale
from ..builders import MODELS, rebuild_model
from ..config import from_dict, holders_per_unit
from . import checkpoint as ckpt
from .reshard import is_replicated, replica_state


class ExportError(ckpt.CheckpointError):
    """The output file cannot be written (exists without --overwrite, is a folder, not writable)."""


@dataclass
class Exported:
    path: Path
    step: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints passed over, and why


def find_checkpoint(run_dir: Path, step: int | None = None, skipped: list[tuple[Path, str]] | None = None
                    ) -> tuple[Path, dict[str, Any]]:
    """The folder and manifest of ``run_dir``'s checkpoint ``step``; without ``step`` the newest
    complete one (the damaged newer ones are appended to ``skipped``)."""
    root = run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise ckpt.CheckpointError(f"{run_dir} is not a run folder (no such folder)")
    if step is None:
        passed = [] if skipped is None else skipped
        found = ckpt.latest(root, skipped=passed)
        if found is None:
            why = "; ".join(f"{folder.name}: {reason}" for folder, reason in passed)
            raise ckpt.CheckpointError(f"no complete checkpoint under {root}" + (f" (skipped {why})" if why else ""))
        return found
    folder = ckpt.step_dir(root, step)
    if not folder.is_dir():
        steps = [str(m["step"]) for _, m in ckpt.complete_checkpoints(root, verify=False)]
        raise ckpt.CheckpointError(f"--step {step}: no checkpoint {folder}; "
                                   + (f"complete ones: step {', '.join(steps)}" if steps else f"none under {root}"))
    return folder, ckpt.read_manifest(folder)


def assemble_from_checkpoint(run_dir: Path, step: int | None = None, skipped: list[tuple[Path, str]] | None = None
                             ) -> tuple[dict[str, torch.Tensor], dict]:
    """The full model's state dict (original keys, CPU) and the checkpoint's manifest. Without
    ``step`` the newest complete checkpoint: the damaged newer ones are appended to ``skipped``."""
    folder, manifest = find_checkpoint(run_dir, step, skipped)
    ckpt.require_readable(manifest, folder)
    config = from_dict(manifest["config"])
    if is_replicated(config, manifest):  # one full model (DDP-style)
        return {k: v.contiguous() for k, v in replica_state(folder)["model"].items()}, manifest
    model = rebuild_model(manifest["model"], manifest["model_kwargs"])  # every chunk read into it
    sdp_checkpoint.load_full_state_dict(folder / ckpt.MODEL_DIR, model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, manifest


def check_output(out: Path, force: bool = False) -> None:
    """ExportError when ``out`` cannot be written: a folder, a file that exists (without ``force``),
    or under a file or a folder that is not writable."""
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder: give a file name, e.g. {out / 'model.safetensors'}")
    if out.exists() and not force:
        raise ExportError(f"--out {out} already exists: pass --overwrite to replace it, or choose another --out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: {parent} is not writable")


def branch_scaled(state: dict[str, torch.Tensor], manifest: dict[str, Any]) -> tuple[dict[str, torch.Tensor], float]:
    """``state`` with each residual branch's last layer multiplied by k/N (``fold_residual_scale``):
    the "x k/N" evaluation of a B-SDP run trained unscaled, as plain weights. ExportError where it
    does not apply."""
    config = from_dict(manifest["config"])
    s = config.section("strategy")
    if s["name"] != "sdp" or s["level"] != "block" or s["masking"] != "forward" or s["scale"] != "none":
        raise ExportError("--scale-branches folds k/N into blocks trained unscaled in k of N subnetworks: it needs a "
                          f"B-SDP run with forward masking and scale 'none' ({manifest['strategy']} was not)")
    if manifest.get("phase") == "full":
        raise ExportError(f"--scale-branches: checkpoint step {manifest['step']} is in the full-model phase, where "
                          "every block already trained in the whole model; export it as is")
    workers = manifest["virtual_world_size"]
    factor = holders_per_unit(s["coverage"], workers) / workers
    model = rebuild_model(manifest["model"], manifest["model_kwargs"])
    model.load_state_dict(state, strict=True)
    fold_residual_scale(model, MODELS[manifest["model"]][1], factor)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, factor


def export(run_dir: Path, out: Path, step: int | None = None, force: bool = False,
           scale_branches: bool = False) -> Exported:
    """Write the assembled model of ``run_dir``'s checkpoint (``step``, default the newest complete
    one) to ``out``, atomically; an existing ``out`` only with ``force``. ``scale_branches``: each
    residual branch multiplied by k/N (``branch_scaled``)."""
    check_output(out, force)  # before the (long) assembly
    skipped: list[tuple[Path, str]] = []
    state, manifest = assemble_from_checkpoint(run_dir, step, skipped)
    metadata = {"step": str(manifest["step"]), "model": manifest["model"],
                "model_kwargs": json.dumps(manifest["model_kwargs"]), "strategy": manifest["strategy"]}
    if scale_branches:
        state, factor = branch_scaled(state, manifest)
        metadata["branch_scale"] = f"{factor:g}"
    check_output(out, force)  # again: something may have appeared meanwhile
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # the mode any new file gets here (0666 less the umask, as every other output); safetensors
        # creates its file 0600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except Exception as exc:  # noqa: BLE001 - any failure to write (disk full, permissions) is one line
        raise ExportError(f"cannot write {out}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a failed write leaves no .tmp behind
    return Exported(out, manifest["step"], skipped)
