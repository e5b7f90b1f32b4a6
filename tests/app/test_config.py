"""Config validation: defaults, wrong keys and values (the error lists the valid ones), overrides,
and every shipped config under configs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from subnetdp.app.builders import check_builder_keys
from subnetdp.app.cli import main
from subnetdp.app.config import SCHEMA, ConfigError, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("**/*.toml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_fill_every_schema_key(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "[run]\nsteps = 5\n"))
    assert config["run.steps"] == 5
    for section, keys in SCHEMA.items():
        assert set(keys) <= set(config.section(section))


@pytest.mark.parametrize("text, message", [
    ("[runn]\nsteps = 1\n", "unknown section 'runn' (did you mean 'run'?); valid: run, strategy"),
    ("[run]\nstep = 1\n", "unknown key in [run] 'step' (did you mean 'steps'?); valid: name, seed, steps"),
    ("[strategy]\nmasking = 'sideways'\n", "valid: forward, backward"),
    ("[strategy]\ncoverage = 1.5\n", "coverage must be in (0, 1]"),
    ("[run]\nsteps = 'ten'\n", "expected a int like 100"),
    ("[optim]\nname = 'lion'\n", "valid: sgd, adamw"),
    ("[run]\nsteps = [\n", "not valid TOML"),
])
def test_wrong_keys_and_values_are_errors_that_list_valid_ones(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(_write(tmp_path, text))


def test_model_and_data_keys_are_checked_against_their_builders(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "[model]\nname = 'resnet18'\nwidht = 8\n"))
    with pytest.raises(ConfigError, match="unknown key in \\[model\\] for 'resnet18': 'widht'; valid: width"):
        check_builder_keys(config)
    config = load_config(_write(tmp_path, "[model]\nname = 'llama'\n[data]\nname = 'fashion-mnist'\n"))
    with pytest.raises(ConfigError, match="does not fit data"):
        check_builder_keys(config)


def test_overrides_are_read_as_toml_values() -> None:
    assert parse_override("strategy.coverage=0.25") == ("strategy", "coverage", 0.25)
    assert parse_override("optim.betas=[0.9, 0.99]") == ("optim", "betas", [0.9, 0.99])
    assert parse_override("run.name=my run") == ("run", "name", "my run")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("coverage=0.25")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path: Path) -> None:
    check_builder_keys(load_config(path))


def test_cli_reports_config_errors_and_lists_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(_write(tmp_path, "[run]\nstep = 1\n"))]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
    assert main(["train", "--list-keys"]) == 0
    listed = capsys.readouterr().out
    assert "coverage = 0.5" in listed and "fashion-mnist: batch_size = 64, root = ''" in listed


def test_a_recorded_full_phase_without_the_shard_key_reads_as_it_ran_replicated() -> None:
    """Checkpoints written before strategy.full_phase_shard existed resume as they ran (replicated)."""
    from subnetdp.app.config import from_dict, load_config

    recorded = load_config(None).to_dict()
    del recorded["strategy"]["full_phase_shard"]
    assert from_dict(recorded)["strategy.full_phase_shard"] is True  # no full phase: the key means nothing
    recorded["strategy"].update(name="sdp", full_phase=0.1)
    assert from_dict(recorded)["strategy.full_phase_shard"] is False
    recorded["strategy"]["full_phase_shard"] = True
    assert from_dict(recorded)["strategy.full_phase_shard"] is True
