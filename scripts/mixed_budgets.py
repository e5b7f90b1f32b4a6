"""Per-worker memory budgets (issue 20): the planner's predicted peak of each worker against its
budget and against the peak measured while training, on 4 simulated workers.

    python scripts/mixed_budgets.py --out results/mixed-budgets             # ResNet-18 w32 and LLaMA tiny
    python scripts/mixed_budgets.py --tiny --out /tmp/mb                     # a small check (the test's)

For each model: the uniform plan's predicted peaks (C = 0.5, the memory model's defaults: AdamW)
give a reference P (their largest); the mixed budget is (1.5, 1.5, 0.75, 0.75) x P, rounded up
to a MiB. The planner places the blocks so that each worker's predicted peak fits its budget; then
SubnetworkSimulator trains ``--steps`` AdamW steps (forward masking) on random data, and each
worker's peak of live tensor bytes is measured as `subnetdp train` measures it
(measure.live.WorkerPeakTracker, one tracker per step, each worker's forward, backward and step
attributed to it). Writes mixed_budgets.json and mixed_budgets.md to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from subnetdp import SubnetworkSimulator
from subnetdp.engine.plan import format_bytes
from subnetdp.engine.planning import plan_for
from subnetdp.measure.live import WorkerPeakTracker
from subnetdp.models import resnet18
from subnetdp.models.llama import llama

FACTORS = (1.5, 1.5, 0.75, 0.75)
MiB = 2**20


def _models(tiny: bool) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    if tiny:
        rx, ry = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
        tokens = torch.randint(0, 256, (2, 17), generator=g)
        return [dict(name="resnet18 w8, batch 4, 16x16", make=lambda: resnet18(width=8), blocks="blocks",
                     x=rx, y=ry, loss=_classify),
                dict(name="llama debug, batch 2 x 16", make=lambda: llama("debug"), blocks="layers",
                     x=tokens[:, :-1], y=tokens[:, 1:], loss=_next_token)]
    rx, ry = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    tokens = torch.randint(0, 256, (8, 129), generator=g)
    return [dict(name="resnet18 w32, batch 32, 32x32", make=lambda: resnet18(width=32), blocks="blocks",
                 x=rx, y=ry, loss=_classify),
            dict(name="llama tiny, batch 8 x 128", make=lambda: llama("tiny"), blocks="layers",
                 x=tokens[:, :-1], y=tokens[:, 1:], loss=_next_token)]


def _classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _next_token(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def measure(sim: SubnetworkSimulator, x: torch.Tensor, y: torch.Tensor,
            loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], steps: int) -> list[int]:
    """Each worker's largest peak of live tensor bytes over ``steps`` AdamW steps."""
    optimizers = [torch.optim.AdamW(w.parameters(), lr=1e-3) for w in sim.workers]
    peaks = [0] * len(sim.workers)
    for _ in range(steps):
        params = {r: list(w.module.parameters()) for r, w in enumerate(sim.workers)}
        state = {}
        for r, w in enumerate(sim.workers):
            moments = [v for s in optimizers[r].state.values() for v in s.values() if isinstance(v, torch.Tensor)]
            state[r] = params[r] + list(w.module.buffers()) + moments
        tracker = WorkerPeakTracker(state, params)
        with tracker:
            for r, worker in enumerate(sim.workers):
                with tracker.worker(r):
                    loss_fn(worker, x, y).backward()
            sim.sync_gradients()
            for r, optimizer in enumerate(optimizers):
                with tracker.worker(r):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        peaks = [max(p, tracker.peaks[r]) for r, p in enumerate(peaks)]
    return peaks


def run(tiny: bool, steps: int, workers: int = 4, coverage: float = 0.5) -> list[dict[str, Any]]:
    rows = []
    for spec in _models(tiny):
        torch.manual_seed(0)
        model = spec["make"]()
        # the reference: what the uniform placement would need (a budget no worker reaches)
        roomy = plan_for(model, workers, blocks=spec["blocks"], coverage=coverage, example_input=spec["x"],
                         memory_budget=[2**50] * workers)
        assert roomy.worker_predicted_peak is not None
        reference = max(roomy.worker_predicted_peak)
        budgets = [math.ceil(f * reference / MiB) * MiB for f in FACTORS[:workers]]
        started = time.perf_counter()
        sim = SubnetworkSimulator(model, workers, blocks=spec["blocks"], coverage=coverage, example_input=spec["x"],
                                  memory_budget=budgets)
        plan = sim.plan
        assert plan.worker_predicted_peak is not None and plan.worker_budget is not None
        measured = measure(sim, spec["x"], spec["y"], spec["loss"], steps)
        for r in range(workers):
            rows.append({"model": spec["name"], "worker": r, "units": plan.held_units(r),
                         "budget": plan.worker_budget[r], "predicted": plan.worker_predicted_peak[r],
                         "measured": measured[r], "uniform_predicted": roomy.worker_predicted_peak[r],
                         "seconds": time.perf_counter() - started})
        print(plan.table(), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | worker | blocks held | budget | predicted peak | measured peak | measured / budget | "
             "measured / predicted |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['worker']} | {len(row['units'])} | {format_bytes(row['budget'])} | "
                     f"{format_bytes(row['predicted'])} | {format_bytes(row['measured'])} | "
                     f"{row['measured'] / row['budget']:.1%} | {row['measured'] / row['predicted']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/mixed-budgets"))
    parser.add_argument("--steps", type=int, default=3, help="training steps per model (default 3)")
    parser.add_argument("--tiny", action="store_true", help="small models and batches (seconds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.tiny, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
               "processor": platform.processor() or platform.machine()}
    (args.out / "mixed_budgets.json").write_text(json.dumps({"rows": rows, "machine": machine, "steps": args.steps,
                                                             "factors": FACTORS}, indent=1))
    text = table(rows)
    (args.out / "mixed_budgets.md").write_text(text + "\n")
    print(text)
    over = [r for r in rows if r["measured"] > 1.05 * r["budget"]]
    print(f"\nworkers whose measured peak exceeds 1.05 x budget: {len(over)} of {len(rows)}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
