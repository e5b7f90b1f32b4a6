"""The training loop behind `subnetdp train`: one rank of a torchrun job, or N virtual workers.

    subnetdp train configs/resnet18_fashion_mnist.toml --workers 4 --out runs/r18
    torchrun --nproc-per-node 4 -m subnetdp.app.cli train configs/resnet18_fashion_mnist.toml --out runs/r18
    subnetdp train configs/resnet18_fashion_mnist.toml --workers 8 --simulate --out runs/sim8   # one process

Every worker builds the same model from the same seed, has it parallelised (parallelism.py: torch
DDP or SDP, over real ranks or virtual workers), and trains on its own shard: the batch of step s
on rank r is a pure function of (seed, s, r), so a resumed run sees the batches of the
uninterrupted one. Writes, in --out: config.json, metrics.jsonl (one line per logging step, and
one per evaluation), summary.json, checkpoints/ (see checkpoint.py). What is evaluated is in
evaluation.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ...engine.subnetwork import Subnetwork
from ...measure import optimizer_state_bytes, tensor_bytes
from ..builders import Task, build_task
from ..config import Config, ConfigError, mean_coverage, phase_steps, worker_coverages
from ..jsonfile import strict_json
from ..launch import die_with_parent, note_failure
from ..runtime import PeakMemory, machine_info, percentiles
from . import checkpoint as ckpt
from . import reshard
from .context import Context, DivergedError, setup_context
from .evaluation import eval_cap, evaluate, inference_flops, make_eval_models
from .run_folder import check_resume, lock_run_folder, prepare_run_folder, resume_changes, truncate_metrics
from .workers import (
    LocalWorkers,
    build_workers,
    draw_of_step,
    draw_seed,
    strategy_label,
    train_step,
    worker_memory_tracker,
)


@dataclass
class StepStats:
    """What the step loop measures, over the training steps only (both phases)."""

    peak: PeakMemory
    step_times: list[float] = field(default_factory=list)
    comm_bytes: int = 0
    steps_timed: int = 0
    phase_flops: dict[str, float] = field(default_factory=lambda: {"own": 0.0, "full": 0.0})


def rank_figures(tr: LocalWorkers, stats: StepStats) -> dict[str, Any]:
    par, times = tr.par, stats.step_times
    figures = {
        # SDP: the model's trained parameters (its parameters() are the shards under strategy.shard)
        "trainable_param_bytes": sum(m.held_bytes()["trainable_params"] if isinstance(m, Subnetwork) else
                                     tensor_bytes(m.parameters()) for m in par.models),
        # held_bytes: a freed shared weight (shard_shared_weights) counts as the part this worker keeps
        "all_param_bytes": sum(m.held_bytes()["all_params"] if isinstance(m, Subnetwork) else
                               tensor_bytes(m.parameters()) for m in par.models),
        "grad_bytes": tr.peak_grad_bytes,
        "optimizer_state_bytes": sum(optimizer_state_bytes(o) for o in tr.optimizers),
        "peak_rss_bytes_training": stats.peak.rss,
        # virtual workers exchange nothing: there is no communication to count
        "comm_bytes_per_step": None if par.comm_bytes() is None else stats.comm_bytes / max(1, stats.steps_timed),
        "median_step_s": statistics.median(times[1:] or times) if times else None,
        "step_s_p10_p90": percentiles(times, [10, 90]),
        **stats.peak.cuda_figures(),
    }
    if tr.ctx.simulate:
        figures["note"] = f"{tr.ctx.world_size} virtual workers in one process: memory is their sum"
    return figures


def _gather_figures(tr: LocalWorkers, figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's figures (collective), or the simulation's one."""
    if tr.ctx.simulate:
        return [figures]
    return tr.ctx.gather([{"rank": tr.ctx.rank, "host": socket.gethostname(), **figures}])


# ---------------------------------------------------------------------------------------------
# what a checkpoint restores besides the models (the run folder itself: run_folder.py)


