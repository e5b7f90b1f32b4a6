"""`subnetdp bench`: measured memory, communication and time of DDP, FSDP2, activation
checkpointing, stochastic depth and SDP variants, in one harness on the same model, data and seed.

    subnetdp bench --model resnet18 --workers 4 --out benchmarks/cpu-resnet18
    subnetdp bench --model llama --preset tiny --workers 4 \\
        --strategies ddp,fsdp,ddp-ckpt,ddp-sd@0.5,sdp-block-fwd@0.5,sdp-block-fwd-ckpt@0.5

Strategies (``@C`` is the coverage, or the survival probability for stochastic depth):
  ddp                    torch DistributedDataParallel
  fsdp                   FSDP2: fully_shard on every block, then on the root
  ddp-ckpt               DDP, every block under activation checkpointing (non-reentrant)
  ddp-sd@P               DDP with stochastic depth: each block kept with probability P per step
  sdp-{block,neuron}-{fwd,bwd}@C         SDP at that level and masking
  sdp-block-fwd-ckpt@C   B-SDP with the held blocks under activation checkpointing
  sdp-...-shard@C        any SDP variant with shard=True: each bucket's gradient and AdamW state
                         split over its holders (ZeRO-2 inside holder sets)
  sdp-...-shard-shared@C the same, and the shared weights split over all N too, gathered before
                         use (shard_shared_weights=True: ZeRO-3 of the shared parameters)

Each strategy runs in a fresh torchrun process group. Per rank it measures W warm-up steps, then
T timed steps (forward, backward with the gradient sync that overlaps it, optimizer step; CUDA is
synchronised around each phase), then T steps without gradient sync (DDP/SDP ``no_sync``, FSDP
``set_requires_gradient_sync(False)``): the exposed sync time is the difference of the medians of
forward+backward with and without sync. Memory: on CPU one more step under LiveTensorTracker
(live tensor bytes by kind at their peak) and the process's VmHWM over the timed steps; on CUDA
the allocator's max_memory_allocated/reserved over the timed steps. Communication: bytes handed to
collectives during the timed steps, counted where they are issued (DDP comm hook, SDP's buckets,
FSDP2's all-gather/reduce-scatter calls), and the bytes each worker sends for them under a ring
model (``subnetdp.engine.exchange.ring_wire_bytes``).

Exit code: 2 (one line, nothing run) for bad arguments; 1 when every strategy failed (the report is
still written, bench.log says why); 0 otherwise, also when only some failed (marked in the report).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ...engine.units import get_module, resolve_block_paths
from ...measure import ByteCounter, optimizer_state_bytes, tensor_bytes
from ...measure.comm import count_collective_bytes
from ...measure.live import LiveTensorTracker
from ...measure.memory import local_tensor
from ..baselines import StochasticDepth, checkpoint_blocks
from ..builders import Task, build_task
from ..config import from_dict
from ..launch import run_process_tree, torchrun_command, worker_env
from ..parallelism import Parallelism, RealDDP, RealSDP, level_kwargs
from ..runtime import PeakMemory, autocast, choose_device, machine_info, percentiles

DEFAULT_STRATEGIES = ("ddp,fsdp,ddp-ckpt,ddp-sd@0.5,sdp-block-fwd@0.5,sdp-block-fwd@0.25,sdp-block-bwd@0.5,"
                      "sdp-neuron-fwd@0.5,sdp-neuron-bwd@0.5,sdp-block-fwd-ckpt@0.5")
MiB = 2 ** 20


@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str                  # ddp | fsdp | sdp
    level: str = "block"
    masking: str = "forward"
    coverage: float = 1.0
    checkpointing: bool = False
    stochastic_depth: float | None = None
    shard: bool = False        # sdp: ZeRO-2 inside holder sets (engine/sharding.py)
    shard_shared_weights: bool = False  # sdp: and ZeRO-3 of the shared weights (engine/shared_weights.py)


def parse_strategy(text: str) -> Strategy:
    name = text.strip()
    match = re.fullmatch(r"sdp-(block|neuron)-(fwd|bwd)(-ckpt)?(-shard(-shared)?)?@([0-9.]+)", name)
    if match:
        level, masking, ckpt, shard, shared, coverage = match.groups()
        return Strategy(name, "sdp", level, "forward" if masking == "fwd" else "backward", float(coverage), bool(ckpt),
                        shard=bool(shard), shard_shared_weights=bool(shared))
    match = re.fullmatch(r"ddp-sd@([0-9.]+)", name)
    if match:
        return Strategy(name, "ddp", stochastic_depth=float(match.group(1)))
    known = {"ddp": Strategy("ddp", "ddp"), "fsdp": Strategy("fsdp", "fsdp"),
             "ddp-ckpt": Strategy("ddp-ckpt", "ddp", checkpointing=True)}
    if name not in known:
        raise ValueError(f"unknown strategy {name!r}; valid: ddp, fsdp, ddp-ckpt, ddp-sd@P, "
                         "sdp-{block,neuron}-{fwd,bwd}[-ckpt][-shard[-shared]]@C")
    return known[name]


# ---------------------------------------------------------------------------------------------
# applying a strategy to an unmodified model


@dataclass
class Harness:
    strategy: Strategy
    model: nn.Module                    # what the step calls
    optimizer: torch.optim.Optimizer
    parallelism: Parallelism | None = None  # DDP and SDP; None for FSDP2
    depth: StochasticDepth | None = None

    def comm_bytes(self, counted: ByteCounter) -> int:
        """Bytes handed to collectives so far: DDP's comm hook or SDP's own count; FSDP2's
        all-gathers and reduce-scatters as ``counted`` saw them issued."""
        if self.parallelism is not None:
            return self.parallelism.comm_bytes()
        return counted.bytes

    def wire_bytes(self, counted: ByteCounter) -> float:
        """The bytes this worker sends for them under a ring model (``exchange.ring_wire_bytes``)."""
        if self.parallelism is not None:
            return self.parallelism.wire_bytes()
        return counted.wire

    def after_step(self) -> None:
        """SDP: share the stepped weights now, inside the step's optimizer time (backward masking, shards)."""
        if self.parallelism is not None:
            self.parallelism.after_step()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        if self.strategy.kind == "fsdp":
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            with self.model.no_sync():
                yield


