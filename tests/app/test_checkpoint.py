"""Checkpoint atomicity: a partial, truncated or corrupted checkpoint is never taken for a good one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from subnetdp.app import checkpoint as ckpt


def _save(root: Path, step: int, world: int = 2, keep: int = 5) -> Path:
    for rank in range(world):
        ckpt.write_rank_state(root, step, rank, {"rank": rank, "values": torch.arange(100) + step})
    return ckpt.finalize(root, step, world, {"config": {}}, keep)


def test_complete_checkpoint_round_trip(tmp_path: Path) -> None:
    folder = _save(tmp_path, 10)
    found = ckpt.latest(tmp_path)
    assert found is not None and found[0] == folder and found[1]["step"] == 10
    assert torch.equal(ckpt.load_rank_state(folder, 1)["values"], torch.arange(100) + 10)
    assert set(json.loads((folder / "manifest.json").read_text())["files"]) == {"0", "1"}


def test_partial_checkpoint_of_a_crashed_run_is_ignored(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    # a crash after the ranks wrote, before rank 0 published: a .partial folder without manifest
    for rank in range(2):
        ckpt.write_rank_state(tmp_path, 20, rank, {"rank": rank})
    assert (tmp_path / "step-00000020.partial").is_dir()
    assert ckpt.latest(tmp_path)[1]["step"] == 10
    _save(tmp_path, 30)  # the next save clears the leftover
    assert not (tmp_path / "step-00000020.partial").exists()


def test_half_written_rank_file_never_replaces_a_good_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, 10)

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed while writing

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_rank_state(tmp_path, 20, 0, {"rank": 0})
    monkeypatch.undo()
    assert not (tmp_path / "step-00000020.partial" / "rank-00000.pt").exists()  # only its .tmp
    assert ckpt.latest(tmp_path)[1]["step"] == 10


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path, damage: str) -> None:
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    target = newest / "rank-00001.pt"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        target.unlink()
    with pytest.raises(ckpt.CheckpointError):
        ckpt.read_manifest(newest)
    assert ckpt.latest(tmp_path)[1]["step"] == 10


def test_missing_rank_file_refuses_to_publish(tmp_path: Path) -> None:
    ckpt.write_rank_state(tmp_path, 10, 0, {"rank": 0})
    with pytest.raises(ckpt.CheckpointError, match="rank 1 did not write"):
        ckpt.finalize(tmp_path, 10, 2, {}, 2)
    assert ckpt.latest(tmp_path) is None


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020", "step-00000030"]
