"""The training loop behind `subnetdp train`: one rank of a torchrun job, or N virtual workers.

    subnetdp train configs/resnet18_fashion_mnist.toml --nproc 4 --out runs/r18
    torchrun --nproc-per-node 4 -m subnetdp.app.cli train configs/resnet18_fashion_mnist.toml --out runs/r18
    subnetdp train configs/resnet18_fashion_mnist.toml --simulate 8 --out runs/sim8   # one process

Every worker builds the same model from the same seed, wraps it (torch DDP, or SDP), and trains on
its own shard: the batch of step s on rank r is a pure function of (seed, s, r), so a resumed run
sees the batches of the uninterrupted one. Writes, in --out: config.json, metrics.jsonl (one line
per logging step, and one per evaluation), summary.json, checkpoints/ (see checkpoint.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ..engine import (SubnetworkDataParallel, SubnetworkSimulator, recalibrate_norm_statistics,
                      scale_residual_branches)
from ..engine.units import resolve_block_paths
from ..measure import (ByteCounter, counting_allreduce_hook, optimizer_state_bytes, peak_rss_bytes,
                       reset_peak_rss, tensor_bytes)
from . import checkpoint as ckpt
from .baselines import StochasticDepth, checkpoint_blocks
from .builders import Task, build_task
from .config import RESUMABLE_CHANGES, Config, ConfigError, from_dict, phase_steps


# ---------------------------------------------------------------------------------------------
# set-up


@dataclass
class Context:
    """Where this process sits: a real rank of a process group, or the one process of a simulation."""

    rank: int
    world_size: int                  # workers (virtual ones under --simulate)
    local_rank: int
    device: torch.device
    simulate: bool
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_context(config: Config, simulate: int | None) -> Context:
    run = config.section("run")
    torch.set_num_threads(run["threads"])
    cuda = run["device"] == "cuda" or (run["device"] == "auto" and torch.cuda.is_available())
    if run["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("[run] device = 'cuda' but torch sees no CUDA device")
    if simulate is not None:
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return Context(0, simulate, 0, device, simulate=True)
    if "RANK" not in os.environ:
        raise ConfigError("not started by torchrun: use `subnetdp train CONFIG --nproc N` (it calls "
                          "torchrun), `torchrun ... -m subnetdp.app.cli train CONFIG`, or --simulate N")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = run["backend"]
    if backend == "auto":  # NCCL refuses several ranks on one GPU ("Duplicate GPU detected")
        backend = "nccl" if cuda and local_world <= torch.cuda.device_count() else "gloo"
    if backend == "nccl" and not cuda:
        raise ConfigError("[run] backend = 'nccl' needs CUDA devices; use gloo on CPU")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=run["timeout"]),
                            device_id=device if backend == "nccl" else None)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device, simulate=False, backend=backend)


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


def _sdp_kwargs(config: Config, task: Task, device: torch.device) -> dict[str, Any]:
    s = config.section("strategy")
    return {("blocks" if s["level"] == "block" else "neurons"): task.blocks,
            "coverage": s["coverage"], "masking": s["masking"], "seed": s["plan_seed"], "scale": s["scale"],
            "neuron_groups": s["neuron_groups"] or None, "example_input": task.example_input.to(device)}


def strategy_label(config: Config) -> str:
    s = config.section("strategy")
    if s["name"] == "ddp":
        return "DDP"
    level = "B-SDP" if s["level"] == "block" else "N-SDP"
    masking = "fwd" if s["masking"] == "forward" else "bwd"
    return f"{level} {masking} C={s['coverage']:g}"


# ---------------------------------------------------------------------------------------------
# workers: what one process trains


@dataclass
class Trainer:
    """The models this process trains (one, or N virtual workers), their optimizers and schedulers."""

    config: Config
    task: Task
    ctx: Context
    models: list[nn.Module]                      # one per local worker (DDP-simulated: one model)
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    sdp: SubnetworkDataParallel | None = None
    simulator: SubnetworkSimulator | None = None
    ddp_bytes: ByteCounter = field(default_factory=ByteCounter)
    stochastic_depth: StochasticDepth | None = None
    full_phase: bool = False                     # the assembled full model, trained as DDP
    peak_grad_bytes: int = 0

    @property
    def strategy(self) -> str:
        return "ddp" if self.full_phase else self.config["strategy.name"]

    def comm_bytes(self) -> int:
        if self.sdp is not None:
            return self.sdp.comm_bytes
        if self.simulator is not None:
            return sum(w.comm_bytes for w in self.simulator.workers)
        return self.ddp_bytes.bytes

    def state(self) -> list[dict[str, Any]]:
        return [{"model": m.state_dict(), "optimizer": o.state_dict(), "scheduler": s.state_dict()}
                for m, o, s in zip(self.models, self.optimizers, self.schedulers)]

    def load_state(self, states: list[dict[str, Any]]) -> None:
        for m, o, s, state in zip(self.models, self.optimizers, self.schedulers, states):
            m.load_state_dict(state["model"])
            o.load_state_dict(state["optimizer"])
            s.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The assembled full model (collective under real SDP)."""
        if self.sdp is not None:
            return self.sdp.full_state_dict()
        if self.simulator is not None:
            return self.simulator.full_state_dict()
        model = self.models[0]
        model = model.module if isinstance(model, DistributedDataParallel) else model
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def build_trainer(config: Config, task: Task, ctx: Context, steps: int,
                  full_phase_from: dict[str, torch.Tensor] | None = None, first_step: int = 0) -> Trainer:
    """The models, optimizers and schedules of this process. With ``full_phase_from`` (an assembled
    state dict) it is the full phase: that full model on every worker, trained as DDP, its
    schedule continuing at ``first_step``."""
    torch.manual_seed(config["run.seed"])  # the same initial model on every rank
    model = task.make_model().to(ctx.device)
    strategy = config["strategy.name"]
    if full_phase_from is not None:
        model.load_state_dict(full_phase_from, strict=True)
        if config["strategy.full_phase_checkpointing"]:
            checkpoint_blocks(model, resolve_block_paths(model, task.blocks))
        strategy = "ddp"
    drop = config["strategy.stochastic_depth"]
    depth = StochasticDepth(model, resolve_block_paths(model, task.blocks), drop, config["run.seed"]) if drop else None
    if ctx.simulate and strategy == "sdp":
        sim = SubnetworkSimulator(model, ctx.world_size, **_sdp_kwargs(config, task, ctx.device))
        models: list[nn.Module] = list(sim.workers)
        trainer_kwargs: dict[str, Any] = {"simulator": sim}
    elif ctx.simulate:  # DDP with N virtual workers: one model, gradients averaged over N batches
        models, trainer_kwargs = [model], {}
    elif strategy == "sdp":
        sdp = SubnetworkDataParallel(model, timeout=config["run.timeout"], **_sdp_kwargs(config, task, ctx.device))
        models, trainer_kwargs = [sdp], {"sdp": sdp}
    else:
        ddp = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
        counter = ByteCounter()
        ddp.register_comm_hook(counter, counting_allreduce_hook)
        models, trainer_kwargs = [ddp], {"ddp_bytes": counter}
    pairs = [make_optimizer(config, list(m.parameters()), steps, first_step) for m in models]
    return Trainer(config, task, ctx, models, [p[0] for p in pairs], [p[1] for p in pairs],
                   stochastic_depth=depth, full_phase=full_phase_from is not None, **trainer_kwargs)


