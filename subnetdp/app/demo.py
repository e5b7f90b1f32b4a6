"""The README demo: N gloo workers on CPU train a CIFAR-style ResNet-18 on synthetic images, first
with DDP, then with B-SDP (block level, forward masking, C=0.5), each launched by torchrun in its own
processes (so each one's peak resident memory is its own), then print the SDP plan and a
side-by-side table of measured per-worker figures.

    subnetdp demo                        # 4 workers, 60 steps each, width 16
    subnetdp demo --workers 4 --steps 100 --width 32 --out runs/demo

Every figure is measured: tensor bytes from the live tensors, peak RSS from /proc (VmHWM), bytes
handed to collectives counted where they are issued (a DDP comm hook; SDP's own buckets), step
time by the wall clock, accuracy of the assembled full model on held-out synthetic data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import SyntheticImages
from ..engine import SubnetworkDataParallel, recalibrate_norm_statistics
from ..measure import optimizer_state_bytes, peak_rss_bytes, tensor_bytes
from ..models import resnet18

MiB = 2 ** 20


def _count_ddp_bytes(counter: dict):
    """A DDP comm hook: the default all-reduce, counting the bytes of every bucket it hands over."""
    def hook(state, bucket):  # no annotations: DDP checks them, and they are strings here
        tensor = bucket.buffer()
        counter["bytes"] += tensor.numel() * tensor.element_size()
        tensor.div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])
    return hook


def _test_accuracy(model: nn.Module, data: SyntheticImages) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(8):
            x, y = data.batch(128, i, split="test")
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / 1024


def run_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    rss_at_start = peak_rss_bytes()  # interpreter + torch + gloo, before any model exists
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = SyntheticImages(num_classes=10, channels=1, size=32, seed=0)
    torch.manual_seed(0)
    model = resnet18(num_classes=10, in_channels=1, width=args.width)
    ddp_bytes = {"bytes": 0}
    if args.strategy == "ddp":
        wrapped: nn.Module = DistributedDataParallel(model)
        wrapped.register_comm_hook(None, _count_ddp_bytes(ddp_bytes))
    else:
        example = data.batch(2, step=-1)[0]
        wrapped = SubnetworkDataParallel(model, blocks="blocks", coverage=args.coverage, masking="forward",
                                         example_input=example)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    progress = None
    if rank == 0:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, desc=f"{args.strategy} x{world}", unit="step", mininterval=2)
    step_times, losses, grads_bytes = [], [], 0
    for step in range(args.steps):
        x, y = data.batch(args.batch_size, step, shard=rank)
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(wrapped(x), y)
        loss.backward()
        grads_bytes = max(grads_bytes, tensor_bytes(p.grad for p in wrapped.parameters()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if progress is not None:
            progress.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{world * args.batch_size / step_times[-1]:.0f}")
            progress.update()
    if progress is not None:
        progress.close()
    comm = ddp_bytes["bytes"] if args.strategy == "ddp" else wrapped.comm_bytes  # type: ignore[union-attr]
    if args.strategy == "ddp":
        full_state = wrapped.module.state_dict()  # type: ignore[union-attr]
    else:
        full_state = wrapped.full_state_dict()  # type: ignore[operator]
    record = {
        "rank": rank,
        "param_bytes": tensor_bytes(wrapped.parameters()),
        "grad_bytes": grads_bytes,
        "optimizer_bytes": optimizer_state_bytes(optimizer),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_at_start_bytes": rss_at_start,
        "comm_bytes_per_step": comm / args.steps,
        "median_step_s": statistics.median(step_times[1:] or step_times),
        "losses": losses,
    }
    records: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(records, record)
    if rank == 0:
        evaluator = resnet18(num_classes=10, in_channels=1, width=args.width)
        evaluator.load_state_dict(full_state, strict=True)
        accuracy = _test_accuracy(evaluator, data)
        # Re-estimate norm statistics on the full model (20 training batches), then test again.
        recalibrate_norm_statistics(evaluator, (data.batch(64, 10_000 + i)[0] for i in range(20)))
        result = {"strategy": args.strategy, "workers": world, "test_accuracy": accuracy,
                  "test_accuracy_recalibrated": _test_accuracy(evaluator, data), "per_rank": records}
        if args.strategy == "sdp":
            result["plan"] = wrapped.plan.table()  # type: ignore[union-attr]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{args.strategy}.json").write_text(json.dumps(result, indent=1))
    # Leave together: a rank tearing down gloo while its peer still evaluates was seen to abort.
    dist.barrier()
    dist.destroy_process_group()


def _launch(args: argparse.Namespace, strategy: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.workers}",
           "-m", "subnetdp.app.demo", "--worker", "--strategy", strategy, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--width", str(args.width),
           "--coverage", str(args.coverage), "--out", args.out]
    subprocess.run(cmd, env=env, check=True)


def summary_table(results: list[dict]) -> str:
    header = (f"{'strategy':<16} {'test acc':>8} {'acc, BN re-est.':>15} {'params MiB':>10} {'grads MiB':>9} {'optim MiB':>9} "
              f"{'peak RSS MiB':>12} {'comm MiB/step':>13} {'step ms':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        ranks = r["per_rank"]
        label = "DDP" if r["strategy"] == "ddp" else "B-SDP fwd C=0.5"
        lines.append(
            f"{label:<16} {r['test_accuracy']:>8.3f} {r['test_accuracy_recalibrated']:>15.3f} {max(x['param_bytes'] for x in ranks) / MiB:>10.2f} "
            f"{max(x['grad_bytes'] for x in ranks) / MiB:>9.2f} {max(x['optimizer_bytes'] for x in ranks) / MiB:>9.2f} "
            f"{max(x['peak_rss_bytes'] or 0 for x in ranks) / MiB:>12.1f} "
            f"{statistics.mean(x['comm_bytes_per_step'] for x in ranks) / MiB:>13.2f} "
            f"{statistics.median(x['median_step_s'] for x in ranks) * 1000:>8.1f}")
    start = max(x.get("peak_rss_at_start_bytes") or 0 for r in results for x in r["per_rank"]) / MiB
    lines.append("per worker, the largest over workers (comm: mean, step time: median); peak RSS "
                 f"includes the interpreter and torch ({start:.1f} MiB measured at worker start);\n"
                 "accuracy of the assembled full model, as assembled and after re-estimating its "
                 "BatchNorm statistics on 20 training batches")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="subnetdp demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="gloo worker processes (default 4)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per strategy (default 60)")
    parser.add_argument("--batch-size", type=int, default=32, help="per-worker batch size (default 32)")
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64 is standard; default 16)")
    parser.add_argument("--coverage", type=float, default=0.5, help="SDP coverage C (default 0.5)")
    parser.add_argument("--out", default="runs/demo", help="where results are written (default runs/demo)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=["ddp", "sdp"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    for strategy in ("ddp", "sdp"):
        _launch(args, strategy)
    results = [json.loads((Path(args.out) / f"{s}.json").read_text()) for s in ("ddp", "sdp")]
    print()
    print(results[1]["plan"])
    print()
    print(summary_table(results))
    print(f"\nresults: {args.out}/ddp.json, {args.out}/sdp.json")


if __name__ == "__main__":
    main()
