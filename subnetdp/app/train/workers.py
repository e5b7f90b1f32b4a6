"""What one process trains (``LocalWorkers``): its models as the parallelism lays them out, one
optimizer and learning-rate schedule each, and one training step over all of them (``train_step``)."""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...engine.evaluation import fold_residual_scale
from ...engine.plan import MemoryBudget
from ...engine.units import resolve_block_paths
from ...measure import tensor_bytes
from ...measure.live import WorkerPeakTracker
from ..baselines import StochasticDepth, checkpoint_blocks
from ..builders import Task
from ..config import Config, coverage_text
from ..parallelism import Parallelism, level_kwargs, parallelize
from ..runtime import autocast
from .context import Context, DivergedError


def make_optimizer(config: Config, params: list[nn.Parameter], steps: int, first_step: int = 0
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and its schedule over ``steps``; ``first_step`` continues a schedule (the full
    phase starts where the SDP phase left it)."""
    o = config.section("optim")
    if o["name"] == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"], weight_decay=o["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                      weight_decay=o["weight_decay"])
    warmup, floor = o["warmup_steps"], o["min_lr_ratio"]

    def factor(step: int) -> float:
        step += first_step
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if o["lr_schedule"] == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if o["lr_schedule"] == "linear":
            return floor + (1 - floor) * (1 - progress)
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sdp_kwargs(config: Config, task: Task, device: torch.device) -> dict[str, Any]:
    """The engine's SDP keywords from [strategy]. With memory_budget the planner counts saved
    activations on one worker's training batch (data.batch_size examples, the first step's), not
    on the one-example input that FLOPs are otherwise counted on."""
    s = config.section("strategy")
    coverage = s["coverage"]
    return {**level_kwargs(s["level"], task.blocks), "coverage": list(coverage) if isinstance(coverage, list)
            else coverage, "masking": s["masking"],
            "seed": s["plan_seed"], "scale": s["scale"], "neuron_groups": s["neuron_groups"] or None,
            "example_input": (budget_example_input(config, task) if s["memory_budget"] else task.example_input
                              ).to(device),
            "shard": s["shard"], "shard_shared_weights": s["shard_shared_weights"],
            "memory_budget": memory_budget(config),
            "reduce_dtype": None if s["reduce_dtype"] == "none" else getattr(torch, s["reduce_dtype"])}


def budget_example_input(config: Config, task: Task) -> torch.Tensor:
    """One worker's training batch (rank 0's first, data.batch_size examples): the example input
    on which the planner counts saved activations for strategy.memory_budget."""
    return task.data.train_batch(0, 0, 1, config["data.batch_size"], config["run.seed"])[0]


def memory_budget(config: Config) -> MemoryBudget | None:
    """strategy.memory_budget as the engine's MemoryBudget, with the memory model's assumptions
    from the config: the optimizer's states per parameter (AdamW 2, SGD with momentum 1, plain SGD
    0) and the masking (backward masking keeps every unit's weights)."""
    sizes = config["strategy.memory_budget"]
    if not sizes:
        return None
    o = config.section("optim")
    states = 2.0 if o["name"] == "adamw" else 1.0 if o["momentum"] else 0.0
    return MemoryBudget(tuple(sizes), optimizer_states_per_param=states, masking=config["strategy.masking"])


def full_phase_kwargs(config: Config, task: Task, device: torch.device) -> dict[str, Any]:
    """The full phase as the engine runs it with full_phase_shard: every worker holds every block
    (coverage 1), and the gradients and optimizer state are split over all N (shard): DDP's
    updates, with 1/N of the gradient and optimizer memory per worker; with shard_shared_weights,
    1/N of the weights too (at coverage 1 every parameter is shared: FSDP's ZeRO-3)."""
    return {"blocks": task.blocks, "coverage": 1.0, "masking": "forward", "seed": 0,
            "example_input": task.example_input.to(device), "shard": True,
            "shard_shared_weights": config["strategy.shard_shared_weights"]}


def draw_seed(config: Config, draw: int) -> int:
    """The plan seed of the run's ``draw``-th plan (strategy.redraw_every): draw 0 is
    strategy.plan_seed; later ones are derived from it, run.seed and the draw, the same on every rank."""
    if draw == 0:
        return config["strategy.plan_seed"]
    digest = hashlib.sha256(f"{config['strategy.plan_seed']}/{config['run.seed']}/{draw}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def draw_of_step(config: Config, step: int) -> int:
    """Which plan trains step ``step`` (0-based): a new one every strategy.redraw_every steps."""
    every = config["strategy.redraw_every"]
    return step // every if every else 0


def strategy_label(config: Config) -> str:
    s = config.section("strategy")
    if s["name"] == "ddp":
        return "DDP"
    level = "B-SDP" if s["level"] == "block" else "N-SDP"
    masking = "fwd" if s["masking"] == "forward" else "bwd"
    budget = " budgets " + ",".join(map(str, s["memory_budget"])) if s["memory_budget"] else ""
    return f"{level} {masking} C={coverage_text(s['coverage'])}{budget}"


# ---------------------------------------------------------------------------------------------
# workers: what one process trains


@dataclass
class LocalWorkers:
    """What this process trains, as its parallelism lays it out, with one optimizer and schedule
    per local model."""

    config: Config
    task: Task
    ctx: Context
    par: Parallelism
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    stochastic_depth: StochasticDepth | None = None
    full_phase: bool = False                     # the assembled full model, trained as DDP
    peak_grad_bytes: int = 0

    def state(self) -> list[dict[str, Any]]:
        return [{"model": m.state_dict(), "optimizer": o.state_dict(), "scheduler": s.state_dict()}
                for m, o, s in zip(self.par.models, self.optimizers, self.schedulers)]

    def load_state(self, states: list[dict[str, Any]]) -> None:
        for m, o, s, state in zip(self.par.models, self.optimizers, self.schedulers, states):
            m.load_state_dict(state["model"])
            o.load_state_dict(state["optimizer"])
            s.load_state_dict(state["scheduler"])

    def apply_schedule(self) -> None:
        """Set each optimizer's learning rate from its schedule at the schedule's current step. A
        loaded optimizer carries the rate its checkpoint was taken at; a resume that changes
        run.steps changes the schedule, and its first step must already follow the new one."""
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            step = scheduler.last_epoch
            rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate
            scheduler._last_lr = rates  # what get_last_lr() reports


def build_workers(config: Config, task: Task, ctx: Context, steps: int,
                  full_phase_from: dict[str, torch.Tensor] | None = None, first_step: int = 0,
                  branch_scale: float | None = None) -> LocalWorkers:
    """The models, optimizers and schedules of this process.
    With ``full_phase_from`` (an assembled state dict) it is the full phase: that full model on
    every worker (its residual branches scaled by ``branch_scale`` when given), trained with DDP's
    updates (sharded over the workers with full_phase_shard), its schedule continuing at
    ``first_step``."""
    torch.manual_seed(config["run.seed"])  # the same initial model on every rank
    model = task.make_model().to(ctx.device)
    full_phase = full_phase_from is not None
    sharded_full = full_phase and config["strategy.full_phase_shard"]
    if full_phase:
        model.load_state_dict(full_phase_from, strict=True)
        if branch_scale is not None:
            fold_residual_scale(model, task.blocks, branch_scale)
    if config["strategy.checkpointing"] or (full_phase and config["strategy.full_phase_checkpointing"]):
        checkpoint_blocks(model, resolve_block_paths(model, task.blocks))
    drop = config["strategy.stochastic_depth"]
    depth = StochasticDepth(model, resolve_block_paths(model, task.blocks), drop, config["run.seed"]) if drop else None
    sdp = config["strategy.name"] == "sdp" and (not full_phase or sharded_full)
    kwargs = (full_phase_kwargs(config, task, ctx.device) if sharded_full
              else sdp_kwargs(config, task, ctx.device) if sdp else {})
    par = parallelize(model, sdp=sdp, device=ctx.device, virtual_workers=ctx.world_size if ctx.simulate else None,
                      timeout=config["run.timeout"], **kwargs)
    pairs = [make_optimizer(config, par.optimized_parameters(m), steps, first_step) for m in par.models]
    return LocalWorkers(config, task, ctx, par, [p[0] for p in pairs], [p[1] for p in pairs],
                        stochastic_depth=depth, full_phase=full_phase)


def _not_finite(losses: list[float], grads: list[torch.Tensor]) -> torch.Tensor:
    """[any loss not finite, the gradient norm not finite] of this process, as 0/1 floats."""
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
    return torch.tensor([float(not all(math.isfinite(v) for v in losses)), float(not torch.isfinite(norm).item())])


def check_finite(tr: LocalWorkers, step: int, losses: list[float], grads: list[torch.Tensor]) -> None:
    """DivergedError on every rank when any worker's loss or gradient norm is NaN or infinite
    (collective: one all-reduce of two numbers), before the optimizer applies it."""
    bad = tr.ctx.all_reduce_sum(_not_finite(losses, grads))
    if bad.any():
        what = " and ".join(name for name, n in zip(("loss", "gradient norm"), bad.tolist()) if n)
        where = "" if tr.ctx.simulate else f" on {int(bad.max().item())} of {tr.ctx.world_size} workers"
        raise DivergedError(f"the run diverged at step {step + 1}: the training {what} is not finite (NaN or "
                            f"infinite){where}; stopped before that step's update, nothing non-finite was "
                            "checkpointed. Lower optim.lr, or set optim.grad_clip or optim.warmup_steps")


def worker_optimizers(tr: LocalWorkers) -> list[tuple[int, torch.optim.Optimizer]]:
    """(worker, its optimizer) for every local worker; simulated DDP's workers share one."""
    ranks = tr.par.ranks
    if len(tr.optimizers) == len(ranks):
        return list(zip(ranks, tr.optimizers))
    return [(r, tr.optimizers[0]) for r in ranks]


def worker_memory_tracker(tr: LocalWorkers) -> WorkerPeakTracker:
    """A live-tensor tracker with each local worker's tensors as its baseline."""
    optimizers = dict(worker_optimizers(tr))
    state, params = {}, {}
    modules = tr.par.unwrapped_models
    for i, (rank, model) in enumerate(tr.par.local_workers):
        module = modules[min(i, len(modules) - 1)]  # simulated DDP: one model for every worker
        params[rank] = list(module.parameters()) + tr.par.optimized_parameters(model)
        moments = [v for st in optimizers[rank].state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        grads = [p.grad for p in params[rank] if p.grad is not None]
        state[rank] = params[rank] + grads + list(module.buffers()) + moments
    return WorkerPeakTracker(state, params)


def train_step(tr: LocalWorkers, step: int, tracker: WorkerPeakTracker | None = None) -> float:
    """One optimizer step of every local worker; returns the mean loss over this process's workers.
    A non-finite loss or gradient norm on any worker raises DivergedError before the update.
    ``tracker``: each worker's work is attributed to it (memory per worker)."""
    cfg, ctx, task, par = tr.config, tr.ctx, tr.task, tr.par
    batch_size, seed = cfg["data.batch_size"], cfg["run.seed"]

    def attributed(rank: int) -> Any:
        return tracker.worker(rank) if tracker is not None else contextlib.nullcontext()

    losses = []
    for rank, model in par.local_workers:
        x, y = task.data.train_batch(step, rank, ctx.world_size, batch_size, seed)
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        if tr.stochastic_depth is not None:
            tr.stochastic_depth.draw(step, rank)
        with attributed(rank):
            with autocast(cfg["run.autocast"], ctx.device):
                loss = task.forward_loss(model, x, y)
            par.backward(loss)
        losses.append(loss.item())
    par.after_backward()
    if cfg["optim.grad_clip"] > 0:
        par.clip_grad_norm_(cfg["optim.grad_clip"])
    grads = [p.grad for m in par.models for p in par.optimized_parameters(m) if p.grad is not None]
    check_finite(tr, step, losses, grads)
    # gradients are freed at zero_grad: their size is read here, while they exist
    tr.peak_grad_bytes = max(tr.peak_grad_bytes, tensor_bytes(grads))
    for (rank, _), optimizer, scheduler in zip(worker_optimizers(tr), tr.optimizers, tr.schedulers):
        with attributed(rank):
            optimizer.step()  # backward-masked or sharded SDP shares the weights in par.after_step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    par.after_step()
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------
# measurement