# ---------------------------------------------------------------------------------------------
# one step


def _autocast(config: Config, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = config["run.autocast"]
    if dtype == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def train_step(tr: Trainer, step: int) -> float:
    """One optimizer step of every local worker; returns the mean loss over this process's workers."""
    cfg, ctx, task = tr.config, tr.ctx, tr.task
    batch_size, seed = cfg["data.batch_size"], cfg["run.seed"]
    workers = range(ctx.world_size) if ctx.simulate else [ctx.rank]
    losses = []
    for i, rank in enumerate(workers):
        model = tr.models[i] if tr.simulator is not None else tr.models[0]
        x, y = task.data.train_batch(step, rank, ctx.world_size, batch_size, seed)
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        if tr.stochastic_depth is not None:
            tr.stochastic_depth.draw(step, rank)
        with _autocast(cfg, ctx.device):
            loss = task.loss(model(x), y)
        # DDP simulated on one model: the mean over N batches is what N workers' all-reduce gives
        (loss / ctx.world_size if ctx.simulate and tr.simulator is None else loss).backward()
        losses.append(loss.item())
    if tr.simulator is not None:
        tr.simulator.sync_gradients()
    clip = cfg["optim.grad_clip"]
    if clip > 0:
        if tr.sdp is not None:
            tr.sdp.clip_grad_norm_(clip)
        elif tr.simulator is not None:
            tr.simulator.clip_grad_norm_(clip)
        else:  # DDP gradients are already averaged and identical on every rank
            torch.nn.utils.clip_grad_norm_(tr.models[0].parameters(), clip)
    # gradients are freed at zero_grad: their size is read here, while they exist
    tr.peak_grad_bytes = max(tr.peak_grad_bytes, tensor_bytes(p.grad for m in tr.models for p in m.parameters()))
    for optimizer, scheduler in zip(tr.optimizers, tr.schedulers):
        optimizer.step()  # backward-masked SDP broadcasts updated units from an optimizer hook
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if tr.simulator is not None:
        tr.simulator.sync_weights()
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------
# evaluation of the assembled full model


@torch.no_grad()
def _evaluate_model(model: nn.Module, tr: Trainer, rank: int, world: int) -> dict[str, float]:
    cfg, task = tr.config, tr.task
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count (samples or tokens)
    for x, y in task.eval_batches(cfg["eval.batch_size"], rank, world, cfg["eval.max_batches"] or None):
        x, y = x.to(tr.ctx.device), y.to(tr.ctx.device)
        with _autocast(cfg, tr.ctx.device):
            out = model(x)
        totals += torch.tensor(task.eval_sums(out.float(), y), dtype=torch.float64)
    if not tr.ctx.simulate:
        totals = totals.to(tr.ctx.device if tr.ctx.backend == "nccl" else "cpu")
        dist.all_reduce(totals)
        totals = totals.cpu()
    return task.eval_metrics(*totals.tolist())


def _branch_scale(config: Config, plan: Any) -> float | None:
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


def make_eval_models(config: Config, task: Task, plan: Any, device: torch.device) -> dict[str, nn.Module]:
    """The plain models the assembled weights are loaded into, by metric prefix: "" is the model
    evaluated under the configured residual_scale; with residual_scale = "both" it is unscaled and
    "scaled_" is the one with branches scaled (k/N, or the survival probability)."""
    mode = config["eval.residual_scale"]
    factor = _branch_scale(config, plan) if mode != "none" else None
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
    state = tr.full_state_dict()
    rank, world = (0, 1) if tr.ctx.simulate else (tr.ctx.rank, tr.ctx.world_size)
    batches = tr.config["eval.recalibrate_norm_batches"]
    metrics: dict[str, float] = {}
    for prefix, eval_model in eval_models.items():
        eval_model.load_state_dict(state, strict=True)
        metrics.update({prefix + k: v for k, v in _evaluate_model(eval_model, tr, rank, world).items()})
        has_norm_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in eval_model.modules())
        if batches and has_norm_stats:
            data, size, seed = tr.task.data, tr.config["data.batch_size"], tr.config["run.seed"]
            # the same training batches on every rank, so every rank ends with the same statistics
            recalibrate_norm_statistics(eval_model, (x.to(tr.ctx.device) for x in data.calibration_batches(batches, size, seed)))
            metrics.update({f"{prefix}{k}_recalibrated": v
                            for k, v in _evaluate_model(eval_model, tr, rank, world).items()})
    views = tr.config["eval.views"]
    if views and tr.strategy == "sdp":
        metrics.update(evaluate_subnetworks(tr, views))
    return metrics