def apply_strategy(strategy: Strategy, model: nn.Module, task: Task, device: torch.device,
                   lr: float) -> Harness:
    paths = resolve_block_paths(model, task.blocks)
    if strategy.kind == "sdp":
        par: Parallelism = RealSDP(model, coverage=strategy.coverage, masking=strategy.masking,
                                   example_input=task.example_input.to(device), shard=strategy.shard,
                                   shard_shared_weights=strategy.shard_shared_weights,
                                   **level_kwargs(strategy.level, task.blocks))
        if strategy.checkpointing:
            checkpoint_blocks(par.unwrapped_models[0], blocks_run_forward(strategy, par, paths))
        wrapped: nn.Module = par.models[0]
        harness_kwargs: dict[str, Any] = {"parallelism": par}
    elif strategy.kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # the bench's device, not FSDP2's default (CUDA whenever a GPU is present, even with --device cpu)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for path in paths:
            fully_shard(get_module(model, path), mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped, harness_kwargs = model, {}
    else:
        if strategy.checkpointing:
            checkpoint_blocks(model, paths)
        # survival P per step: each block dropped with probability 1 - P, per rank and step
        depth = (StochasticDepth(model, paths, 1 - strategy.stochastic_depth)
                 if strategy.stochastic_depth is not None else None)
        par = RealDDP(model, device)
        wrapped, harness_kwargs = par.models[0], {"parallelism": par, "depth": depth}
    stepped = harness_kwargs["parallelism"].optimized_parameters(wrapped) if "parallelism" in harness_kwargs \
        else list(wrapped.parameters())
    optimizer = torch.optim.AdamW(stepped, lr=lr)
    return Harness(strategy, wrapped, optimizer, **harness_kwargs)


def blocks_run_forward(strategy: Strategy, par: Parallelism, paths: list[str]) -> list[str]:
    """The blocks whose forward pass this rank runs, as the plan says: under block-level forward
    masking the blocks it holds; otherwise every block (neuron level slices inside each block,
    and backward masking runs the full forward)."""
    if strategy.level != "block" or strategy.masking != "forward":
        return paths
    held = set(par.plan.held_units(par.ranks[0]))
    return [p for p in paths if p in held]


# ---------------------------------------------------------------------------------------------
# one rank


def _bench_config(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    if args.model == "llama":
        model = {"name": "llama", "preset": args.preset or "tiny",
                 **({"loss_chunk": args.loss_chunk} if args.loss_chunk else {})}
        data = {"name": "synthetic-text", "batch_size": args.batch_size, "vocab_size": args.vocab,
                "seq_len": args.seq_len}
    else:
        model = {"name": args.model, **({"width": args.width} if args.model == "resnet18" else
                                        {"preset": args.preset or "small32"})}
        data = {"name": "synthetic-images", "batch_size": args.batch_size, "channels": 1, "size": 32,
                "train_size": 1024, "test_size": 64}  # Fashion-MNIST shapes: 1 x 32 x 32, 10 classes
    return {"run": {"seed": args.seed}, "model": model, "data": data}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(args: argparse.Namespace) -> torch.device:
    return choose_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))


