"""What `subnetdp train` evaluates: the assembled full model (as configured, scaled and unscaled,
and after re-estimating norm statistics), each worker's own subnetwork and their ensemble, and the
forward FLOPs of each of those views.

Every function takes the run's :class:`~subnetdp.app.train.Trainer`; the test/validation split is
sharded over real ranks (a simulation evaluates all of it in its one process).
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..engine import Plan, recalibrate_norm_statistics, scale_residual_branches
from .builders import Task
from .config import Config, ConfigError
from .runtime import autocast

if TYPE_CHECKING:  # train.py imports this module; the Trainer is only named here for type hints
    from .train import Trainer


def branch_scale(config: Config, plan: Plan | None) -> float | None:
    """The factor of each residual branch in the evaluated model: k/N for B-SDP trained unscaled,
    the survival probability for stochastic depth, None when nothing is scaled."""
    if plan is not None:
        s = config.section("strategy")
        if s["level"] != "block" or s["scale"] != "none" or s["masking"] != "forward":
            if config["eval.residual_scale"] == "coverage":
                raise ConfigError("[eval] residual_scale = 'coverage' needs [strategy] level = 'block', masking = "
                                  "'forward' and scale = 'none' (the branches were trained unscaled in part of "
                                  "the workers' forward passes)")
            return None
        return plan.k / plan.world_size
    drop = config["strategy.stochastic_depth"]
    return 1 - drop if drop else None


def make_eval_models(config: Config, task: Task, plan: Plan | None, device: torch.device) -> dict[str, nn.Module]:
    """The plain models the assembled weights are loaded into, by metric prefix: "" is the model
    evaluated under the configured residual_scale; with residual_scale = "both" it is unscaled and
    "scaled_" is the one with branches scaled (k/N, or the survival probability)."""
    mode = config["eval.residual_scale"]
    factor = branch_scale(config, plan) if mode != "none" else None
    models = {"": task.make_model().to(device)}
    if factor is not None:
        scaled = scale_residual_branches(task.make_model().to(device), task.blocks, factor)
        if mode == "coverage":
            models[""] = scaled
        else:
            models["scaled_"] = scaled
    return models


def evaluate(tr: Trainer, eval_models: dict[str, nn.Module]) -> dict[str, float]:
    """Assemble the full model, evaluate it on the test/validation split (sharded over ranks), and
    again after re-estimating norm statistics when [eval] recalibrate_norm_batches > 0; then the
    subnetwork and ensemble views when [eval] views asks for them."""
    state = tr.par.full_state_dict()
    batches = tr.config["eval.recalibrate_norm_batches"]
    metrics: dict[str, float] = {}
    for prefix, eval_model in eval_models.items():
        eval_model.load_state_dict(state, strict=True)
        metrics.update({prefix + k: v for k, v in evaluate_model(tr, eval_model).items()})
        has_norm_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in eval_model.modules())
        if batches and has_norm_stats:
            data, size, seed = tr.task.data, tr.config["data.batch_size"], tr.config["run.seed"]
            # the same training batches on every rank, so every rank ends with the same statistics
            calibration = (x.to(tr.ctx.device) for x in data.calibration_batches(batches, size, seed))
            recalibrate_norm_statistics(eval_model, calibration)
            metrics.update({f"{prefix}{k}_recalibrated": v for k, v in evaluate_model(tr, eval_model).items()})
    views = tr.config["eval.views"]
    if views and tr.par.is_sdp:
        metrics.update(evaluate_subnetworks(tr, views))
    return metrics


@torch.no_grad()
def evaluate_model(tr: Trainer, model: nn.Module) -> dict[str, float]:
    """One plain model on this process's shard of the split, reduced over all ranks."""
    cfg, task, ctx = tr.config, tr.task, tr.ctx
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count (samples or tokens)
    for x, y in task.eval_batches(cfg["eval.batch_size"], ctx.rank, ctx.processes, cfg["eval.max_batches"] or None):
        x, y = x.to(ctx.device), y.to(ctx.device)
        with autocast(cfg["run.autocast"], ctx.device):
            out = model(x)
        totals += torch.tensor(task.eval_sums(out.float(), y), dtype=torch.float64)
    return task.eval_metrics(*ctx.all_reduce_sum(totals).tolist())


@torch.no_grad()
def evaluate_subnetworks(tr: Trainer, views: list[str]) -> dict[str, float]:
    """Each worker's own subnetwork (as trained, its own norm statistics) and the ensemble of the
    N subnetworks (mean of their probabilities), on the whole test/validation split: every worker
    evaluates every batch. Keys: subnet_<metric>_{mean,min,max} and ensemble_<metric>."""
    cfg, task, ctx = tr.config, tr.task, tr.ctx
    workers = tr.par.models  # one SDP module per local (virtual) worker
    sums = torch.zeros(len(workers) + 1, 3, dtype=torch.float64)  # per worker, then the ensemble
    for m in workers:
        m.eval()
    try:
        for x, y in task.eval_batches(cfg["eval.batch_size"], 0, 1, cfg["eval.max_batches"] or None):
            x, y = x.to(ctx.device), y.to(ctx.device)
            with autocast(cfg["run.autocast"], ctx.device):
                outs = [m(x).float() for m in workers]
            for i, out in enumerate(outs):
                sums[i] += torch.tensor(task.eval_sums(out, y), dtype=torch.float64)
            if "ensemble" in views:
                mixed = tr.par.ensemble_log_probs(outs)
                sums[-1] += torch.tensor(task.eval_sums(mixed, y), dtype=torch.float64)
    finally:
        for m in workers:
            m.train()
    per_worker = ctx.gather([task.eval_metrics(*row.tolist()) for row in sums[:-1]])
    metrics: dict[str, float] = {}
    if "subnetworks" in views:
        for key in per_worker[0]:
            values = [w[key] for w in per_worker]
            metrics.update({f"subnet_{key}_mean": statistics.fmean(values), f"subnet_{key}_min": min(values),
                            f"subnet_{key}_max": max(values)})
    if "ensemble" in views:
        metrics.update({f"ensemble_{k}": v for k, v in task.eval_metrics(*sums[-1].tolist()).items()})
    return metrics


def inference_flops(tr: Trainer, eval_model: nn.Module) -> dict[str, float]:
    """Forward FLOPs per sample of each evaluated view, counted on the example input: the
    assembled model, one subnetwork (mean over workers) and the ensemble (all N subnetworks)."""
    def count(model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(tr.task.example_input.to(tr.ctx.device))
        model.train(was_training)
        return float(counter.get_total_flops()) / tr.task.example_input.shape[0]

    result: dict[str, Any] = {"assembled": count(eval_model)}
    if tr.par.is_sdp:
        per_worker = tr.ctx.gather([count(m) for m in tr.par.unwrapped_models])
        result.update(subnetwork=statistics.fmean(per_worker), ensemble=float(sum(per_worker)))
    return result