@torch.no_grad()
def evaluate_subnetworks(tr: Trainer, views: list[str]) -> dict[str, float]:
    """Each worker's own subnetwork (as trained, its own norm statistics) and the ensemble of the
    N subnetworks (mean of their probabilities), on the whole test/validation split: every worker
    evaluates every batch. Keys: subnet_<metric>_{mean,min,max} and ensemble_<metric>."""
    cfg, task, ctx = tr.config, tr.task, tr.ctx
    workers = tr.models  # one SubnetworkDataParallel per local (virtual) worker
    sums = torch.zeros(len(workers) + 1, 3, dtype=torch.float64)  # per worker, then the ensemble
    for m in workers:
        m.eval()
    try:
        for x, y in task.eval_batches(cfg["eval.batch_size"], 0, 1, cfg["eval.max_batches"] or None):
            x, y = x.to(ctx.device), y.to(ctx.device)
            with _autocast(cfg, ctx.device):
                outs = [m(x).float() for m in workers]
            for i, out in enumerate(outs):
                sums[i] += torch.tensor(task.eval_sums(out, y), dtype=torch.float64)
            if "ensemble" in views:
                mixed = (tr.simulator.ensemble_log_probs(outs) if tr.simulator is not None
                         else tr.sdp.ensemble_log_probs(outs[0]))
                sums[-1] += torch.tensor(task.eval_sums(mixed, y), dtype=torch.float64)
    finally:
        for m in workers:
            m.train()
    per_worker = [task.eval_metrics(*row.tolist()) for row in sums[:-1]]
    if not ctx.simulate:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, per_worker[0])
        per_worker = gathered
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

    result = {"assembled": count(eval_model)}
    if tr.strategy == "sdp":
        local = [count(m.module) for m in tr.models]
        if not tr.ctx.simulate:
            gathered: list[Any] = [None] * tr.ctx.world_size
            dist.all_gather_object(gathered, local[0])
            local = gathered
        result.update(subnetwork=statistics.fmean(local), ensemble=float(sum(local)))
    return result


