"""Mixed fleets in `subnetdp train`: per-worker coverage (`strategy.coverage` as a list) and
per-worker memory budgets (`strategy.memory_budget`): config errors, runs on 4 simulated workers
whose plan and measured peaks follow them, exact resume, and re-drawn plans refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from subnetdp.app.config import (
    ConfigError,
    check_workers,
    config_warnings,
    load_config,
    mean_coverage,
    parse_size,
    phase_steps,
)
from subnetdp.engine import SDPConfigError, SubnetworkSimulator, scale_residual_branches
from subnetdp.engine.plan import parse_size as engine_parse_size
from subnetdp.engine.redraw import replan
from subnetdp.models import resnet18

from _models import ResidualMLP
from _runs import SYNTHETIC, _config, _train, cli

MIXED = "strategy.coverage=[1.0,1.0,0.5,0.5]"
BUDGETS = 'strategy.memory_budget=["3MiB","3MiB","1.75MiB","1.75MiB"]'


def _load(tmp_path: Path, *sets: str):
    return load_config(_config(tmp_path), list(sets))


def _error(tmp_path: Path, *sets: str, workers: int | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config = _load(tmp_path, *sets)
        if workers is not None:
            check_workers(config, workers)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_coverage_takes_one_value_per_worker_and_the_schedules_use_its_mean(tmp_path: Path) -> None:
    config = _load(tmp_path, "strategy.coverage=[0.75, 0.75, 0.25, 0.25]", 'run.schedule="flops"')
    assert config["strategy.coverage"] == [0.75, 0.75, 0.25, 0.25] and mean_coverage(config) == 0.5
    assert phase_steps(config) == (24, 0)  # 12 DDP steps / the mean coverage 0.5
    check_workers(config, 4)
    assert _load(tmp_path, "strategy.coverage=[1,1,0.5,0.5]")["strategy.coverage"] == [1.0, 1.0, 0.5, 0.5]
    # k = round(sum) = 1: the same warning as one coverage that gives a single holder
    warnings = config_warnings(_load(tmp_path, "strategy.coverage=[0.25,0.25,0.25,0.25]"), 4)
    assert any("[0.25, 0.25, 0.25, 0.25] on 4 workers gives each unit a single holder" in w for w in warnings)


@pytest.mark.parametrize("sets,workers,message", [
    ((MIXED,), 2, "--set strategy.coverage=[1.0,1.0,0.5,0.5]: [strategy] coverage has 4 values for 2 workers: "
                  "give one number, or one per worker (rank order)"),
    (("strategy.coverage=[]",), None, "coverage = []: expected a number like 0.5, or a list of one number per worker"),
    (("strategy.coverage=[1.5,0.5]",), None, "coverage must be in (0, 1] for every worker"),
    (("strategy.coverage=[true,0.5]",), None, "expected a number like 0.5, or a list"),
    ((MIXED, 'strategy.name="ddp"'), None, "coverage as a list (one per worker) sets SDP's plan: it needs name = "
                                           "'sdp'"),
    ((MIXED, "strategy.redraw_every=2"), None, "redraw_every draws uniform plans: it cannot keep a per-worker "
                                              "coverage list"),
    ((BUDGETS, "strategy.redraw_every=2"), None, "redraw_every draws uniform plans: it cannot keep memory_budget"),
    ((BUDGETS, MIXED), None, "memory_budget takes one coverage (it sets k, the holders per unit), not one per worker"),
    ((BUDGETS, 'strategy.level="neuron"'), None, "memory_budget needs level = 'block'"),
    ((BUDGETS, 'strategy.name="ddp"'), None, "memory_budget sets SDP's plan: it needs name = 'sdp'"),
    (('strategy.memory_budget=["2GiB","2 parsecs"]',), None, "memory_budget: '2 parsecs' is not a size"),
    (("strategy.memory_budget=[0]",), None, "memory_budget: a size must be a positive number of bytes"),
    (("strategy.memory_budget=\"2GiB\"",), None, "memory_budget = '2GiB': expected a list"),
    ((BUDGETS,), 2, "--set " + BUDGETS + ": [strategy] memory_budget has 4 sizes for 2 workers: give one per worker"),
])
def test_impossible_mixed_fleets_are_one_line_errors_naming_the_key(tmp_path: Path, sets: tuple[str, ...],
                                                                      workers: int | None, message: str) -> None:
    assert message in _error(tmp_path, *sets, workers=workers)


def test_the_config_reads_sizes_as_the_engine_does() -> None:
    for value in ("2GiB", "512 MiB", "1.5GB", "1e6", 4096, " 3kib "):
        assert parse_size(value) == engine_parse_size(value), value
    for value in ("2 GiBs", "-1MiB", "", True):
        with pytest.raises(ValueError):
            parse_size(value)


def test_the_launcher_refuses_a_coverage_list_of_the_wrong_length(tmp_path: Path) -> None:
    result = cli("train", str(_config(tmp_path)), "--workers", "3", "--simulate", "--out", str(tmp_path / "r"),
                 "--set", MIXED)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --set strategy.coverage=[1.0,1.0,0.5,0.5]: [strategy] coverage has 4 "
                                     "values for 3 workers: give one number, or one per worker (rank order)")


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


CONSTANT = SYNTHETIC.replace("steps = 12", "steps = 4").replace("checkpoint_interval = 4", "checkpoint_interval = 2") \
    .replace("eval_interval = 6", "eval_interval = 0").replace("lr = 0.05", "lr = 0.05\nlr_schedule = \"constant\"")


@pytest.mark.slow
def test_per_worker_coverage_trains_and_resumes_exactly(tmp_path: Path) -> None:
    """4 simulated workers at coverage [1, 1, 0.5, 0.5]: the two large workers hold every block, the
    small ones about half each (k = 3); summary.json records the list and its mean; a run stopped
    at step 2 and resumed (keeping the run's list) logs the losses of the run that never stopped."""
    config = _config(tmp_path, CONSTANT)
    sets = ["--workers", "4", "--simulate", "--set", MIXED]
    _train(config, tmp_path / "whole", *sets)
    _train(config, tmp_path / "stopped", *sets, "--set", "run.steps=2")
    _train(None, tmp_path / "stopped", "--workers", "4", "--simulate", "--set", "run.steps=4", "--resume")
    whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "stopped")
    assert sorted(whole) == sorted(resumed) == [1, 2, 3, 4]
    assert resumed[3] == whole[3] and resumed[4] == whole[4], (resumed, whole)

    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["config"]["strategy"]["coverage"] == [1.0, 1.0, 0.5, 0.5]  # the run's, kept on resume
    assert summary["strategy"] == "B-SDP fwd C=[1, 1, 0.5, 0.5]"
    coverage = summary["coverage"]
    assert coverage["mean"] == 0.75 and coverage["per_worker"] == [1.0, 1.0, 0.5, 0.5]
    assert coverage["holders_per_unit"] == 3
    held = coverage["held_unit_params_fraction"]
    assert held[0] == held[1] == 1.0 and all(0.3 < f < 0.7 for f in held[2:]), held
    plan = summary["plan"]
    assert plan["worker_coverage"] == [1.0, 1.0, 0.5, 0.5] and all(len(r) == 3 for r in plan["holders"].values())
    peaks = summary["peak_memory_per_worker"]["by_worker"]["sdp_phase"]
    assert peaks["2"] < peaks["0"] and peaks["3"] < peaks["1"], peaks
    # export folds k/N = 3/4 into the branches (k from the list's sum): the run's scaled_* model
    for name, extra in (("plain", []), ("scaled", ["--scale-branches"])):
        exported = cli("export", str(tmp_path / "stopped"), "--out", str(tmp_path / f"{name}.safetensors"), *extra)
        assert exported.returncode == 0, exported.stderr[-2000:]
    plain, scaled = (resnet18(num_classes=10, in_channels=1, width=4).eval() for _ in range(2))
    plain.load_state_dict(load_file(str(tmp_path / "plain.safetensors")))
    scaled.load_state_dict(load_file(str(tmp_path / "scaled.safetensors")))
    scale_residual_branches(plain, "blocks", 3 / 4)
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(scaled(x), plain(x))


