"""The run folder: what may be written into it, and when.

- ``check_run_folder``: before anything starts or is removed (the launcher, then every worker): a
  folder that holds a run is refused without --resume or --overwrite; a complete run is left as is.
- ``prepare_run_folder``: the newest complete checkpoint to resume from, or a clean folder.
- ``check_resume``: which config changes a resume accepts, and whether the state must be re-planned
  and moved (another worker count or coverage: reshard.py).
- ``truncate_metrics``: on resume, drop the log lines after the checkpoint and torn lines.
- ``lock_run_folder``: one run at a time per folder (lock.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import RESUMABLE_CHANGES, Config, ConfigError, from_dict, phase_steps
from ..lock import RunFolderLock, RunFolderLocked, locked_by_launcher
from ..lock import acquire as acquire_run_folder
from . import checkpoint as ckpt

if TYPE_CHECKING:
    from .context import Context

# what a run writes into its folder, and what `--overwrite` removes (config.json is rewritten)
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "checkpoints")


def check_run_folder(out: Path, config: Config, resume: bool, overwrite: bool = False,
                     workers: int | None = None, simulate: bool = False) -> str | None:
    """Before anything starts or is removed (the launcher, and each process before it trains):
    ConfigError when ``out`` cannot take this run, that is when it is a file or not writable, or
    holds a run (metrics.jsonl, summary.json or checkpoints/) and neither ``resume`` nor
    ``overwrite`` says what to do with it; CheckpointError when ``resume`` finds no checkpoint.
    Returns a message when ``resume`` finds the run already complete (its newest checkpoint is at
    the last step): then there is nothing to do and nothing in ``out`` must change, once the
    config (and, given ``workers``, the workers) pass the checks a resume makes."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == out and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: give a folder for the run")
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable")
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    root = out / "checkpoints"
    if resume:
        found = ckpt.latest(root, verify=False)  # sizes only: the hashes are checked when it is loaded
        if found is None:
            raise ckpt.CheckpointError(f"--resume: no complete checkpoint under {root}")
        folder, manifest = found
        ckpt.require_readable(manifest, folder)  # before anything starts: one line
        if workers is not None:  # a resume under another config is refused, complete or not
            check_resume(config, manifest, workers, simulate, folder)
        steps = sum(phase_steps(config))
        if manifest["step"] < steps:
            return None
        try:
            ckpt.read_manifest(folder, verify=True)
        except ckpt.CheckpointError:
            return None  # damaged: resuming falls back to an older checkpoint and trains again from there
        summary = out / "summary.json"
        kept = ("summary.json and the checkpoints are kept" if summary.exists() else
                "it has no summary.json (stopped in its final evaluation?): `subnetdp export` still works")
        longer = (f"to train longer, resume with --set run.steps=N larger than {config['run.steps']}"
                  if config["strategy.full_phase"] == 0 else
                  "a run that ends with a full-model phase cannot be extended: start a new run to train longer")
        return (f"{out}: the run is already complete (checkpoint at step {manifest['step']} of {steps}); nothing "
                f"to resume, {kept}; {longer}")
    held = [name + ("/" if name == "checkpoints" else "") for name in RUN_OUTPUTS if (out / name).exists()]
    if held and not overwrite:
        raise ConfigError(f"--out {out} already holds a run ({', '.join(held)}): continue it with --resume, "
                          "replace it with --overwrite, or choose another --out")
    return None


def prepare_run_folder(out: Path, ctx: Context, resume: bool, skipped: list[tuple[Path, str]] | None = None
                       ) -> tuple[Path, dict[str, Any]] | None:
    """Create ``out``; with ``resume`` return the newest complete checkpoint (folder, manifest),
    appending the newer damaged ones it passed over to ``skipped``; else remove what an earlier run
    left there (metrics, summary, checkpoints) and return None. `subnetdp train` calls
    ``check_run_folder`` first: it removes nothing without --overwrite."""
    out.mkdir(parents=True, exist_ok=True)
    root = out / "checkpoints"
    if resume:
        found = ckpt.latest(root, skipped=skipped)
        if found is None:
            raise ckpt.CheckpointError(f"--resume: no complete checkpoint under {root}")
        return found
    if ctx.is_main:
        for stale in RUN_OUTPUTS:
            path = out / stale
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return None


