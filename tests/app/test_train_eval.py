"""What `subnetdp train` evaluates and records: the assembled / subnetwork / ensemble views (real
ranks equal the simulator), the scaled and unscaled assembled model, measured training FLOPs, the
stochastic-depth baseline, and the final checkpoint written before the final evaluation."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from subnetdp import SubnetworkSimulator
from subnetdp.app.baselines import StochasticDepth
from subnetdp.app.config import ConfigError, load_config
from subnetdp.app.train import loop as train_module
from subnetdp.app.train.evaluation import branch_scale
from subnetdp.models import resnet18

from _runs import SYNTHETIC, _config, _train, cli

VIEWS = SYNTHETIC.replace("[eval]", '[eval]\nviews = ["subnetworks", "ensemble"]\nresidual_scale = "both"').replace(
    "steps = 12", "steps = 6").replace("checkpoint_interval = 4", "checkpoint_interval = 0").replace(
    "eval_interval = 6", "eval_interval = 0")


def _final(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_views_on_real_ranks_equal_the_simulator(tmp_path: Path) -> None:
    """Every view, on the same examples: eval.max_batches caps the split before it is sharded over
    ranks, and the norm re-estimation split over 2 ranks equals one process's. Sharded (ZeRO-2
    inside holder sets), the real ranks also log the simulator's losses."""
    config = _config(tmp_path, VIEWS)
    capped = ["--set", "eval.max_batches=3", "--set", "eval.batch_size=16",  # 48 of the 128 test images
              "--set", "strategy.shard=true"]
    _train(config, tmp_path / "real", "--workers", "2", *capped)
    _train(config, tmp_path / "sim", "--workers", "2", "--simulate", *capped)
    losses = [[json.loads(x).get("loss") for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("real", "sim")]
    assert len([x for x in losses[0] if x is not None]) == 6
    assert [x for x in losses[1] if x] == pytest.approx([x for x in losses[0] if x], rel=1e-4)
    real, sim = _final(tmp_path / "real")["final_eval"], _final(tmp_path / "sim")["final_eval"]
    keys = {"accuracy", "test_loss", "scaled_accuracy", "scaled_test_loss_recalibrated", "subnet_accuracy_mean",
            "subnet_accuracy_min", "subnet_accuracy_max", "ensemble_accuracy", "ensemble_test_loss"}
    assert keys <= set(real)
    for key in keys:
        assert real[key] == pytest.approx(sim[key], abs=1e-4), key
    assert real["subnet_accuracy_min"] <= real["subnet_accuracy_mean"] <= real["subnet_accuracy_max"]
    # each worker's own subnetwork, gathered from the ranks in rank order
    by_worker = [_final(tmp_path / run)["final_subnet_by_worker"] for run in ("real", "sim")]
    assert len(by_worker[0]) == 2
    for mine, theirs in zip(*by_worker):
        assert mine == pytest.approx(theirs, abs=1e-4)
    # `subnetdp export --subnetwork R` of the real ranks' (sharded) checkpoint evaluates to rank R's figures
    from subnetdp import load_subnetwork
    from subnetdp.app.builders import build_task
    from subnetdp.app.config import load_config
    task = build_task(load_config(config, ["eval.max_batches=3", "eval.batch_size=16"]))
    for rank in range(2):
        out = tmp_path / f"w{rank}"
        assert cli("export", str(tmp_path / "real"), "--subnetwork", str(rank), "--out", str(out)).returncode == 0
        model, totals = load_subnetwork(out), torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for x, y in task.eval_batches(16, 0, 1, 3):
                totals += torch.tensor(task.eval_sums(model(x), y), dtype=torch.float64)
        assert task.eval_metrics(*totals.tolist()) == pytest.approx(by_worker[0][rank], abs=1e-6)
    flops = _final(tmp_path / "sim")["inference_flops_per_sample"]
    # two workers, C = 0.5: each subnetwork runs part of the blocks; the ensemble runs both
    assert flops["subnetwork"] < flops["assembled"] < flops["ensemble"] == pytest.approx(2 * flops["subnetwork"])


@pytest.mark.slow
def test_ddp_has_no_subnetwork_views_and_flop_matching_is_measured(tmp_path: Path) -> None:
    config = _config(tmp_path, VIEWS)
    _train(config, tmp_path / "ddp", "--workers", "4", "--simulate", "--set", "strategy.name=ddp")
    _train(config, tmp_path / "sdp", "--workers", "4", "--simulate", "--set", "run.schedule=flops")
    ddp, sdp = _final(tmp_path / "ddp"), _final(tmp_path / "sdp")
    assert not any(k.startswith(("subnet_", "ensemble_", "scaled_")) for k in ddp["final_eval"])
    assert sdp["steps"] == 2 * ddp["steps"]
    # a B-SDP step at C = 0.5 costs more than half of DDP's (stem and head stay whole), less than all
    ratio = sdp["train_flops_per_step"] / ddp["train_flops_per_step"]
    assert 0.5 < ratio < 0.9
    assert sdp["train_flops"] == pytest.approx(sdp["train_flops_per_step"] * sdp["steps"])
    assert 1.0 < sdp["train_flops"] / ddp["train_flops"] < 1.8


def test_each_workers_subnetwork_is_recorded_with_the_figures_summarised_from_it(tmp_path: Path) -> None:
    """The final evaluation's subnetwork of each worker, in rank order: in summary.json
    (final_subnet_by_worker, next to final_eval, which stays floats) and in metrics.jsonl's
    evaluation records; subnet_<metric>_mean/min/max are exactly their mean, min and max. A run
    resumed before its end records its own final evaluation's."""
    out = tmp_path / "run"
    sets = ["--workers", "3", "--simulate", "--set", "eval.max_batches=2", "--set", "eval.recalibrate_norm_batches=0",
            "--set", "eval.residual_scale=none", "--set", "run.eval_interval=3", "--set", "run.checkpoint_interval=3"]
    _train(_config(tmp_path, VIEWS), out, *sets)
    summary = _final(out)
    by_worker, final = summary["final_subnet_by_worker"], summary["final_eval"]
    assert len(by_worker) == 3 and all(set(w) == {"accuracy", "test_loss"} for w in by_worker)
    assert all(isinstance(v, float) for k, v in final.items() if k != "step")
    for key in ("accuracy", "test_loss"):
        values = [w[key] for w in by_worker]
        assert final[f"subnet_{key}_mean"] == statistics.fmean(values)
        assert final[f"subnet_{key}_min"] == min(values) and final[f"subnet_{key}_max"] == max(values)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [r["step"] for r in records] == [3, 6] and all(len(r["subnet_by_worker"]) == 3 for r in records)
    assert records[-1]["subnet_by_worker"] == by_worker and {"step": 6, **records[-1]["eval"]} == final

    shutil.rmtree(out / "checkpoints" / "step-00000006")
    (out / "summary.json").unlink()
    _train(_config(tmp_path, VIEWS), out, *sets, "--resume")
    resumed = _final(out)
    assert resumed["resumed_from"] == 3 and resumed["final_subnet_by_worker"] == by_worker


def test_ensemble_is_the_mean_of_probabilities() -> None:
    logits = [torch.randn(5, 7) * 10 for _ in range(3)]
    expected = torch.stack([torch.softmax(x, -1) for x in logits]).mean(0).log()
    mixed = SubnetworkSimulator.ensemble_log_probs(logits)
    assert torch.allclose(mixed, expected, atol=1e-5)
    # its softmax is the mean probability, so cross-entropy on it is the ensemble's log loss
    assert torch.allclose(torch.log_softmax(mixed, -1), expected, atol=1e-5)
    single = SubnetworkSimulator.ensemble_log_probs(logits[:1])
    assert torch.allclose(single, torch.log_softmax(logits[0], -1), atol=1e-6)


def test_final_checkpoint_survives_a_failing_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class EvaluationFailed(RuntimeError):
        """This test's own: what propagates is the evaluation's error itself, not another one."""

    def broken(*args: object, **kwargs: object) -> None:
        raise EvaluationFailed("evaluation failed")

    monkeypatch.setattr(train_module, "evaluate", broken)
    config = load_config(_config(tmp_path, VIEWS))
    with pytest.raises(EvaluationFailed, match="^evaluation failed$"):
        train_module.run_training(config, tmp_path / "run", simulate=2, progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step-00000006" / "manifest.json").is_file()


def test_stochastic_depth_keeps_keys_and_drops_blocks_per_worker_and_step() -> None:
    torch.manual_seed(0)
    model = resnet18(num_classes=3, in_channels=1, width=4)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    paths = [f"blocks.{i}" for i in range(len(model.blocks))]
    depth = StochasticDepth(model, paths, drop=0.5, seed=0)
    assert model.state_dict().keys() == reference.keys()
    depth.draw(step=3, rank=1)
    first = list(depth.dropped_now)
    depth.draw(step=3, rank=1)
    assert depth.dropped_now == first  # a pure function of (seed, step, rank)
    draws = []
    for step in range(50):
        depth.draw(step, 0)
        draws += depth.dropped_now
    assert 0.35 < sum(draws) / len(draws) < 0.65

    x = torch.randn(2, 1, 16, 16)
    model.train()
    depth.dropped_now = [True] * len(paths)
    out = model(x)
    out.sum().backward()
    branch = model.blocks[0].conv1.weight  # a dropped block's branch gets a zero gradient
    assert branch.grad is not None and torch.count_nonzero(branch.grad) == 0
    model.eval()  # evaluation always runs every block
    plain = resnet18(num_classes=3, in_channels=1, width=4)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    assert torch.allclose(model(x), plain(x))


def test_stochastic_depth_is_a_ddp_baseline_and_views_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs name = 'ddp'"):
        load_config(None, ["strategy.stochastic_depth=0.5"])
    with pytest.raises(ConfigError, match="valid views are subnetworks, ensemble"):
        load_config(None, ['eval.views=["assembled"]'])
    out = tmp_path / "sd"
    _train(_config(tmp_path, VIEWS), out, "--workers", "2", "--simulate", "--set", "strategy.name=ddp",
           "--set", "strategy.stochastic_depth=0.5")
    final = _final(out)["final_eval"]
    assert math.isfinite(final["accuracy"]) and "scaled_accuracy" in final  # branches x survival 0.5


def test_stochastic_depth_rejects_dropping_every_block_always() -> None:
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        StochasticDepth(nn.Sequential(), [], drop=1.0)


@pytest.mark.slow
def test_full_phase_ends_sdp_with_the_full_model_and_resumes_exactly_across_the_switch(tmp_path: Path) -> None:
    text = VIEWS.replace("steps = 6", "steps = 8")
    text = text.replace("checkpoint_interval = 0", "checkpoint_interval = 3\nkeep_checkpoints = 5")
    sets = ["--workers", "2", "--simulate", "--set", "strategy.full_phase=0.5", "--set", "run.schedule=flops"]
    reference = tmp_path / "reference"
    _train(_config(tmp_path, text), reference, *sets)
    summary = _final(reference)
    # FLOP schedule: (1 - 0.5) x 8 / C = 8 SDP steps, then 0.5 x 8 = 4 full-model steps
    assert summary["steps"] == 12 and summary["full_phase"]["from_step"] == 8
    full = summary["full_phase"]["flops_per_step"]
    assert full > summary["train_flops_per_step"] > 0
    assert summary["train_flops"] == pytest.approx(8 * summary["train_flops_per_step"] + 4 * full)
    # per worker, the SDP phase held less than the full model (simulated figures sum the 2 workers)
    assert summary["full_phase"]["sdp_phase_per_rank"][0]["trainable_param_bytes"] / 2 < \
        summary["per_rank"][0]["trainable_param_bytes"]
    assert not any(k.startswith("subnet_") for k in summary["final_eval"])  # one full model at the end
    # activation checkpointing in the full phase recomputes the same values: the same training losses
    recomputed = tmp_path / "recomputed"
    _train(_config(tmp_path, text), recomputed, *sets, "--set", "strategy.full_phase_checkpointing=true")
    losses = [json.loads(x).get("loss") for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [json.loads(x).get("loss") for x in (recomputed / "metrics.jsonl").read_text().splitlines()] == losses

    for resume_from in (9, 6):  # inside the full phase, and before the switch
        out = tmp_path / f"from-{resume_from}"
        _train(_config(tmp_path, text), out, *sets)
        for folder in (out / "checkpoints").iterdir():
            if int(folder.name.split("-")[1]) > resume_from:
                shutil.rmtree(folder)
        (out / "summary.json").unlink()
        _train(_config(tmp_path, text), out, *sets, "--resume")
        assert _final(out)["resumed_from"] == resume_from
        assert (out / "metrics.jsonl").read_text().count('"loss"') == 12
        mine = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        theirs = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
        assert [x.get("loss") for x in mine] == [x.get("loss") for x in theirs]
        assert mine[-1]["eval"] == theirs[-1]["eval"]


def test_branches_are_scaled_only_where_they_were_trained_in_part_of_the_forward_passes() -> None:
    class Plan:
        k, world_size = 1, 4

    def scale(*sets: str) -> float | None:
        return branch_scale(load_config(None, list(sets)), Plan())

    assert scale() == 0.25  # block level, forward masking, unscaled at train time: k / N
    assert scale("strategy.masking=backward") is None  # the full model ran every forward pass
    assert scale("strategy.level=neuron") is None
    assert scale("strategy.scale=inverse-coverage") is None
    with pytest.raises(ConfigError, match="masking = 'forward'"):
        scale("strategy.masking=backward", "eval.residual_scale=coverage")
    assert branch_scale(load_config(None, ["strategy.name=ddp", "strategy.stochastic_depth=0.2"]),
                                      None) == pytest.approx(0.8)


def test_a_full_phase_run_keeps_its_switch_on_resume(tmp_path: Path) -> None:
    """SDP steps 1-6, then the full model steps 7-8: a resume may not move that switch (a changed
    run.steps is refused in one line, the folder untouched), a complete run is not offered a longer
    run.steps, and the summary reports the step the full phase really began at."""
    config = _config(tmp_path, VIEWS.replace("steps = 6", "steps = 8").replace('views = ["subnetworks", "ensemble"]\n',
                                                                                ""))
    out = tmp_path / "run"
    sets = ["--workers", "2", "--simulate", "--set", "strategy.full_phase=0.25"]
    _train(config, out, *sets)
    assert _final(out)["full_phase"]["from_step"] == 6 and _final(out)["steps"] == 8
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    refused = _train(config, out, *sets, "--resume", "--set", "run.steps=16", check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: --resume: this run ends with a full-model phase (strategy.full_phase = "
                                     "0.25): SDP trains steps 1-6 and the full model steps 7-8; run.steps 8 -> 16 "
                                     "would move that switch")
    complete = _train(config, out, *sets, "--resume")
    assert "cannot be extended" in complete.stdout and "--set run.steps" not in complete.stdout
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_evaluation_shows_progress_and_reports_its_time(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from subnetdp.app.cli import main
    config = _config(tmp_path, VIEWS)
    assert main(["train", str(config), "--workers", "2", "--simulate", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "evaluation at step 6" in err and "BN re-estimation" in err and "subnetworks" in err
    times = _final(tmp_path / "run")["time_s"]
    assert len(times["evals"]) == 1 and 0 < times["evals"][0] == times["eval"] and times["train_steps"] > 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["eval_s"] == times["evals"][0] and "accuracy" in record["eval"]
    assert record["eval_examples"] == 128  # the whole synthetic test set


def test_periodic_evaluations_can_be_capped_below_the_final_one(tmp_path: Path) -> None:
    config = _config(tmp_path, VIEWS.replace("eval_interval = 0", "eval_interval = 2"))
    _train(config, tmp_path / "run", "--workers", "2", "--simulate", "--set", "eval.batch_size=16",
           "--set", "eval.periodic_max_batches=1", "--set", "eval.max_batches=4")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval_examples"]) for r in records if "eval" in r] == [(2, 16), (4, 16), (6, 64)]
    assert len(_final(tmp_path / "run")["time_s"]["evals"]) == 3