@pytest.mark.slow
def test_memory_budgets_bound_each_workers_measured_peak(tmp_path: Path) -> None:
    """strategy.memory_budget on 4 simulated workers: the planner counts activations on a training
    batch (data.batch_size), and each worker's measured peak of live tensors stays within 1.05x its
    budget; the two small budgets get fewer blocks. Resumed on the same workers, the run keeps them."""
    config = _config(tmp_path, CONSTANT)
    sets = ["--workers", "4", "--simulate", "--set", BUDGETS]
    _train(config, tmp_path / "r", *sets, "--set", "run.steps=2")
    _train(None, tmp_path / "r", "--workers", "4", "--simulate", "--set", "run.steps=4", "--resume")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    budget = summary["memory_budget"]
    sizes = [3 * 2**20, 3 * 2**20, int(1.75 * 2**20), int(1.75 * 2**20)]
    assert budget["per_worker"] == sizes and budget["example_batch"] == 8
    assert budget["memory_model"]["optimizer_states_per_param"] == 1.0  # SGD with momentum
    assert all(p <= b for p, b in zip(budget["predicted_peak"], sizes)), budget
    peaks = summary["peak_memory_per_worker"]["by_worker"]["sdp_phase"]
    for rank, size in enumerate(sizes):
        assert peaks[str(rank)] <= 1.05 * size, (rank, peaks, sizes)
    held = summary["coverage"]["held_unit_params_fraction"]
    assert max(held[2:]) < min(held[:2]), held
    assert summary["config"]["strategy"]["memory_budget"] == ["3MiB", "3MiB", "1.75MiB", "1.75MiB"]
    assert summary["resumed_from"] == 2 and summary["plan"]["worker_budget"] == sizes


def test_budgets_that_cannot_hold_the_model_stop_the_run_naming_the_shortfall(tmp_path: Path) -> None:
    result = _train(_config(tmp_path, CONSTANT), tmp_path / "r", "--workers", "4", "--simulate",
                    "--set", 'strategy.memory_budget=["3MiB","3MiB","100KiB","3MiB"]', check=False)
    assert result.returncode != 0
    assert re.search(r"worker 2's budget of 100 KiB cannot hold the shared weights.*short by", result.stderr)


def test_a_heterogeneous_plan_is_never_redrawn() -> None:
    """A re-draw would make a uniform plan of the same mean coverage, silently dropping the
    workers' coverages: the engine refuses it before anything moves."""
    sim = SubnetworkSimulator(ResidualMLP(depth=6), 4, blocks="blocks", coverage=[1.0, 1.0, 0.5, 0.5])
    assert sim.plan.heterogeneous
    optimizers = [torch.optim.SGD(w.parameters(), lr=0.1) for w in sim.workers]
    before = sim.plan.fingerprint()
    with pytest.raises(SDPConfigError, match="redraw\\(\\) draws uniform plans: this plan has per-rank coverage"):
        sim.redraw(1, optimizers)
    assert sim.plan.fingerprint() == before
    with pytest.raises(SDPConfigError, match="heterogeneous"):
        replan(sim.plan, 1)