def _stored(model: torch.nn.Module) -> list[torch.Tensor]:
    """What one local worker stores (SDP: its own part of freed shared weights), for a finite check."""
    return model.stored_tensors() if isinstance(model, Subnetwork) else list(model.state_dict().values())


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


def check_task_fits(config: Config, task: Task, world_size: int) -> None:
    """ConfigError when the data cannot feed one step: a global batch (workers x data.batch_size)
    larger than the image train set."""
    steps_per_epoch = getattr(task.data, "steps_per_epoch", None)
    if steps_per_epoch is None:  # token streams draw windows at random: any batch fits
        return
    try:
        steps_per_epoch(world_size, config["data.batch_size"])
    except ValueError:
        batch = config["data.batch_size"]
        raise config.error("data", "batch_size", f"[data] batch_size = {batch} on {world_size} workers is a global "
                           f"batch of {world_size * batch} examples, more than the {task.data.train_size} of the "
                           f"train set: lower data.batch_size (at most {task.data.train_size // world_size}) or "
                           "the number of workers") from None


def build_task_once(config: Config, out: Path, ctx: Context) -> Task:
    """Rank 0 first: it downloads data or trains a tokenizer once, the others then read its files."""
    task = build_task(config, out) if ctx.is_main else None
    ctx.barrier()
    return task if task is not None else build_task(config, out)


# ---------------------------------------------------------------------------------------------
# the run


def run_training(config: Config, out: Path, simulate: int | None = None, resume: bool = False,
                 progress: bool = True) -> dict[str, Any] | None:
    """Train as configured; returns the summary on rank 0 (None on other ranks).

    A worker of torchrun dies with it (``die_with_parent``), even when torchrun is SIGKILLed. The
    run folder is locked meanwhile (lock.py), here unless the launcher holds it. On an error the
    ranks do not wait for each other (a dead or stuck peer would make that a second timeout):
    the error propagates at once, and is noted for the launcher to show last."""
    if simulate is None and "RANK" in os.environ:
        die_with_parent()
    ctx = setup_context(config, simulate)
    lock = None
    try:
        lock = lock_run_folder(out, ctx)
        started = time.perf_counter()
        task = build_task_once(config, out, ctx)
        check_task_fits(config, task, ctx.world_size)  # before the folder changes: a corrected re-run works
        skipped: list[tuple[Path, str]] = []
        found = prepare_run_folder(out, ctx, resume, skipped)
        run = TrainingRun(config, out, ctx, task, started, progress)
        if found is not None:
            run.resume(*found, skipped)
        run.write_run_config()
        run.train()
        summary = run.summary()
        # leave together: tearing gloo down under a busy peer was seen to abort. Only here: a
        # failing run leaves at once, as its peers may be dead or stuck (a second timeout)
        ctx.barrier()
        return summary
    except Exception as exc:
        where = "" if ctx.simulate or str(exc).startswith("rank ") else f"rank {ctx.rank}: "
        note_failure(f"{type(exc).__name__}: {where}{exc}")
        raise
    finally:
        if not ctx.simulate and dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:
            lock.release()