def run_worker(args: argparse.Namespace) -> None:
    """One rank of a torchrun job: a real process group."""
    if args.device == "cpu":
        torch.set_num_threads(1)
    device = _device(args)
    dist.init_process_group(args.backend)
    record = measure(args, parse_strategy(args.strategy), device)
    _write(args, record)
    dist.barrier()
    dist.destroy_process_group()


def run_fake(args: argparse.Namespace, strategies: list[str]) -> None:
    """One process measures every rank in turn, each in a fake process group of N ranks whose
    collectives do nothing: memory is exactly that rank's at N workers, time is compute only."""
    from ...measure.fake_group import init_fake_process_group
    device = _device(args)
    (Path(args.out) / "bench.log").write_text("")
    from tqdm import tqdm
    for name in tqdm(strategies, desc="strategies", unit="run"):
        for rank in range(args.workers):
            init_fake_process_group(rank, args.workers)
            try:
                _write(args, measure(args, parse_strategy(name), device))
            except Exception as exc:  # noqa: BLE001 - a failing strategy is reported, the others run
                message = f"{name} rank {rank}: failed: {type(exc).__name__}: {exc}"
                tqdm.write(message)
                with open(Path(args.out) / "bench.log", "a") as log:
                    log.write(message + "\n")
            finally:
                dist.destroy_process_group()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def _write(args: argparse.Namespace, record: dict[str, Any]) -> None:
    out = Path(args.out) / "raw" / record["strategy"].replace("@", "_at_")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{record['rank']}.json").write_text(json.dumps(record, indent=1))


