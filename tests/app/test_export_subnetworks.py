"""`subnetdp export RUN --subnetwork R` and `--ensemble`, and `subnetdp report RUN`: the exported
models evaluate to exactly the figures the run recorded for them (worker R's subnet_* figures, the
ensemble_* figures), load without subnetdp, and the report measures every model the run yields."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from subnetdp import load_ensemble, load_subnetwork
from subnetdp.app.builders import build_task
from subnetdp.app.config import load_config

from _runs import _config, _train, assert_chart, cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

IMAGES = """
[run]
steps = 8
log_interval = 4
checkpoint_interval = 4
[model]
name = "resnet18"
width = 4
[data]
name = "synthetic-images"
batch_size = 8
train_size = 256
test_size = 96
[optim]
lr = 0.05
[strategy]
name = "sdp"
level = "block"
coverage = 0.5
[eval]
batch_size = 32
recalibrate_norm_batches = 2
residual_scale = "both"
views = ["subnetworks", "ensemble"]
"""

# the plan re-drawn at step 4: the checkpoint of step 8 was written under the second plan
IMAGES_REDRAWN = IMAGES.replace("coverage = 0.5", "coverage = 0.5\nredraw_every = 4")

# neuron level on 3 workers (layers of unequal widths: zero padding), a language model
TEXT = """
[run]
steps = 6
checkpoint_interval = 3
[model]
name = "llama"
preset = "debug"
n_layers = 3
[data]
name = "synthetic-text"
batch_size = 4
seq_len = 16
[strategy]
name = "sdp"
level = "neuron"
coverage = 0.5
[eval]
batch_size = 8
max_batches = 4
views = ["subnetworks", "ensemble"]
"""


@torch.no_grad()
def _evaluate(config_path: Path, run: Path, model: torch.nn.Module) -> dict[str, float]:
    """``model`` on the run's held-out split, as the run's final evaluation covers it."""
    config = load_config(config_path)
    task = build_task(config, out=run)
    totals = torch.zeros(3, dtype=torch.float64)
    cap = config["eval.max_batches"] or None
    for x, y in task.eval_batches(config["eval.batch_size"], 0, 1, cap):
        totals += torch.tensor(task.eval_sums(model(x).float(), y), dtype=torch.float64)
    return task.eval_metrics(*totals.tolist())


def _close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() <= b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9) for k in a)


@pytest.mark.parametrize("text,workers", [(IMAGES_REDRAWN, 4), (TEXT, 3)], ids=["resnet-block-redrawn", "llama-neuron"])
def test_exported_subnetworks_and_ensemble_evaluate_to_the_runs_own_figures(text: str, workers: int,
                                                                             tmp_path: Path) -> None:
    config = _config(tmp_path, text)
    run = tmp_path / "run"
    _train(config, run, "--workers", str(workers), "--simulate")
    summary = json.loads((run / "summary.json").read_text())
    per_worker = summary["final_subnet_by_worker"]
    assert len(per_worker) == workers
    for rank in range(workers):
        out = tmp_path / f"w{rank}"
        result = cli("export", str(run), "--subnetwork", str(rank), "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "parameters" in result.stdout
        model = load_subnetwork(out)
        assert _close(_evaluate(config, run, model), per_worker[rank]), (rank, per_worker[rank])
        card = (out / "README.md").read_text()
        assert f"worker {rank}'s subnetwork" in card and "How it was evaluated" in card
    ensemble_dir = tmp_path / "ensemble"
    result = cli("export", str(run), "--ensemble", "--out", str(ensemble_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    ensemble = load_ensemble(ensemble_dir)
    final = summary["final_eval"]
    expected = {k.removeprefix("ensemble_"): v for k, v in final.items() if k.startswith("ensemble_")}
    assert _close(_evaluate(config, run, ensemble), expected), expected
    assert json.loads((ensemble_dir / "ensemble.json").read_text())["members"] == [f"member-{r}"
                                                                                   for r in range(workers)]


def test_an_earlier_checkpoint_and_the_report(tmp_path: Path) -> None:
    config = _config(tmp_path, IMAGES)
    run = tmp_path / "run"
    _train(config, run, "--workers", "4", "--simulate")
    out = tmp_path / "w1-step4"
    assert cli("export", str(run), "--subnetwork", "1", "--step", "4", "--out", str(out)).returncode == 0
    assert json.loads((out / "config.json").read_text())["subnetwork"]["step"] == 4
    assert "No final evaluation of step 4" in (out / "README.md").read_text()

    report_dir = tmp_path / "report"
    result = cli("report", str(run), "--out", str(report_dir), "--repeats", "2", "--batch", "8", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((report_dir / "models.json").read_text())
    names = [r["model"] for r in report["rows"]]
    assert names == ["assembled", "assembled, branches x 2/4", "assembled, BN re-estimated",
                     "assembled, branches x 2/4, BN re-estimated", "subnetwork 0", "subnetwork 1", "subnetwork 2",
                     "subnetwork 3", "ensemble of 4"]
    assert report["matches_run"] and all(r["recorded"] is not None for r in report["rows"])
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["ensemble of 4"]["params"] == sum(rows[f"subnetwork {r}"]["params"] for r in range(4))
    assert all(rows[f"subnetwork {r}"]["params"] < rows["assembled"]["params"] for r in range(4))
    assert all(r["latency_ms"] > 0 and r["flops_per_example"] > 0 for r in report["rows"])
    assert "| ensemble of 4 |" in (report_dir / "models.md").read_text()
    assert_chart(report_dir / "models.png", None, None)


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    ddp = tmp_path / "ddp"
    _train(_config(tmp_path, IMAGES.replace('name = "sdp"', 'name = "ddp"').replace("steps = 8", "steps = 2")), ddp,
           "--workers", "2", "--simulate")
    result = cli("export", str(ddp), "--subnetwork", "0", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "has no subnetworks" in result.stderr
    assert not (tmp_path / "x").exists()

    config = _config(tmp_path, IMAGES.replace("steps = 8", "steps = 4"))
    run = tmp_path / "run"
    _train(config, run, "--workers", "4", "--simulate")
    result = cli("export", str(run), "--subnetwork", "4", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "workers 0 to 3" in result.stderr
    result = cli("export", str(run), "--ensemble")
    assert result.returncode == 2 and "--out" in result.stderr
    result = cli("export", str(run), "--subnetwork", "0", "--scale-branches", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "--scale-branches" in result.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):
        result = cli("export", str(run), "--subnetwork", "0", "--out", str(mine), *extra)
        assert result.returncode == 2, result.stderr
    assert (mine / "notes.txt").read_text() == "keep" and len(list(mine.iterdir())) == 1
    # a run folder holds a config.json too: never replaced, nor the folder above it
    for target in (run, tmp_path):
        result = cli("export", str(run), "--subnetwork", "0", "--out", str(target), "--overwrite")
        assert result.returncode == 2 and "run folder" in result.stderr, result.stderr
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints"))
    result = cli("export", str(run), "--subnetwork", "0", "--out", str(other), "--overwrite")
    assert result.returncode == 2 and "not a folder subnetdp exported" in result.stderr
    assert (other / "summary.json").is_file() and (run / "checkpoints").is_dir()


def test_a_run_with_a_full_phase_exports_the_subnetworks_the_sdp_phase_left(tmp_path: Path) -> None:
    """The switch to the full-model phase writes a checkpoint of the subnetworks (here step 4, off
    the interval of 3); export and report use it, and a resume from it trains the same run."""
    text = IMAGES.replace("[strategy]", "[strategy]\nfull_phase = 0.5").replace("checkpoint_interval = 4",
                                                                             "checkpoint_interval = 3")
    config = _config(tmp_path, text)
    full = tmp_path / "full"
    _train(config, full, "--workers", "4", "--simulate")
    manifests = {int(p.name[5:]): json.loads((p / "manifest.json").read_text())
                 for p in (full / "checkpoints").glob("step-*")}
    # keep_checkpoints = 2 keeps the newest two, and the SDP phase's last
    assert {s: m["phase"] for s, m in manifests.items()} == {4: "own", 6: "full", 8: "full"}
    result = cli("export", str(full), "--ensemble", "--out", str(tmp_path / "y"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "full-model phase" in result.stderr and "checkpoint step 4" in result.stdout
    result = cli("export", str(full), "--ensemble", "--step", "8", "--out", str(tmp_path / "z"))
    assert result.returncode == 2 and "full-model phase" in result.stderr
    # the report (as the README runs it on the full-phase recipe) measures the SDP phase's models
    result = cli("report", str(full), "--out", str(tmp_path / "rep"), "--repeats", "1", "--batch", "4",
                 "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "rep" / "models.json").read_text())
    assert report["step"] == 4 and report["rows"][-1]["model"] == "ensemble of 4"

    resumed = tmp_path / "resumed"  # as if killed after the switch's checkpoint
    shutil.copytree(full, resumed)
    for later in ("step-00000006", "step-00000008"):
        shutil.rmtree(resumed / "checkpoints" / later)
    (resumed / "summary.json").unlink()
    _train(None, resumed, "--resume", "--workers", "4", "--simulate")
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for d in (full, resumed)]
    assert losses[0] == losses[1]
    # the SDP phase's figures come with the checkpoint, not from the resumed process's empty window
    phases = [json.loads((d / "summary.json").read_text())["full_phase"]["sdp_phase_per_rank"] for d in (full, resumed)]
    assert phases[0] and phases[1] == phases[0]


def test_the_readme_commands_on_a_study_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands docs/deploy.md shows, on the study's ResNet config, shortened to 2 steps."""
    from subnetdp.data import load_fashion_mnist
    try:
        load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed here (scripts/get_data.sh)")
    monkeypatch.chdir(tmp_path)
    study = ROOT / "configs/study/resnet18_fashion_mnist.toml"
    sets = ["run.steps=2", "run.eval_interval=0", "run.checkpoint_interval=0", "eval.max_batches=2",
            "data.batch_size=8", "eval.batch_size=8", "eval.recalibrate_norm_batches=1"]
    _train(study, Path("runs/study-r18"), "--workers", "4", "--simulate", *[a for s in sets for a in ("--set", s)])
    for argv in (["report", "runs/study-r18", "--out", "runs/study-r18-report", "--repeats", "2", "--no-progress"],
                 ["export", "runs/study-r18", "--subnetwork", "0", "--out", "exports/r18-w0"],
                 ["export", "runs/study-r18", "--ensemble", "--out", "exports/r18-ensemble"],
                 ["export", "runs/study-r18", "--out", "r18.safetensors", "--scale-branches"]):
        result = cli(*argv)
        assert result.returncode == 0, (argv, result.stderr[-3000:])
    assert json.loads(Path("runs/study-r18-report/models.json").read_text())["matches_run"]
    assert isinstance(load_subnetwork("exports/r18-w0"), torch.nn.Module)