# ---------------------------------------------------------------------------------------------
# measurement


class PeakMemory:
    """Peak memory over the training steps only (evaluation and checkpoints excluded)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.rss, self.cuda_allocated, self.cuda_reserved = device, 0, 0, 0

    def start(self) -> None:
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> None:
        self.rss = max(self.rss, peak_rss_bytes() or 0)
        if self.device.type == "cuda":
            self.cuda_allocated = max(self.cuda_allocated, torch.cuda.max_memory_allocated(self.device))
            self.cuda_reserved = max(self.cuda_reserved, torch.cuda.max_memory_reserved(self.device))


def rank_figures(tr: Trainer, peak: PeakMemory, step_times: list[float], comm_bytes: int,
                 steps_timed: int) -> dict[str, Any]:
    models = tr.models
    params = [p for m in models for p in m.parameters()]
    figures = {
        "trainable_param_bytes": tensor_bytes(params),
        "all_param_bytes": tensor_bytes(p for m in models for p in (m.module if hasattr(m, "module") else m).parameters()),
        "grad_bytes": tr.peak_grad_bytes,
        "optimizer_state_bytes": sum(optimizer_state_bytes(o) for o in tr.optimizers),
        "peak_rss_bytes_training": peak.rss,
        # virtual workers exchange nothing: there is no communication to count
        "comm_bytes_per_step": None if tr.ctx.simulate else comm_bytes / max(1, steps_timed),
        "median_step_s": statistics.median(step_times[1:] or step_times) if step_times else None,
        "step_s_p10_p90": (list(np.percentile(step_times, [10, 90])) if step_times else None),
    }
    if peak.device.type == "cuda":
        figures.update(cuda_max_allocated_bytes=peak.cuda_allocated, cuda_max_reserved_bytes=peak.cuda_reserved)
    if tr.ctx.simulate:
        figures["note"] = f"{tr.ctx.world_size} virtual workers in one process: memory is their sum"
    return figures


def _gather_figures(tr: Trainer, figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's figures (collective), or the simulation's one."""
    if tr.ctx.simulate:
        return [figures]
    per_rank: list[Any] = [None] * tr.ctx.world_size
    dist.all_gather_object(per_rank, {"rank": tr.ctx.rank, "host": socket.gethostname(), **figures})
    return per_rank


