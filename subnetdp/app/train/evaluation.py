"""What `subnetdp train` evaluates: the assembled full model (as configured, scaled and unscaled,
and after re-estimating norm statistics), each worker's own subnetwork and their ensemble, and the
forward FLOPs of each of those views.

Every function takes the run's :class:`~subnetdp.app.train.workers.LocalWorkers`; the test/validation split is
sharded over real ranks (a simulation evaluates all of it in its one process), and so is the
re-estimation of norm statistics: each piece of work is done once, whatever the number of ranks.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ...engine import Plan, recalibrate_norm_statistics, scale_residual_branches
from ..builders import Task
from ..config import Config, ConfigError
from ..runtime import autocast

if TYPE_CHECKING:
    from .workers import LocalWorkers


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


def eval_cap(config: Config, final: bool = True) -> int | None:
    """Batches of the split an evaluation covers: [eval] max_batches, or periodic_max_batches for
    the evaluations during training; None: the whole split."""
    periodic = config["eval.periodic_max_batches"]
    return (config["eval.max_batches"] if final or not periodic else periodic) or None


def evaluate(tr: LocalWorkers, eval_models: dict[str, nn.Module], progress: bool = False,
             desc: str = "evaluation", final: bool = True, per_worker: list[dict[str, float]] | None = None
             ) -> dict[str, float]:
    """Assemble the full model, evaluate it on the test/validation split (sharded over ranks), and
    again after re-estimating norm statistics when [eval] recalibrate_norm_batches > 0; then the
    subnetwork and ensemble views when [eval] views asks for them. ``progress``: a progress bar
    on rank 0 over every batch of this evaluation; ``final``: the run's last evaluation (else one
    during training, capped by [eval] periodic_max_batches). ``per_worker``: a list that receives
    each worker's own subnetwork metrics in rank order when the subnetworks are evaluated (the
    returned dict stays flat floats: only their mean, min and max are in it)."""
    state = tr.par.full_state_dict()
    cap = eval_cap(tr.config, final)
    plan = _EvaluationPlan(tr, eval_models, cap)
    metrics: dict[str, float] = {}
    with tqdm(total=plan.batches, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
              disable=not (progress and tr.ctx.is_main)) as bar:
        for prefix, eval_model in eval_models.items():
            eval_model.load_state_dict(state, strict=True)
            bar.set_postfix_str(prefix.rstrip("_") or "assembled")
            metrics.update({prefix + k: v for k, v in evaluate_model(tr, eval_model, bar, cap).items()})
            if plan.recalibrates(eval_model):
                bar.set_postfix_str(f"{prefix}BN re-estimation")
                recalibrate_shared(tr, eval_model, bar)
                recalibrated = evaluate_model(tr, eval_model, bar, cap)
                metrics.update({f"{prefix}{k}_recalibrated": v for k, v in recalibrated.items()})
        if plan.views:
            bar.set_postfix_str("subnetworks")
            metrics.update(evaluate_subnetworks(tr, plan.views, bar, cap, per_worker))
    return metrics


def _has_norm_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class _EvaluationPlan:
    """What one evaluation does on this rank, and how many batches that is (for the progress bar)."""

    def __init__(self, tr: LocalWorkers, eval_models: dict[str, nn.Module], cap: int | None) -> None:
        cfg, ctx = tr.config, tr.ctx
        self.calibration = cfg["eval.recalibrate_norm_batches"]
        # the full phase (even sharded over the workers) has one full model: no subnetworks
        self.views = cfg["eval.views"] if tr.par.is_sdp and not tr.full_phase else []
        size = cfg["eval.batch_size"]
        shard = tr.task.eval_batch_count(size, ctx.rank, ctx.processes, cap)
        mine = len(range(ctx.rank, self.calibration, ctx.processes))
        self.batches = sum(shard + (mine + shard if self.recalibrates(m) else 0) for m in eval_models.values())
        if self.views:
            self.batches += tr.task.eval_batch_count(size, 0, 1, cap)

    def recalibrates(self, model: nn.Module) -> bool:
        return self.calibration > 0 and _has_norm_statistics(model)


def recalibrate_shared(tr: LocalWorkers, model: nn.Module, bar: tqdm | None = None) -> None:
    """Re-estimate ``model``'s BatchNorm statistics on [eval] recalibrate_norm_batches training
    batches, split over the ranks (each runs its share, then the per-rank averages are combined,
    weighted by their batch counts, in one all-reduce): every rank ends with the statistics that
    one process running every batch computes, for 1/P of the work."""
    cfg, ctx = tr.config, tr.ctx
    batches = tr.task.data.calibration_batches(cfg["eval.recalibrate_norm_batches"], cfg["data.batch_size"],
                                               cfg["run.seed"], ctx.rank, ctx.processes)

    def counted() -> Iterator[torch.Tensor]:
        for x in batches:
            yield x.to(ctx.device)
            if bar is not None:
                bar.update(1)

    used = recalibrate_norm_statistics(model, counted())
    if ctx.processes == 1:
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    stats = [t for m in norms for t in (m.running_mean, m.running_var)]
    flat = torch.cat([t.detach().double().flatten().cpu() * used for t in stats] + [torch.tensor([float(used)])])
    flat = ctx.all_reduce_sum(flat)
    total, offset = flat[-1].item(), 0
    for t in stats:
        t.copy_((flat[offset: offset + t.numel()] / total).view_as(t))
        offset += t.numel()
    for m in norms:
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(int(total))


@torch.no_grad()
def evaluate_model(tr: LocalWorkers, model: nn.Module, bar: tqdm | None = None, cap: int | None = None
                   ) -> dict[str, float]:
    """One plain model on this process's shard of the split (its first ``cap`` batches), reduced
    over all ranks."""
    cfg, task, ctx = tr.config, tr.task, tr.ctx
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count (samples or tokens)
    for x, y in task.eval_batches(cfg["eval.batch_size"], ctx.rank, ctx.processes, cap):
        x, y = x.to(ctx.device), y.to(ctx.device)
        with autocast(cfg["run.autocast"], ctx.device):
            out = model(x)
        totals += torch.tensor(task.eval_sums(out.float(), y), dtype=torch.float64)
        if bar is not None:
            bar.update(1)
    return task.eval_metrics(*ctx.all_reduce_sum(totals).tolist())


@torch.no_grad()
def evaluate_subnetworks(tr: LocalWorkers, views: list[str], bar: tqdm | None = None, cap: int | None = None,
                         per_worker: list[dict[str, float]] | None = None) -> dict[str, float]:
    """Each worker's own subnetwork (as trained, its own norm statistics) and the ensemble of the
    N subnetworks (mean of their probabilities), on the whole test/validation split: every worker
    evaluates every batch. Keys: subnet_<metric>_{mean,min,max} and ensemble_<metric>. With the
    "subnetworks" view, ``per_worker`` (when given) is extended with every worker's own metrics in
    rank order, on every rank: the values the mean, min and max are taken over."""
    cfg, task, ctx = tr.config, tr.task, tr.ctx
    workers = tr.par.models  # one SDP module per local (virtual) worker
    sums = torch.zeros(len(workers) + 1, 3, dtype=torch.float64)  # per worker, then the ensemble
    for m in workers:
        m.eval()
    try:
        for x, y in task.eval_batches(cfg["eval.batch_size"], 0, 1, cap):
            x, y = x.to(ctx.device), y.to(ctx.device)
            with autocast(cfg["run.autocast"], ctx.device):
                outs = [m(x).float() for m in workers]
            for i, out in enumerate(outs):
                sums[i] += torch.tensor(task.eval_sums(out, y), dtype=torch.float64)
            if "ensemble" in views:
                mixed = tr.par.ensemble_log_probs(outs)
                sums[-1] += torch.tensor(task.eval_sums(mixed, y), dtype=torch.float64)
            if bar is not None:
                bar.update(1)
    finally:
        for m in workers:
            m.train()
    by_worker = ctx.gather([task.eval_metrics(*row.tolist()) for row in sums[:-1]])
    metrics: dict[str, float] = {}
    if "subnetworks" in views:
        if per_worker is not None:
            per_worker.extend(by_worker)
        for key in by_worker[0]:
            values = [w[key] for w in by_worker]
            metrics.update({f"subnet_{key}_mean": statistics.fmean(values), f"subnet_{key}_min": min(values),
                            f"subnet_{key}_max": max(values)})
    if "ensemble" in views:
        metrics.update({f"ensemble_{k}": v for k, v in task.eval_metrics(*sums[-1].tolist()).items()})
    return metrics


def inference_flops(tr: LocalWorkers, eval_model: nn.Module) -> dict[str, float]:
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
    if tr.par.is_sdp and not tr.full_phase:
        per_worker = tr.ctx.gather([count(m) for m in tr.par.unwrapped_models])
        result.update(subnetwork=statistics.fmean(per_worker), ensemble=float(sum(per_worker)))
    return result