def open_tensorboard(out: Path | None, start_step: int) -> Any:
    """A TensorBoard writer for OUT/tensorboard (None: only check that one can be made); on
    resume, events after ``start_step`` (the steps trained again) are purged, as metrics.jsonl is
    truncated."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError("run.tensorboard = true needs the tensorboard package: pip install "
                          "'subnetdp[tensorboard]'") from exc
    if out is None:
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=start_step if start_step else None)


class TrainingRun:
    """One run from its first (or resumed) step to its summary: the step loop, its log records,
    evaluations and checkpoints, and the switch to the full-model phase."""

    # made by train(): the progress bar, metrics.jsonl (rank 0 only), the throughput window
    bar: tqdm
    metrics_file: TextIO | None
    tensorboard: Any = None  # rank 0's SummaryWriter with run.tensorboard
    window_start: float
    window_steps: int

    def __init__(self, config: Config, out: Path, ctx: Context, task: Task, started: float,
                 progress: bool = True) -> None:
        self.config, self.out, self.ctx, self.task, self.started = config, out, ctx, task, started
        self.progress = progress
        self.ckpt_root = out / "checkpoints"
        self.own_steps, self.full_steps = phase_steps(config)
        self.steps = self.own_steps + self.full_steps
        self.tr = build_workers(config, task, ctx, self.steps)
        self.plan = self.tr.par.plan  # of the SDP phase; kept through the full phase
        self.eval_models = make_eval_models(config, task, self.plan, ctx.device)
        self.start_step = 0
        self.log_acc: list[float] = [0.0, 0]  # loss sum and steps since the last log record
        self.stats = StepStats(PeakMemory(ctx.device))
        self.evals: list[dict[str, Any]] = []
        # each worker's own subnetwork metrics at the latest evaluation (None: it evaluated none)
        self.subnet_by_worker: list[dict[str, float]] | None = None
        self.sdp_phase_per_rank: list[dict[str, Any]] | None = None
        self.full_phase_from: int | None = None  # the step the full-model phase began at, once it has
        self.seconds = {"eval": 0.0, "checkpoint": 0.0, "redraw": 0.0}
        self.draw = 0  # which plan trains now (strategy.redraw_every)
        self.redraw_bytes: list[int] = []  # moved by each re-draw of this process's run
        # live-tensor peak per worker, by phase, at the steps measured (CPU; CUDA: the allocator's)
        self.worker_peaks: dict[str, dict[int, int]] = {}
        self.memory_steps: list[int] = []
        self.eval_seconds: list[float] = []  # of each evaluation of this process's run (not before a resume)
        if config["run.tensorboard"]:  # fail before training, not at the first log record
            open_tensorboard(None, 0)

    def begin_full_phase(self, at: int) -> None:
        """SDP ends at step ``at``: every worker continues with the assembled full model, as DDP,
        its learning-rate schedule continuing from there."""
        scaled = self.config["strategy.full_phase_start"] == "scaled" and self.plan is not None
        self.tr = build_workers(self.config, self.task, self.ctx, self.steps,
                                full_phase_from=self.tr.par.full_state_dict(), first_step=at,
                                branch_scale=self.plan.k / self.plan.world_size if scaled else None)
        self.full_phase_from = at

    def redraw(self, step: int) -> None:
        """The plan that trains step ``step`` (strategy.redraw_every): its units move now."""
        began = time.perf_counter()
        self.draw = draw_of_step(self.config, step)
        self.redraw_bytes.append(self.tr.par.redraw(draw_seed(self.config, self.draw), self.tr.optimizers))
        self.seconds["redraw"] += time.perf_counter() - began

    def resume(self, folder: Path, manifest: dict[str, Any], skipped: list[tuple[Path, str]] | None = None) -> None:
        """Continue from a checkpoint: its phase, weights, optimizers, RNG states and log window.
        Rank 0 says which step of how many it resumes, every config value that changed, and the
        newer checkpoints it skipped because they were damaged."""
        ctx = self.ctx
        moved = check_resume(self.config, manifest, ctx.world_size, ctx.simulate, folder)
        if not moved and self.plan is not None and manifest.get("plan_fingerprint") != self.plan.fingerprint():
            raise ckpt.CheckpointError(f"--resume: {folder} was written under a different SDP plan")
        if ctx.is_main:
            for damaged, why in skipped or []:
                print(f"warning: skipped the newer checkpoint {damaged}: {why}", file=sys.stderr, flush=True)
            changes = "".join(f"; {line}" for line in resume_changes(self.config, manifest))
            print(f"resuming {self.out} at step {manifest['step']} of {self.steps} (checkpoint {folder.name}){changes}",
                  flush=True)
        if manifest.get("phase") == "full":  # its weights and optimizer come from the checkpoint below
            self.begin_full_phase(manifest.get("full_phase_from", self.own_steps))
        elif draw_of_step(self.config, manifest["step"] - 1) > 0:  # a re-drawn plan wrote it: draw it
            self.redraw(manifest["step"] - 1)                      # (the state it moves is replaced below)
            self.redraw_bytes.clear()
        ckpt.require_readable(manifest, folder)
        if ckpt.holds_dcp(manifest):  # SDP: each worker reads the chunks it holds, under any plan
            own = ckpt.load_rank_state(folder, min(ctx.rank, manifest["world_size"] - 1))
            from ...engine import checkpoint as sdp_checkpoint  # here: torch.distributed.checkpoint takes 0.7 s
            sdp_checkpoint.load(folder / ckpt.MODEL_DIR, self.tr.par.engine, self.tr.optimizers)
            schedulers = own["schedulers"]  # identical schedules: any worker's serves on another N
            for i, scheduler in enumerate(self.tr.schedulers):
                scheduler.load_state_dict(schedulers[i if not moved else 0])
            if moved and ctx.is_main:
                print(f"resumed from {manifest['virtual_world_size']} workers (simulated: {manifest['simulate']}) "
                      f"on {ctx.world_size}: model and optimizer state re-planned and moved, each worker reading only "
                      "the chunks it holds", flush=True)
        elif moved:  # DDP on another worker count: every replica takes rank 0's model and optimizer
            own = ckpt.load_rank_state(folder, min(ctx.rank, manifest["world_size"] - 1))
            reshard.load_replica(self.tr, reshard.replica_state(folder))
            if ctx.is_main:
                print(f"resumed from {manifest['virtual_world_size']} workers (simulated: {manifest['simulate']}) "
                      f"on {ctx.world_size}", flush=True)
        else:
            own = ckpt.load_rank_state(folder, ctx.rank)
            # DDP replicas are identical: rank 0's file holds the model and optimizer for all of them
            holder = own if "workers" in own else ckpt.load_rank_state(folder, 0)
            self.tr.load_state(holder["workers"])
        self.tr.apply_schedule()
        _set_rng_state(own["rng"], ctx.device)
        self.start_step, self.log_acc = manifest["step"], own["log_accumulator"]
        self.sdp_phase_per_rank = manifest.get("sdp_phase_per_rank") or self.sdp_phase_per_rank
        if ctx.is_main:
            records = truncate_metrics(self.out / "metrics.jsonl", self.start_step)
            evaluated = [r for r in records if isinstance(r.get("eval"), dict)]
            self.evals = [{"step": r["step"], **r["eval"]} for r in evaluated]
            # paired with evals[-1] until this run evaluates again (it does, at its last step)
            self.subnet_by_worker = evaluated[-1].get("subnet_by_worker") if evaluated else None

    def write_run_config(self) -> None:
        if not self.ctx.is_main:
            return
        (self.out / "config.json").write_text(json.dumps(
            {"config": self.config.to_dict(), "source": self.config.source, "world_size": self.ctx.world_size,
             "simulate": self.ctx.simulate, "strategy": strategy_label(self.config)}, indent=1))
        if self.plan is not None:
            print(self.plan.table())

    # -- the step loop ---------------------------------------------------------------------

    def train(self) -> None:
        """Every remaining step, metrics.jsonl open for appending on rank 0 meanwhile."""
        main = self.ctx.is_main
        self.bar = tqdm(total=self.steps, initial=self.start_step, disable=not (self.progress and main),
                        unit="step", desc=strategy_label(self.config), dynamic_ncols=True)
        self.tensorboard = open_tensorboard(self.out, self.start_step) if main and self.config["run.tensorboard"] \
            else None
        try:
            with open(self.out / "metrics.jsonl", "a") if main else contextlib.nullcontext() as self.metrics_file:
                self._step_loop()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
        self.bar.close()

    def _step_loop(self) -> None:
        run, peak = self.config.section("run"), self.stats.peak
        self.window_start, self.window_steps = time.perf_counter(), 0
        peak.start()
        for step in range(self.start_step, self.steps):
            if step >= self.own_steps and not self.tr.full_phase:
                self._switch_to_full_phase(step)
            elif not self.tr.full_phase and draw_of_step(self.config, step) != self.draw:
                peak.stop()
                self.redraw(step)
                peak.start()
            self._timed_step(step)
            done = step + 1
            self.window_steps += 1
            self.bar.update(1)
            is_last = done == self.steps
            if done % run["log_interval"] == 0 or is_last:
                self._log(done)
            needs_eval = is_last or (run["eval_interval"] and done % run["eval_interval"] == 0)
            needs_ckpt = is_last or (run["checkpoint_interval"] and done % run["checkpoint_interval"] == 0)
            if needs_eval or needs_ckpt:
                peak.stop()
                if needs_ckpt:  # first: an evaluation that fails must never cost the training
                    began = time.perf_counter()
                    self._checkpoint(done)
                    self.seconds["checkpoint"] += time.perf_counter() - began
                if needs_eval:
                    self._evaluate(done)
                peak.start()
                self.window_start = time.perf_counter()
        peak.stop()

    def _record_cuda_phase_peak(self) -> None:
        """On CUDA (real ranks: one worker per process) the phase's peak per worker is the
        allocator's; the live-tensor tracker covers CPU."""
        if self.ctx.device.type == "cuda" and not self.ctx.simulate:
            phase = "full" if self.tr.full_phase else "own"
            self.worker_peaks[phase] = {self.ctx.rank: self.stats.peak.cuda_allocated_since_mark}
            self.stats.peak.mark()

    def _switch_to_full_phase(self, step: int) -> None:
        peak = self.stats.peak
        peak.stop()
        self._record_cuda_phase_peak()
        if not (step == self.start_step and self.sdp_phase_per_rank is not None):  # else: the resumed checkpoint's
            self.sdp_phase_per_rank = _gather_figures(self.tr, rank_figures(self.tr, self.stats))
        interval = self.config["run.checkpoint_interval"]
        if self.tr.par.is_sdp and step != self.start_step and not (interval and step % interval == 0):
            # the subnetworks as the SDP phase leaves them: `subnetdp export --subnetwork` and
            # `subnetdp report` read them from here (a full-phase checkpoint holds one full model)
            began = time.perf_counter()
            self._checkpoint(step)
            self.seconds["checkpoint"] += time.perf_counter() - began
            self.window_start = time.perf_counter()  # the log's throughput window counts training only
        self.begin_full_phase(step)
        peak.start()
        if self.ctx.is_main:
            self.bar.write(f"step {step}: SDP phase done; the assembled full model trains for {self.full_steps} steps")

    def _timed_step(self, step: int) -> None:
        """One training step, timed (CUDA synchronised around it), its bytes communicated counted,
        and its FLOPs counted on the first step of each phase (all its steps do the same work)."""
        ctx, stats = self.ctx, self.stats
        comm_before = self.tr.par.comm_bytes()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        t0 = time.perf_counter()
        phase = "full" if self.tr.full_phase else "own"
        if step in (self.start_step, self.own_steps):
            with FlopCounterMode(display=False) as flop_counter:
                loss = train_step(self.tr, step)
            stats.phase_flops[phase] = float(flop_counter.get_total_flops())
        elif self._measures_memory(step):
            tracker = worker_memory_tracker(self.tr)
            with tracker:
                loss = train_step(self.tr, step, tracker)
            peaks = self.worker_peaks.setdefault(phase, {})
            for rank, peak in tracker.peaks.items():
                peaks[rank] = max(peaks.get(rank, 0), peak)
            self.memory_steps.append(step + 1)
        else:
            loss = train_step(self.tr, step)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        stats.step_times.append(time.perf_counter() - t0)
        comm_after = self.tr.par.comm_bytes()
        if comm_after is not None and comm_before is not None:
            stats.comm_bytes += comm_after - comm_before
        stats.steps_timed += 1
        self.log_acc = [self.log_acc[0] + loss, self.log_acc[1] + 1]

    def _measures_memory(self, step: int) -> bool:
        """Whether step ``step`` is tracked for memory per worker (CPU; on CUDA the allocator
        counts every step): the second step of each phase (the first runs under the FLOP counter,
        and creates the optimizer state the second holds from its start) and the second step of
        each of the first three re-drawn plans."""
        if self.ctx.device.type != "cpu":
            return False
        firsts = {self.start_step, self.own_steps}
        every = self.config["strategy.redraw_every"]
        if every:
            firsts |= {d * every for d in range(1, 4) if d * every < self.own_steps}
        return step - 1 in firsts and step not in firsts

    def _write(self, record: dict[str, Any]) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(strict_json(record) + "\n")
            self.metrics_file.flush()
        if self.tensorboard is not None:
            # every number of the record, tagged by its key (nested ones as "eval/accuracy")
            flat = {f"{key}/{k}": v for key, value in record.items() if isinstance(value, dict)
                    for k, v in value.items()}
            flat.update({k: v for k, v in record.items() if not isinstance(v, dict)})
            for tag, value in flat.items():
                if tag != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(tag, value, record["step"])
            self.tensorboard.flush()

    def _log(self, done: int) -> None:
        """A metrics.jsonl record: the mean loss over all workers since the last one, and throughput."""
        totals = self.ctx.all_reduce_sum(torch.tensor(self.log_acc, dtype=torch.float64))
        loss_mean = (totals[0] / totals[1]).item()
        elapsed = time.perf_counter() - self.window_start
        samples_per_step = self.config["data.batch_size"] * self.ctx.world_size
        record = {"step": done, "loss": loss_mean, "lr": self.tr.schedulers[0].get_last_lr()[0],
                  "samples_per_s": samples_per_step * self.window_steps / elapsed,
                  "time_s": time.perf_counter() - self.started}
        if self.task.tokens_per_sample:
            record["tokens_per_s"] = record["samples_per_s"] * self.task.tokens_per_sample
        self._write(record)
        self.bar.set_postfix(loss=f"{loss_mean:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
        self.log_acc, self.window_start, self.window_steps = [0.0, 0], time.perf_counter(), 0

    def _evaluate(self, done: int) -> None:
        began = time.perf_counter()
        by_worker: list[dict[str, float]] = []
        metrics = evaluate(self.tr, self.eval_models, self.progress, desc=f"evaluation at step {done}",
                           final=done == self.steps, per_worker=by_worker)
        seconds = time.perf_counter() - began
        self.seconds["eval"] += seconds
        self.evals.append({"step": done, **metrics})
        self.subnet_by_worker = by_worker or None
        self.eval_seconds.append(seconds)
        # how many test examples (or validation windows) it covered
        examples = self.task.data.eval_size(self.config["eval.batch_size"], eval_cap(self.config, done == self.steps))
        record: dict[str, Any] = {"step": done, "eval": metrics, "eval_s": seconds, "eval_examples": examples}
        if by_worker:  # each worker's own subnetwork, in rank order (eval holds their mean, min, max)
            record["subnet_by_worker"] = by_worker
        self._write(record)
        if self.ctx.is_main:
            self.bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                           + f" ({seconds:.1f} s)")

    def _checkpoint(self, done: int) -> None:
        """Every rank writes what it holds (DDP: rank 0 speaks for all), then rank 0 the manifest.
        A state with a NaN or infinite weight is never written (DivergedError on every rank)."""
        ctx, tr, root = self.ctx, self.tr, self.ckpt_root
        not_finite = sum(not torch.isfinite(t).all().item() for m in tr.par.models for t in _stored(m)
                         if t.is_floating_point())
        if ctx.all_reduce_sum(torch.tensor([float(not_finite)])).item():
            raise DivergedError(f"the run diverged at step {done}: the weights hold NaN or infinite values; "
                                "this state was not checkpointed. Lower optim.lr, or set optim.grad_clip")
        if ctx.is_main:  # a partial folder of this step left by a crash must not mix into this one
            shutil.rmtree(ckpt.partial_dir(root, done), ignore_errors=True)
        ctx.barrier()
        per_rank: dict[str, Any] = {"rng": _rng_state(ctx.device), "log_accumulator": self.log_acc, "step": done}
        if tr.par.is_sdp:  # the model and optimizer state through DCP, each rank its chunks
            per_rank["schedulers"] = [s.state_dict() for s in tr.schedulers]
        elif ctx.rank == 0:
            per_rank["workers"] = tr.state()
        ckpt.write_rank_state(root, done, ctx.rank, per_rank)
        if tr.par.is_sdp:
            from ...engine import checkpoint as sdp_checkpoint  # here: torch.distributed.checkpoint takes 0.7 s
            sdp_checkpoint.save(ckpt.partial_dir(root, done) / ckpt.MODEL_DIR, tr.par.engine, tr.optimizers)
        ctx.barrier()
        if ctx.is_main:
            ckpt.finalize(root, done, ctx.processes,
                          {"config": self.config.to_dict(), "simulate": ctx.simulate,
                           "strategy": strategy_label(self.config),
                           "model_kwargs": self.task.model_kwargs, "model": self.config["model.name"],
                           "example_input_shape": list(self.task.example_input.shape),
                           "plan_fingerprint": self.plan.fingerprint() if self.plan is not None else None,
                           "phase": "full" if tr.full_phase else "own",
                           "full_phase_from": self.full_phase_from,
                           # the SDP phase's per-rank figures, for summary.json after a resume past it
                           "sdp_phase_per_rank": self.sdp_phase_per_rank,
                           # the plan that wrote the subnetworks (strategy.redraw_every): the draw's
                           "plan_seed_drawn": draw_seed(self.config, self.draw),
                           "plan_fingerprint_drawn": (tr.par.plan.fingerprint()
                                                      if tr.par.plan is not None and not tr.full_phase else None),
                           "virtual_world_size": ctx.world_size},
                          self.config["run.keep_checkpoints"])
        ctx.barrier()

    # -- the summary -----------------------------------------------------------------------

    def _peak_memory(self, per_rank: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Each worker's measured peak of live tensor bytes by phase (CPU), and the largest over the
        workers: per phase, and over the whole run."""
        by_phase: dict[str, dict[str, int]] = {}
        for figures in per_rank:
            for phase, peaks in (figures.get("live_peak_bytes") or {}).items():
                by_phase.setdefault(phase, {}).update(peaks)
        if not by_phase:
            return None
        names = {"own": "sdp_phase" if self.config["strategy.name"] == "sdp" else "training", "full": "full_phase"}
        out: dict[str, Any] = {names[p]: max(v.values()) for p, v in by_phase.items()}
        out["whole_run"] = max(out.values())
        out["by_worker"] = {names[p]: v for p, v in by_phase.items()}
        out["measured"] = (
            "torch.cuda.max_memory_allocated of each rank over the phase's training steps"
            if self.ctx.device.type == "cuda" else
            "live tensors (CPU) of each worker at steps " + ", ".join(map(str, self.memory_steps))
            + ": its parameters, buffers, gradients, optimizer state and everything its forward, backward and "
            "optimizer step allocate")
        return out

    def _coverage(self) -> dict[str, Any] | None:
        """SDP's coverage: the mean (what the FLOP schedule divides by), each worker's (a mixed
        fleet: the list asked for, and each worker's share of the unit parameters it got)."""
        if self.plan is None:
            return None
        plan, per_worker = self.plan, worker_coverages(self.config)
        unit_params = max(1, sum(plan.unit_params.values()))
        return {"mean": mean_coverage(self.config), "per_worker": per_worker, "holders_per_unit": plan.k,
                "held_unit_params_fraction": [(p - plan.shared_params) / unit_params for p in plan.worker_params]}

    def _memory_budget(self) -> dict[str, Any] | None:
        """strategy.memory_budget: each worker's budget, the plan's predicted peak, bytes."""
        plan = self.plan
        if plan is None or plan.worker_budget is None:
            return None
        return {"per_worker": plan.worker_budget, "predicted_peak": plan.worker_predicted_peak,
                "memory_model": plan.memory_model,
                "example_batch": self.config["data.batch_size"]}

    def summary(self) -> dict[str, Any] | None:
        """Gather every rank's figures (collective) and, on rank 0, write summary.json."""
        config, ctx, tr = self.config, self.ctx, self.tr
        self._record_cuda_phase_peak()
        figures = rank_figures(tr, self.stats)
        figures.update({f"{phase}_flops_per_step": v for phase, v in self.stats.phase_flops.items()})
        figures["live_peak_bytes"] = {phase: {str(r): b for r, b in peaks.items()}
                                      for phase, peaks in self.worker_peaks.items()}
        inference = inference_flops(tr, self.eval_models[""])
        per_rank = _gather_figures(tr, figures)
        if not ctx.is_main:
            return None
        step_medians = [r["median_step_s"] for r in per_rank if r["median_step_s"]]
        own = sum(r["own_flops_per_step"] for r in per_rank)
        full = sum(r["full_flops_per_step"] for r in per_rank)
        summary = {
            "name": config["run.name"], "strategy": strategy_label(config), "workers": ctx.world_size,
            "simulated": ctx.simulate, "steps": self.steps, "resumed_from": self.start_step or None,
            "final_eval": self.evals[-1] if self.evals else None, "evals": self.evals,
            # the final evaluation's subnetwork of each worker, in rank order (None: none evaluated)
            "final_subnet_by_worker": self.subnet_by_worker,
            "median_step_s": statistics.median(step_medians) if step_medians else None,
            "samples_per_step": config["data.batch_size"] * ctx.world_size,
            # measured (FlopCounterMode) on one step: forward + backward of every worker
            "train_flops_per_step": own,
            "train_flops": own * self.own_steps + full * self.full_steps,
            # the step the full phase really began at (recorded when it began, or in the checkpoint)
            "full_phase": ({"from_step": self.full_phase_from, "steps": self.steps - self.full_phase_from,
                            "flops_per_step": full, "sdp_phase_per_rank": self.sdp_phase_per_rank}
                           if self.full_phase_from is not None else None),
            "inference_flops_per_sample": inference,
            "peak_memory_per_worker": self._peak_memory(per_rank),
            "coverage": self._coverage(),
            "memory_budget": self._memory_budget(),
            "redraw": ({"every": config["strategy.redraw_every"], "plans_drawn": self.draw + 1,
                        "redraws_in_this_process": len(self.redraw_bytes),
                        "bytes_moved_per_redraw": statistics.fmean(self.redraw_bytes) if self.redraw_bytes else None,
                        "bytes_moved_per_step": (sum(self.redraw_bytes) / max(1, self.own_steps - self.start_step)),
                        "seconds": self.seconds["redraw"]}
                       if config["strategy.redraw_every"] else None),
            "per_rank": per_rank,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "config": config.to_dict(),
            "machine": machine_info(ctx.device, backend=ctx.backend),
            "wall_s": time.perf_counter() - self.started,
            # where this process's time went (since its start or resume): training steps, each
            # evaluation, checkpoints
            "time_s": {"train_steps": sum(self.stats.step_times), "eval": self.seconds["eval"],
                       "evals": self.eval_seconds, "checkpoint": self.seconds["checkpoint"]},
        }
        (self.out / "summary.json").write_text(strict_json(summary, indent=1, default=str))
        return summary