# ---------------------------------------------------------------------------------------------
# the run


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _barrier(ctx: Context) -> None:
    if not ctx.simulate:
        dist.barrier()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop the lines a killed run logged after its last checkpoint."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _check_resume(config: Config, manifest: dict[str, Any], ctx: Context, folder: Path) -> None:
    saved = from_dict(manifest["config"])
    changed = [d for d in config.differences(saved) if (d[0], d[1]) not in RESUMABLE_CHANGES]
    if changed:
        lines = "\n".join(f"  {s}.{k}: checkpoint {b!r}, now {a!r}" for s, k, a, b in changed)
        raise ckpt.CheckpointError(f"--resume: the config differs from the one {folder} was written with:\n"
                                   f"{lines}\nresume with the same config (only {sorted('.'.join(x) for x in RESUMABLE_CHANGES)} may change)")
    if manifest["virtual_world_size"] != ctx.world_size or manifest["simulate"] != ctx.simulate:
        raise ckpt.CheckpointError(f"--resume: {folder} was written by {manifest['virtual_world_size']} workers "
                                   f"(simulated: {manifest.get('simulate', False)}), this run has "
                                   f"{ctx.world_size} (simulated: {ctx.simulate})")


def run_training(config: Config, out: Path, simulate: int | None = None, resume: bool = False,
                 progress: bool = True) -> dict[str, Any] | None:
    """Train as configured; returns the summary on rank 0 (None on other ranks)."""
    ctx = setup_context(config, simulate)
    try:
        return _run(config, out, ctx, resume, progress)
    finally:
        if not ctx.simulate and dist.is_initialized():
            dist.barrier()  # leave together: tearing gloo down under a busy peer was seen to abort
            dist.destroy_process_group()