def measure(args: argparse.Namespace, strategy: Strategy, device: torch.device) -> dict[str, Any]:
    """Warm-up, timed steps, unsynchronised steps and one memory step of this rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    # what an earlier measurement in this process left allocated (should be nothing)
    allocated_at_start = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    task = build_task(from_dict(_bench_config(args)))
    torch.manual_seed(args.seed)
    model = task.make_model().to(device)
    harness = apply_strategy(strategy, model, task, device, args.lr)
    mixed_precision = "bfloat16" if args.bf16 else args.autocast
    counted = ByteCounter()
    batches = [task.data.train_batch(i, rank, world, args.batch_size, args.seed) for i in range(4)]

    def step(i: int, sync: bool = True, times: dict[str, list[float]] | None = None) -> None:
        x, y = (t.to(device) for t in batches[i % len(batches)])
        if harness.depth is not None:
            harness.depth.draw(i, rank)
        _sync(device)
        t0 = time.perf_counter()
        with (contextlib.nullcontext() if sync else harness.no_sync()):
            with autocast(mixed_precision, device):
                loss = task.forward_loss(harness.model, x, y)
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
        if sync:
            harness.optimizer.step()
            harness.after_step()
        harness.optimizer.zero_grad(set_to_none=True)
        harness.model.zero_grad(set_to_none=True)  # sharded SDP: no_sync leaves them on the model, not the shards
        _sync(device)
        t3 = time.perf_counter()
        if times is not None:
            times["forward"].append(t1 - t0)
            times["backward"].append(t2 - t1)
            times["optimizer"].append(t3 - t2)
            times["step"].append(t3 - t0)

    with count_collective_bytes(counted):
        for i in range(args.warmup):
            step(i)
        timed: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
        # sharded SDP: the optimizer steps shards, and a shard that is a view of the weights holds
        # no memory of its own; gradients are read from both
        model_params = list(harness.model.parameters())
        stepped = [p for g in harness.optimizer.param_groups for p in g["params"]]
        stored = {local_tensor(p).untyped_storage().data_ptr() for p in model_params}
        param_list = model_params + [p for p in stepped if local_tensor(p).untyped_storage().data_ptr() not in stored]
        grad_list = list({id(p): p for p in model_params + stepped}.values())
        grad_bytes = 0
        peak = PeakMemory(device)
        peak.start()
        comm_before, wire_before = harness.comm_bytes(counted), harness.wire_bytes(counted)
        for i in range(args.steps):
            step(i, times=timed)
        comm = (harness.comm_bytes(counted) - comm_before) / args.steps
        wire = (harness.wire_bytes(counted) - wire_before) / args.steps
        peak.stop()
        unsynced: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
        for i in range(args.steps):
            step(i, sync=False, times=unsynced)
        # one more step to read gradient bytes while they exist, and (CPU) live memory by kind
        x, y = (t.to(device) for t in batches[0])
        tracker = LiveTensorTracker(grad_list, harness.optimizer, extra=[x, y])
        with (tracker if device.type == "cpu" else contextlib.nullcontext()):
            with autocast(mixed_precision, device):
                loss = task.forward_loss(harness.model, x, y)
            loss.backward()
            grad_bytes = tensor_bytes(p.grad for p in grad_list)
            harness.optimizer.step()
            harness.after_step()
            harness.optimizer.zero_grad(set_to_none=True)

    med = {k: statistics.median(v) for k, v in timed.items()}
    med_unsynced = {k: statistics.median(v) for k, v in unsynced.items()}
    record = {
        "strategy": strategy.name, "rank": rank, "world_size": world, "host": socket.gethostname(),
        "param_bytes": tensor_bytes(param_list),
        "grad_bytes": grad_bytes,
        "optimizer_state_bytes": optimizer_state_bytes(harness.optimizer),
        "peak_rss_bytes": peak.rss or None,  # None where /proc cannot tell
        "comm_bytes_per_step": comm,
        "wire_bytes_per_step": wire,
        "time_s": med,
        "time_s_p10_p90": {k: percentiles(v, [10, 90]) for k, v in timed.items()},
        "time_no_sync_s": med_unsynced,
        "exposed_sync_s": max(0.0, (med["forward"] + med["backward"])
                              - (med_unsynced["forward"] + med_unsynced["backward"])),
        "samples_per_s": args.batch_size / med["step"],
        **peak.cuda_figures(),
    }
    if device.type == "cpu":
        record["live_tensors"] = tracker.report()
    plan = harness.parallelism.plan if harness.parallelism is not None else None
    if plan is not None:
        record["plan"] = {"k": plan.k, "shared_bytes": plan.shared_bytes,
                          "total_bytes": sum(plan.unit_bytes.values()) + plan.shared_bytes}
    if task.tokens_per_sample:
        record["tokens_per_s"] = record["samples_per_s"] * task.tokens_per_sample
    record["fake_process_group"] = args.backend == "fake"
    record["cuda_allocated_at_start_bytes"] = allocated_at_start
    if args.backend == "fake":
        record["peak_rss_bytes"] = None  # several ranks ran in this one process
    return record


# ---------------------------------------------------------------------------------------------
# the driver: one torchrun per strategy, then the report


def _launch(args: argparse.Namespace, strategy: str, log: Any) -> int:
    worker_args = ["--worker", "--strategy", strategy]
    for key in ("model", "preset", "width", "batch_size", "seq_len", "vocab", "loss_chunk", "steps", "warmup", "seed",
                "lr", "device", "backend", "out"):
        value = getattr(args, key)
        if value not in (None, ""):
            worker_args += [f"--{key.replace('_', '-')}", str(value)]
    worker_args += ["--autocast", "bfloat16" if args.bf16 else args.autocast]
    cmd = torchrun_command(args.workers, "subnetdp.app.bench.runner", *worker_args)
    env = worker_env(1 if args.device == "cpu" else None)
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    # torchrun in its own session, dying with this process (even of SIGKILL), its workers with it
    result = run_process_tree(cmd, env, stdout=log, stderr=subprocess.STDOUT)
    if result.stopped_by:  # SIGINT, SIGTERM or SIGHUP: passed on to torchrun; the strategies left are not run
        raise _Stopped(result.stopped_by, f"stopped by {signal.Signals(result.stopped_by).name}: torchrun and its "
                       f"{args.workers} workers ({strategy}) are stopped; see {log.name}")
    return result.returncode


class _Stopped(Exception):
    def __init__(self, sig: int, message: str) -> None:
        super().__init__(message)
        self.sig = sig


def run_launched(args: argparse.Namespace, strategies: list[str], out: Path) -> None:
    """One torchrun job (a fresh process group) per strategy; their output goes to bench.log."""
    from tqdm import tqdm
    try:
        with open(out / "bench.log", "w") as log, tqdm(strategies, desc="strategies", unit="run") as bar:
            for name in bar:
                code = _launch(args, name, log)
                if code != 0:
                    tqdm.write(f"{name}: failed (exit {code}); see {out / 'bench.log'}")
    except _Stopped as stop:  # its line last, after the progress bar's
        print(stop, file=sys.stderr)
        raise SystemExit(128 + stop.sig) from None


def collect(out: Path, strategies: list[str]) -> list[dict[str, Any]]:
    results = []
    for name in strategies:
        folder = out / "raw" / name.replace("@", "_at_")
        ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("rank-*.json"))]
        results.append({"strategy": name, "ranks": ranks, "failed": not ranks})
    return results


def check_args(args: argparse.Namespace, strategies: list[str]) -> str | None:
    """What is wrong with the arguments, before anything is launched (one line), or None."""
    import math
    for flag, value, least in (("--workers", args.workers, 1), ("--batch-size", args.batch_size, 1),
                               ("--seq-len", args.seq_len, 1), ("--vocab", args.vocab, 1), ("--width", args.width, 1),
                               ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--loss-chunk", args.loss_chunk, 0)):
        if value < least:
            return f"{flag} must be >= {least}, got {value}"
    if not args.lr > 0:
        return f"--lr must be positive, got {args.lr}"
    if not strategies:
        return "--strategies is empty; e.g. --strategies ddp,sdp-block-fwd@0.5"
    for name in strategies:
        try:
            strategy = parse_strategy(name)
        except ValueError as exc:
            return f"--strategies: {exc}"
        if strategy.kind == "sdp" and not 0 < strategy.coverage <= 1:
            return f"--strategies {name}: the coverage must be in (0, 1]"
        if strategy.kind == "sdp" and math.floor(strategy.coverage * args.workers + 0.5) == 0:
            return (f"--strategies {name}: coverage {strategy.coverage:g} is below 1/N for N = {args.workers} "
                    f"workers; the smallest valid coverage for {args.workers} workers is {1 / args.workers:.4g}")
        if strategy.stochastic_depth is not None and not 0 < strategy.stochastic_depth <= 1:
            return f"--strategies {name}: the survival probability must be in (0, 1]"
    out = Path(args.out)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"--out {out}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: {existing} is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0; 2 for bad arguments (one line, nothing run); 1 when every strategy failed."""
    parser = argparse.ArgumentParser(prog="subnetdp bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["resnet18", "llama", "vit"], default="resnet18")
    parser.add_argument("--preset", default="", help="llama/vit preset (default tiny / small32)")
    parser.add_argument("--width", type=int, default=32, help="resnet18 base width (default 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker (default 32)")
    parser.add_argument("--seq-len", type=int, default=256, help="llama: tokens per sequence (default 256)")
    parser.add_argument("--vocab", type=int, default=256,
                        help="llama: vocabulary of the synthetic tokens (default 256)")
    parser.add_argument("--workers", type=int, default=4, help="ranks per strategy (default 4)")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                        help=f"comma-separated (default {DEFAULT_STRATEGIES})")
    parser.add_argument("--steps", type=int, default=8, help="timed steps, and as many without sync (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", choices=["gloo", "nccl", "fake"], default="gloo",
                        help="gloo: real ranks on CPU, or sharing one GPU (default); nccl: one GPU per rank; "
                        "fake: one process measures each rank in turn in a process group whose collectives "
                        "do nothing (exact per-rank memory, compute-only time, no communication time)")
    parser.add_argument("--autocast", choices=["none", "bfloat16"], default="none",
                        help="autocast dtype for forward/backward, as run.autocast (default none)")
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # renamed --autocast bfloat16
    parser.add_argument("--loss-chunk", type=int, default=0, metavar="TOKENS",
                        help="llama: compute the loss's logits this many tokens at a time, recomputed in "
                        "backward (every strategy alike; default 0: all logits at once)")
    parser.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild bench.json/md and the charts from OUT/raw (e.g. after a timeout)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    problem = check_args(args, strategies)  # fail before launching anything
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        pass
    elif args.backend == "fake":
        run_fake(args, strategies)
    else:
        run_launched(args, strategies, out)
    results = collect(out, strategies)
    from .report import write_report
    command = "subnetdp bench " + " ".join(a for a in (argv if argv is not None else sys.argv[2:]))
    machine = {**machine_info(torch.device(args.device)), "python": platform.python_version()}
    write_report(out, results, vars(args), command, machine)
    if results and all(r["failed"] for r in results):
        print(f"error: every strategy failed ({', '.join(strategies)}); see {out / 'bench.log'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
