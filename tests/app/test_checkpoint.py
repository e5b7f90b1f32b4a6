"""Checkpoint atomicity: a partial, truncated or corrupted checkpoint is never taken for a good one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from subnetdp.app.train import checkpoint as ckpt

# what train.py records besides what finalize adds (step, world_size, files)
MANIFEST = {"config": {}, "simulate": False, "strategy": "DDP", "model_kwargs": {}, "model": "resnet18",
            "example_input_shape": [1, 3, 8, 8], "plan_fingerprint": None, "virtual_world_size": 2}


def _save(root: Path, step: int, world: int = 2, keep: int = 5) -> Path:
    for rank in range(world):
        ckpt.write_rank_state(root, step, rank, {"rank": rank, "values": torch.arange(100) + step})
    return ckpt.finalize(root, step, world, MANIFEST, keep)


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


# ---------------------------------------------------------------------------------------------
# issue 17, item 7: a manifest without a key, or not UTF-8, is one line, not a KeyError traceback


@pytest.mark.parametrize("edit", ["config", "virtual_world_size", "simulate", "model", "step", "files",
                                  "files.1.sha256", "files.0=list", "step=str"])
def test_a_manifest_missing_a_key_names_the_file_and_the_key(tmp_path: Path, edit: str) -> None:
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    path = newest / "manifest.json"
    manifest = json.loads(path.read_text())
    if edit == "files.1.sha256":
        del manifest["files"]["1"]["sha256"]
        name, what = '"files": "1": "sha256"', "is missing"
    elif edit == "files.0=list":
        manifest["files"]["0"] = []
        name, what = '"files": "0"', "holds a list"
    elif edit == "step=str":
        manifest["step"] = "20"
        name, what = '"step"', "holds a str"
    else:
        del manifest[edit]
        name, what = f'"{edit}"', "is missing"
    path.write_text(json.dumps(manifest))
    for read in (lambda: ckpt.read_manifest(newest), lambda: ckpt.latest(tmp_path),
                 lambda: ckpt.complete_checkpoints(tmp_path)):
        with pytest.raises(ckpt.ManifestError) as exc:  # not passed over for the older one: see ManifestError
            read()
        assert str(exc.value).startswith(f"{path}: the key {name} {what}: this checkpoint manifest ")
        assert "\n" not in str(exc.value)


def test_a_manifest_that_is_not_utf8_is_passed_over_as_damaged(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    (newest / "manifest.json").write_bytes(b"\xff\xfe{not text")
    skipped: list = []
    assert ckpt.latest(tmp_path, skipped=skipped)[1]["step"] == 10
    assert skipped[0][0] == newest and skipped[0][1].startswith("no readable manifest.json ('utf-8' codec ")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 2-step run of 2 simulated workers with a checkpoint at step 2: (config, folder)."""
    from _runs import _config, _train
    tmp = tmp_path_factory.mktemp("tiny")
    config, out = _config(tmp), tmp / "run"
    _train(config, out, "--workers", "2", "--simulate", "--set", "run.steps=2", "--set", "run.checkpoint_interval=2",
           "--set", "run.eval_interval=0", "--set", "eval.recalibrate_norm_batches=0")
    return config, out


def test_export_and_resume_of_a_run_whose_manifest_lacks_a_key_are_one_line(tiny_run, tmp_path: Path,
                                                                              capsys) -> None:
    import shutil

    from subnetdp.app.cli import main
    config, out = tiny_run[0], tmp_path / "run"
    shutil.copytree(tiny_run[1], out)
    path = out / "checkpoints" / "step-00000002" / "manifest.json"
    for key in ("config", "virtual_world_size", "simulate", "model", "model_kwargs"):
        manifest = json.loads(path.read_text())
        saved = manifest.pop(key)
        path.write_text(json.dumps(manifest))
        for argv in (["export", str(out), "--out", str(tmp_path / "m.safetensors")],
                     ["train", str(config), "--workers", "2", "--simulate", "--out", str(out), "--resume",
                      "--no-progress",
                      "--set", "run.steps=4"]):
            assert main(argv) == 2, (key, argv)
            err = capsys.readouterr().err
            assert err.strip() == (f"error: {path}: the key \"{key}\" is missing: this checkpoint manifest was "
                                   "edited or written by another version of subnetdp"), (key, argv[0], err[-3000:])
        manifest[key] = saved
        path.write_text(json.dumps(manifest))
    assert main(["export", str(out), "--out", str(tmp_path / "m.safetensors")]) == 0


def test_the_exported_file_has_the_mode_of_any_new_file(tiny_run, tmp_path: Path) -> None:
    """Issue 17, item 9: safetensors created it 0600 whatever the umask."""
    import os

    from subnetdp.app.cli import main
    for umask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            target = tmp_path / f"m-{mode:o}.safetensors"
            assert main(["export", str(tiny_run[1]), "--out", str(target)]) == 0
            assert main(["export", str(tiny_run[1]), "--out", str(target), "--force"]) == 0  # replaced: the same
        finally:
            os.umask(old)
        assert target.stat().st_mode & 0o777 == mode, (oct(umask), oct(target.stat().st_mode))


def test_an_sdp_checkpoint_of_format_1_is_refused_in_one_line_naming_the_version(tmp_path: Path) -> None:
    old = {"config": {"strategy": {"name": "sdp"}}, "step": 4}  # subnetdp 0.1.0 wrote no "format"
    with pytest.raises(ckpt.CheckpointError, match=r"written by subnetdp 0\.1\.0 .*format 1") as info:
        ckpt.require_readable(old, tmp_path)
    assert "\n" not in str(info.value)
    ckpt.require_readable({"config": {"strategy": {"name": "ddp"}}}, tmp_path)  # DDP's format is unchanged
    ckpt.require_readable({"config": {"strategy": {"name": "sdp"}}, "format": ckpt.FORMAT}, tmp_path)
