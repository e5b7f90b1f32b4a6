"""Checkpoints: each rank writes only what it holds, then rank 0 writes a manifest; atomically.

Layout of ``OUT/checkpoints``:

    step-00000400/            a complete checkpoint (renamed into place only once it is whole)
        manifest.json         step, world size, plan fingerprint, config, and each file's size
                              and sha256
        rank-00000.pt ...     that rank's schedulers and RNG states; DDP: rank 0's also holds the
                              model and optimizer (every replica is the same)
        model/                SDP: the model and optimizer state through torch.distributed.checkpoint
                              (engine/checkpoint.py): .metadata and one __R_0.distcp file per rank,
                              each with the chunks of the full tensors that rank saved
    step-00000600.partial/    being written, or left by a crash: never read, removed on next save

Protocol: every rank writes its file to a temporary name and renames it (``os.replace`` is atomic
on POSIX), all ranks meet at a barrier, rank 0 checks the files, writes the manifest the same way
and renames the folder. A checkpoint is taken for good only when its folder has no ``.partial``
suffix and its manifest's sizes and hashes match the files. Ranks on several machines need a shared
file system for ``--out``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

PARTIAL = ".partial"
MODEL_DIR = "model"  # the DCP checkpoint of an SDP run's model and optimizer state
# 1: subnetdp 0.1.0, every SDP worker's subnetwork in its rank's .pt file; 2: SDP state through DCP
FORMAT = 2


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not match the run being resumed."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def partial_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is whole."""
    return Path(str(step_dir(root, step)) + PARTIAL)


def holds_dcp(manifest: dict[str, Any]) -> bool:
    """The checkpoint keeps its SDP model and optimizer state in ``model/`` (format 2)."""
    return manifest.get("model_checkpoint") == "dcp"


def require_readable(manifest: dict[str, Any], folder: Path) -> None:
    """CheckpointError for an SDP checkpoint of format 1, which this version no longer reads."""
    if manifest.get("format", 1) < FORMAT and manifest["config"].get("strategy", {}).get("name") != "ddp":
        raise CheckpointError(f"{folder} was written by subnetdp 0.1.0 (checkpoint format 1: each worker's "
                              "subnetwork in its rank's .pt file); this version reads SDP checkpoints of format "
                              f"{FORMAT} (torch.distributed.checkpoint) only: resume or export it with subnetdp 0.1.0")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_rank_state(root: Path, step: int, rank: int, state: dict[str, Any]) -> None:
    """Every rank: write this rank's state into the step's partial folder."""
    folder = partial_dir(root, step)
    folder.mkdir(parents=True, exist_ok=True)
    import torch  # here, not at the top: the launcher checks checkpoints without importing torch
    _atomic_write_bytes(folder / rank_file(rank), lambda f: torch.save(state, f))


def finalize(root: Path, step: int, world_size: int, manifest: dict[str, Any], keep: int) -> Path:
    """Rank 0, after every rank's write (a barrier): hash the files, write the manifest, publish."""
    partial = partial_dir(root, step)
    files = {}
    for rank in range(world_size):
        path = partial / rank_file(rank)
        if not path.is_file():
            raise CheckpointError(f"rank {rank} did not write {path}")
        files[str(rank)] = {"name": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}
    model_files = {f"{MODEL_DIR}/{p.name}": {"name": f"{MODEL_DIR}/{p.name}", "bytes": p.stat().st_size,
                                             "sha256": _sha256(p)}
                   for p in sorted((partial / MODEL_DIR).glob("*")) if p.is_file()}
    from ... import __version__
    body = {**manifest, "step": step, "world_size": world_size, "files": files, "written_at": time.time(),
            "format": FORMAT, "subnetdp_version": __version__,
            **({"model_checkpoint": "dcp", "model_files": model_files} if model_files else {})}
    _atomic_write_bytes(partial / "manifest.json", lambda f: f.write(json.dumps(body, indent=1).encode()))
    final = step_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _prune(root, keep)
    return final