def _run(config: Config, out: Path, ctx: Context, resume: bool, progress: bool) -> dict[str, Any] | None:
    started = time.perf_counter()
    run = config.section("run")
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    found = ckpt.latest(ckpt_root) if resume else None
    if resume and found is None:
        raise ckpt.CheckpointError(f"--resume: no complete checkpoint under {ckpt_root}")
    if not resume and ctx.is_main and (out / "metrics.jsonl").exists():
        for stale in ("metrics.jsonl", "summary.json"):
            (out / stale).unlink(missing_ok=True)
        if ckpt_root.exists():
            shutil.rmtree(ckpt_root)

    # rank 0 first: it downloads data or trains a tokenizer once, the others then read its files
    task = build_task(config, out) if ctx.is_main else None
    _barrier(ctx)
    if task is None:
        task = build_task(config, out)
    own_steps, full_steps = phase_steps(config)
    steps = own_steps + full_steps
    tr = build_trainer(config, task, ctx, steps)
    plan = tr.sdp.plan if tr.sdp is not None else tr.simulator.plan if tr.simulator is not None else None
    eval_models = make_eval_models(config, task, plan, ctx.device)
    sdp_phase_figures: list[dict[str, Any]] | None = None

    def begin_full_phase() -> Trainer:
        """SDP ends here: every worker continues with the assembled full model, as DDP."""
        return build_trainer(config, task, ctx, steps, full_phase_from=tr.full_state_dict(), first_step=own_steps)

    start_step, log_acc = 0, [0.0, 0]
    if found is not None:
        folder, manifest = found
        _check_resume(config, manifest, ctx, folder)
        if plan is not None and manifest.get("plan_fingerprint") != plan.fingerprint():
            raise ckpt.CheckpointError(f"--resume: {folder} was written under a different SDP plan")
        if manifest.get("phase") == "full":
            tr = begin_full_phase()  # its weights and optimizer come from the checkpoint below
        own = ckpt.load_rank_state(folder, 0 if ctx.simulate else ctx.rank)
        # DDP replicas are identical: rank 0's file holds the model and optimizer for all of them
        holder = own if "workers" in own else ckpt.load_rank_state(folder, 0)
        tr.load_state(holder["workers"])
        _set_rng_state(own["rng"], ctx.device)
        start_step, log_acc = manifest["step"], own["log_accumulator"]
        if ctx.is_main:
            _truncate_metrics(out / "metrics.jsonl", start_step)
    if ctx.is_main:
        (out / "config.json").write_text(json.dumps({"config": config.to_dict(), "source": config.source,
                                                     "world_size": ctx.world_size, "simulate": ctx.simulate,
                                                     "strategy": strategy_label(config)}, indent=1))
        if plan is not None:
            print(plan.table())

    metrics_file = open(out / "metrics.jsonl", "a") if ctx.is_main else None
    bar = tqdm(total=steps, initial=start_step, disable=not (progress and ctx.is_main), unit="step",
               desc=strategy_label(config), dynamic_ncols=True)
    peak = PeakMemory(ctx.device)
    step_times: list[float] = []
    comm_bytes, steps_timed = 0, 0
    evals: list[dict[str, Any]] = []
    samples_per_step = config["data.batch_size"] * ctx.world_size
    window_start, window_steps = time.perf_counter(), 0

    def write(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def checkpoint(done: int) -> None:
        per_rank = {"rng": _rng_state(ctx.device), "log_accumulator": log_acc, "step": done}
        if ctx.simulate:
            per_rank["workers"] = tr.state()
            ckpt.write_rank_state(ckpt_root, done, 0, per_rank)
        else:
            if ctx.rank == 0 or tr.strategy == "sdp":  # what this rank holds (DDP: rank 0 speaks for all)
                per_rank["workers"] = tr.state()
            ckpt.write_rank_state(ckpt_root, done, ctx.rank, per_rank)
        _barrier(ctx)
        if ctx.is_main:
            ckpt.finalize(ckpt_root, done, 1 if ctx.simulate else ctx.world_size,
                          {"config": config.to_dict(), "simulate": ctx.simulate, "strategy": strategy_label(config),
                           "model_kwargs": task.model_kwargs, "model": config["model.name"],
                           "example_input_shape": list(task.example_input.shape),
                           "plan_fingerprint": plan.fingerprint() if plan is not None else None,
                           "phase": "full" if tr.full_phase else "own",
                           "virtual_world_size": ctx.world_size},
                          run["keep_checkpoints"])
        _barrier(ctx)

    phase_flops = {"own": 0.0, "full": 0.0}  # per step, counted on each phase's first step run here
    peak.start()
    for step in range(start_step, steps):
        if step == own_steps and not tr.full_phase:
            peak.stop()
            sdp_phase_figures = _gather_figures(tr, rank_figures(tr, peak, step_times, comm_bytes, steps_timed))
            tr = begin_full_phase()
            peak.start()
            if ctx.is_main:
                bar.write(f"step {step}: SDP phase done; the assembled full model trains for {full_steps} steps")
        comm_before = tr.comm_bytes()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        t0 = time.perf_counter()
        if step in (start_step, own_steps):  # counted once per phase: its steps all do the same work
            with FlopCounterMode(display=False) as flop_counter:
                loss = train_step(tr, step)
            phase_flops["full" if tr.full_phase else "own"] = float(flop_counter.get_total_flops())
        else:
            loss = train_step(tr, step)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        step_times.append(time.perf_counter() - t0)
        comm_bytes += tr.comm_bytes() - comm_before
        steps_timed += 1
        log_acc = [log_acc[0] + loss, log_acc[1] + 1]
        done = step + 1
        window_steps += 1
        bar.update(1)
        is_last = done == steps
        if done % run["log_interval"] == 0 or is_last:
            mean = torch.tensor(log_acc, dtype=torch.float64)
            if not ctx.simulate:  # the mean loss over all workers (NCCL reduces GPU tensors only)
                mean = mean.to(ctx.device if ctx.backend == "nccl" else "cpu")
                dist.all_reduce(mean)
                mean = mean.cpu()
            loss_mean = (mean[0] / mean[1]).item()
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "loss": loss_mean, "lr": tr.schedulers[0].get_last_lr()[0],
                      "samples_per_s": samples_per_step * window_steps / elapsed,
                      "time_s": time.perf_counter() - started}
            if task.tokens_per_sample:
                record["tokens_per_s"] = record["samples_per_s"] * task.tokens_per_sample
            write(record)
            bar.set_postfix(loss=f"{loss_mean:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
            log_acc, window_start, window_steps = [0.0, 0], time.perf_counter(), 0
        needs_eval = is_last or (run["eval_interval"] and done % run["eval_interval"] == 0)
        needs_ckpt = is_last or (run["checkpoint_interval"] and done % run["checkpoint_interval"] == 0)
        if needs_eval or needs_ckpt:
            peak.stop()
            if needs_ckpt:  # first: an evaluation that fails must never cost the training
                checkpoint(done)
            if needs_eval:
                metrics = evaluate(tr, eval_models)
                evals.append({"step": done, **metrics})
                write({"step": done, "eval": metrics})
                if ctx.is_main:
                    bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            peak.start()
            window_start = time.perf_counter()
    bar.close()
    peak.stop()
    if metrics_file is not None:
        metrics_file.close()

    figures = rank_figures(tr, peak, step_times, comm_bytes, steps_timed)
    figures.update({f"{phase}_flops_per_step": v for phase, v in phase_flops.items()})
    inference = inference_flops(tr, eval_models[""])
    per_rank = _gather_figures(tr, figures)
    if not ctx.is_main:
        return None
    summary = {
        "name": run["name"], "strategy": strategy_label(config), "workers": ctx.world_size,
        "simulated": ctx.simulate, "steps": steps, "resumed_from": start_step or None,
        "final_eval": evals[-1] if evals else None, "evals": evals,
        "median_step_s": statistics.median(times) if (times := [r["median_step_s"] for r in per_rank
                                                                 if r["median_step_s"]]) else None,
        "samples_per_step": samples_per_step,
        # measured (FlopCounterMode) on one step: forward + backward of every worker
        "train_flops_per_step": (own := sum(r["own_flops_per_step"] for r in per_rank)),
        "train_flops": own * own_steps + (full := sum(r["full_flops_per_step"] for r in per_rank)) * full_steps,
        "full_phase": ({"from_step": own_steps, "steps": full_steps, "flops_per_step": full,
                        "sdp_phase_per_rank": sdp_phase_figures} if full_steps else None),
        "inference_flops_per_sample": inference,
        "per_rank": per_rank,
        "plan": plan.to_dict() if plan is not None else None,
        "config": config.to_dict(),
        "machine": {"host": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "device": str(ctx.device) if ctx.device.type == "cpu" else torch.cuda.get_device_name(ctx.device),
                    "backend": ctx.backend, "torch": torch.__version__},
        "wall_s": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