def metrics_record(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl line as its record, or None when it is torn (a partial write: a full disk,
    a kill) or otherwise not a record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """On resume: drop the lines a killed run logged after its last checkpoint, and torn lines
    (a partial last write), which are reported on stderr. Returns the records kept."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = [(line, metrics_record(line)) for line in lines]
    torn = sum(record is None for _, record in records)
    if torn:
        print(f"warning: {path}: dropped {torn} unreadable line{'s' if torn > 1 else ''} (torn by an "
              "interrupted write)", file=sys.stderr)
    kept = [(line, record) for line, record in records if record is not None and record["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line, _ in kept))
    tmp.replace(path)
    return [record for _, record in kept]


# a resume may also change these: the state is then re-planned and moved (reshard.py)
RESHARDABLE_CHANGES = {("strategy", "coverage"), ("strategy", "memory_budget"), ("strategy", "shard"),
                       ("strategy", "shard_shared_weights")}


def check_resume(config: Config, manifest: dict[str, Any], world_size: int, simulate: bool, folder: Path) -> bool:
    """Refuse a resume under a different config, or one that would move the switch to the
    full-model phase; return whether the state must be re-planned and moved (another worker
    count, coverage, or simulated versus real workers)."""
    saved = from_dict(manifest["config"])
    allowed = RESUMABLE_CHANGES | RESHARDABLE_CHANGES
    differences = config.differences(saved)
    changed = [d for d in differences if (d[0], d[1]) not in allowed]
    if changed:
        lines = "\n".join(f"  {s}.{k}: checkpoint {b!r}, now {a!r}" for s, k, a, b in changed)
        may_change = sorted(".".join(x) for x in allowed)
        raise ckpt.CheckpointError(f"--resume: the config differs from the one {folder} was written with:\n"
                                   f"{lines}\nresume with the same config (only {may_change} may change)")
    if saved["strategy.full_phase"] > 0 and phase_steps(config) != phase_steps(saved):
        own, full = phase_steps(saved)
        keys = ", ".join(f"{s}.{k} {b!r} -> {a!r}" for s, k, a, b in differences)
        raise ckpt.CheckpointError(
            f"--resume: this run ends with a full-model phase (strategy.full_phase = {saved['strategy.full_phase']:g})"
            ": "
            f"SDP trains steps 1-{own} and the full model steps {own + 1}-{own + full}; {keys} would move that "
            "switch, so it cannot change on resume. Resume without it, or start a new run")
    moved = (manifest["virtual_world_size"] != world_size or manifest["simulate"] != simulate
             or any((d[0], d[1]) in RESHARDABLE_CHANGES for d in differences))
    if moved and saved["strategy.redraw_every"]:
        kind = "simulated" if manifest["simulate"] else "real"
        raise ckpt.CheckpointError(f"--resume: {folder} is a run with re-drawn plans (strategy.redraw_every = "
                                   f"{saved['strategy.redraw_every']}); it resumes only on the same "
                                   f"{manifest['virtual_world_size']} {kind} workers at the same coverage")
    if moved and manifest.get("phase") == "full" and saved["strategy.full_phase_shard"] \
            and not ckpt.holds_dcp(manifest):
        raise ckpt.CheckpointError(f"--resume: {folder} is in the sharded full phase, whose optimizer state is split "
                                   f"over its {manifest['virtual_world_size']} workers; it resumes only on the same "
                                   "workers, simulated or real as it ran")
    return moved


def resume_changes(config: Config, manifest: dict[str, Any]) -> list[str]:
    """One line per config value a resume changes from its checkpoint's (``run.steps changed 8
    -> 40``), and what follows from it (a schedule stretched, a re-plan)."""
    saved = from_dict(manifest["config"])
    lines = [f"{s}.{k} changed {b!r} -> {a!r}" for s, k, a, b in config.differences(saved)]
    if config["run.steps"] != saved["run.steps"] and config["optim.lr_schedule"] != "constant":
        lines.append(f"the {config['optim.lr_schedule']} learning-rate schedule now spans the new length")
    return lines


def lock_run_folder(out: Path, ctx: Context) -> RunFolderLock | None:
    """Rank 0 locks ``out`` unless the launcher holds its lock; every rank raises if it could not."""
    if locked_by_launcher(out):
        return None
    lock, error = None, None
    if ctx.is_main:
        try:
            lock = acquire_run_folder(out)
        except RunFolderLocked as exc:
            error = exc
    import torch  # (the launcher imports this module and must not pay for torch)
    if not ctx.simulate and ctx.all_reduce_sum(torch.tensor([float(error is not None)])).item() and error is None:
        error = RunFolderLocked(f"rank {ctx.rank}: rank 0 could not lock {out}: another run uses it")
    if error is not None:
        raise error
    return lock