def _phase(folder: Path) -> str | None:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("phase")
    except (OSError, ValueError, AttributeError):
        return None


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints and, once a run is in its full-model phase, the last
    one of its SDP phase: its subnetworks (`subnetdp export --subnetwork`), which no full-phase
    checkpoint holds."""
    for stale in root.glob(f"step-*{PARTIAL}"):
        shutil.rmtree(stale, ignore_errors=True)
    complete = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(PARTIAL))
    kept = set(complete[-keep:])
    phases = {p: _phase(p) for p in complete}
    if "full" in phases.values():
        own = [p for p in complete if phases[p] == "own"]
        kept.update(own[-1:])
    for old in complete:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


class ManifestError(CheckpointError):
    """A complete checkpoint whose manifest.json lacks a key every reader needs (or holds a value of
    the wrong type). Not skipped in favour of an older checkpoint as a torn file is: a manifest is
    written whole (atomically, after the files), so this one was edited or written by another
    version, and so, most likely, were the older ones."""


# key -> type of what every reader of a manifest needs (train --resume, export, reshard, sweep, align)
MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {
    "step": int, "world_size": int, "files": dict, "config": dict, "virtual_world_size": int, "simulate": bool,
    "model": str, "model_kwargs": dict, "strategy": str, "example_input_shape": list,
    "plan_fingerprint": (str, type(None))}
FILE_KEYS: dict[str, type] = {"name": str, "bytes": int, "sha256": str}


def check_manifest(manifest: Any, path: Path) -> None:
    """ManifestError naming ``path`` and the first key that is missing or has the wrong type."""
    def wrong(name: str, value: Any) -> ManifestError:
        return ManifestError(f"{path}: {name} holds a {type(value).__name__}: this checkpoint manifest is "
                             "damaged or was edited")

    def check(where: dict, keys: dict[str, Any], prefix: str = "") -> None:
        for key, kind in keys.items():
            name = f"the key {prefix}{json.dumps(key)}"
            if key not in where:
                raise ManifestError(f"{path}: {name} is missing: this checkpoint manifest was edited or written "
                                    "by another version of subnetdp")
            if not isinstance(where[key], kind) or (kind is int and isinstance(where[key], bool)):
                raise wrong(name, where[key])

    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: not a checkpoint manifest (a JSON object) but a {type(manifest).__name__}")
    check(manifest, MANIFEST_KEYS)
    for rank, entry in manifest["files"].items():
        if not isinstance(entry, dict):
            raise wrong(f'the key "files": {json.dumps(rank)}', entry)
        check(entry, FILE_KEYS, f'"files": {json.dumps(rank)}: ')


def read_manifest(folder: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError when it is missing or does not match
    its files (``latest`` then passes over it), ManifestError when it lacks a key (see there)."""
    if folder.name.endswith(PARTIAL):
        raise CheckpointError(f"{folder} is a partial checkpoint")
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
        raise CheckpointError(f"{folder}: no readable manifest.json ({exc})") from None
    check_manifest(manifest, path)
    entries = [(f"rank {rank}'s file", entry) for rank, entry in manifest["files"].items()]
    if isinstance(manifest.get("model_files"), dict):
        entries += [("the model file", entry) for entry in manifest["model_files"].values()]
    for whose, entry in entries:
        file = folder / entry["name"]
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{folder}: {whose} {entry['name']} is missing or truncated")
        if verify and _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{folder}: {whose} {entry['name']} does not match its hash")
    return manifest


def latest(root: Path, verify: bool = True, skipped: list[tuple[Path, str]] | None = None
           ) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete, verified checkpoint under ``root``; damaged ones are skipped, and
    appended to ``skipped`` (when given) as (folder, why), newest first. A manifest that lacks a
    key is not skipped: ManifestError."""
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(PARTIAL)),
                        reverse=True)
    for folder in candidates:
        try:
            return folder, read_manifest(folder, verify)
        except ManifestError:
            raise
        except CheckpointError as exc:
            if skipped is not None:
                skipped.append((folder, str(exc).removeprefix(f"{folder}: ")))
            continue
    return None


def complete_checkpoints(root: Path, verify: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    """Every complete checkpoint under ``root`` as (folder, manifest), oldest step first; partial
    and damaged ones (missing files, sizes or, with ``verify``, hashes that do not match) are skipped."""
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(PARTIAL)):
        try:
            found.append((folder, read_manifest(folder, verify)))
        except ManifestError:
            raise
        except CheckpointError:
            continue
    return found


def load_rank_state(folder: Path, rank: int) -> dict[str, Any]:
    """One rank's file, on CPU: RNG states must be CPU tensors, and load_state_dict moves weights
    and optimizer state to the devices of the parameters they are loaded into."""
    import torch
    return torch.load(folder / rank_file(rank), map_location="cpu", weights_only=False)
