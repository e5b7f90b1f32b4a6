"""`subnetdp align`: gradient alignment of SDP variants with DDP along a finished run's checkpoints.

    subnetdp train configs/resnet18_fashion_mnist.toml --workers 4 --out runs/r18-ddp \\
        --set strategy.name=ddp --set run.checkpoint_interval=50 --set run.keep_checkpoints=1000
    subnetdp align runs/r18-ddp --coverage 0.25 0.5 0.75 --plot runs/r18-ddp/alignment.png

For every complete checkpoint of RUN_DIR (oldest first) it rebuilds the full model and, for each
(level, masking, coverage), measures at that model state the cosine similarity between the
gradient DDP applies (the full model's gradient averaged over the N workers' batches) and the one
SDP would apply (each worker's subnetwork gradient on its own batch, averaged over each unit's
holders), over all parameters, the shared ones and the units' (see subnetdp/measure/alignment.py).

Batches: worker r's batch is the run's own ``train_batch(S, r, N, batch_size, run.seed)`` for the
fixed data step S (--data-step, default 0), the same for every checkpoint and variant, so the curves
differ only by the model state and the variant. --batches-per-worker B > 1 accumulates each worker's
gradient over its batches of steps S .. S+B-1 (gradient accumulation, for DDP and SDP alike: the
alignment of a B-times larger batch's gradient, with BatchNorm still on batches of batch_size).
The plan of each variant is the one an SDP run of the same config would train with (the run's
plan seed, neuron groups and example input, unless given here). Everything runs in float32,
in train mode (BatchNorm on batch statistics), without the run's autocast.

RUN_DIR is normally a DDP run (its model is the full model every step); an SDP run's checkpoints
are assembled first (each unit from its first holder), and the alignment is measured at that
assembled model. Checkpoints exist every run.checkpoint_interval steps, and only the newest
run.keep_checkpoints are kept: set it large for this study.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ...engine import SDPConfigError
from ...engine.errors import PlanError
from ...measure.alignment import ddp_gradient, gradient_alignment
from ...plotting import pyplot
from ..builders import build_task, rebuild_model
from ..config import from_dict
from ..train import checkpoint as ckpt
from ..train.export import assemble_from_checkpoint

TABLE_COLUMNS = [("step", "step"), ("level", "level"), ("masking", "masking"), ("coverage", "C"),
                 ("k", "k"), ("cosine", "cosine"), ("cosine_shared", "cos shared"),
                 ("cosine_units", "cos units"), ("norm_ratio", "|SDP|/|DDP|"), ("loss_ddp", "loss")]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subnetdp align", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished `subnetdp train` run (its --out folder)")
    parser.add_argument("--coverage", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="coverages C (default 0.25 0.5 0.75); k = round(C*N) holders per unit")
    parser.add_argument("--level", nargs="+", choices=["block", "neuron"], default=["block", "neuron"],
                        help="unit levels (default: both)")
    parser.add_argument("--masking", nargs="+", choices=["forward", "backward"], default=["forward", "backward"],
                        help="masking regimes (default: both)")
    parser.add_argument("--workers", type=int, default=None, help="workers N (default: the run's world size)")
    parser.add_argument("--batches-per-worker", type=int, default=1, metavar="B",
                        help="batches accumulated per worker (default 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="per worker (default: the run's data.batch_size)")
    parser.add_argument("--data-step", type=int, default=0, metavar="S",
                        help="the training step whose batches are used (default 0); B > 1: S .. S+B-1")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="only these checkpoint steps (default: every complete checkpoint)")
    parser.add_argument("--plan-seed", type=int, default=None, help="plan seed (default: the run's strategy.plan_seed)")
    parser.add_argument("--neuron-groups", type=int, default=None,
                        help="neuron level: groups per site (default: the run's strategy.neuron_groups, else N)")
    parser.add_argument("--scale", choices=["none", "inverse-coverage"], default="none",
                        help="train-time scaling of kept blocks/neurons under forward masking (default none)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available (default)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default RUN_DIR/alignment.json)")
    parser.add_argument("--plot", type=Path, default=None, help="also draw cosine against training step (PNG)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3g}"
    return "" if value is None else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows (errors in their own column)."""
    columns = TABLE_COLUMNS + ([("error", "error")] if any("error" in r for r in rows) else [])
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Cosine against training step, one line per (level, masking, coverage); None without matplotlib."""
    plt = pyplot("the alignment curves are")
    if plt is None:
        return None

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    variants = sorted({(r["level"], r["masking"], r["coverage"]) for r in rows if r.get("cosine") is not None})
    coverages = sorted({v[2] for v in variants})
    styles = {c: s for c, s in zip(coverages, itertools.cycle(["-", "--", ":", "-."]))}
    colors = {("block", "forward"): "tab:blue", ("block", "backward"): "tab:cyan",
              ("neuron", "forward"): "tab:red", ("neuron", "backward"): "tab:orange"}
    for level, masking, coverage in variants:
        points = sorted((r["step"], r["cosine"]) for r in rows
                        if (r["level"], r["masking"], r["coverage"]) == (level, masking, coverage)
                        and r.get("cosine") is not None)
        name = f"{'B' if level == 'block' else 'N'}-SDP {'fwd' if masking == 'forward' else 'bwd'}"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                linestyle=styles[coverage], color=colors[(level, masking)], label=f"{name} C={coverage:g}")
    ax.set_xlabel("training step of the checkpoint")
    ax.set_ylabel("cosine(g_SDP, g_DDP)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tqdm import tqdm

    run_dir: Path = args.run_dir
    found = ckpt.complete_checkpoints(run_dir / "checkpoints", verify=False)  # assembling verifies
    if args.steps is not None:
        found = [(f, m) for f, m in found if m["step"] in set(args.steps)]
    if not found:
        print(f"error: no complete checkpoint under {run_dir / 'checkpoints'}"
              + (f" at steps {args.steps}" if args.steps else ""), file=sys.stderr)
        return 2
    if args.batches_per_worker < 1:
        print("error: --batches-per-worker must be >= 1", file=sys.stderr)
        return 2
    manifest = found[0][1]
    config = from_dict(manifest["config"])
    strategy = config.section("strategy")
    workers = args.workers or manifest["virtual_world_size"]
    batch_size = args.batch_size or config["data.batch_size"]
    plan_seed = strategy["plan_seed"] if args.plan_seed is None else args.plan_seed
    neuron_groups = args.neuron_groups or strategy["neuron_groups"] or None
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if config["strategy.name"] != "ddp":
        print(f"note: {run_dir} trained {manifest['strategy']}; measuring at its assembled full model",
              file=sys.stderr)
    task = build_task(config, run_dir)
    seed = config["run.seed"]
    batches: list[Any] = []
    for rank in range(workers):
        own = [task.data.train_batch(args.data_step + j, rank, workers, batch_size, seed)
               for j in range(args.batches_per_worker)]
        batches.append(own[0] if len(own) == 1 else own)
    example = task.example_input.to(device)
    variants = list(itertools.product(args.level, args.masking, args.coverage))

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = tqdm(total=len(found) * len(variants), disable=args.no_progress, unit="row", desc="alignment",
               dynamic_ncols=True)
    for _, listed in found:
        state, info = assemble_from_checkpoint(run_dir, listed["step"])
        step = info["step"]
        model = rebuild_model(info["model"], info["model_kwargs"])
        model.load_state_dict(state)
        model.to(device)
        reference = ddp_gradient(model, batches, task.loss, seed=plan_seed)
        for level, masking, coverage in variants:
            bar.set_postfix_str(f"step {step} {level} {masking} C={coverage:g}")
            row: dict[str, Any] = {"step": step, "level": level, "masking": masking, "coverage": coverage}
            try:
                row.update(gradient_alignment(model, batches, task.loss, level=level, masking=masking,
                                              coverage=coverage, blocks=task.blocks, seed=plan_seed,
                                              neuron_groups=neuron_groups, example_input=example,
                                              scale=args.scale, reference=reference))
            except (SDPConfigError, PlanError) as exc:
                row.update({"workers": workers, "error": str(exc)})
                tqdm.write(f"step {step} {level} {masking} C={coverage:g}: {exc}")
            rows.append(row)
            bar.update()
        del model, reference
    bar.close()

    out = args.out or run_dir / "alignment.json"
    report = {
        "run_dir": str(run_dir), "strategy": manifest["strategy"], "model": manifest["model"],
        "model_kwargs": manifest["model_kwargs"], "workers": workers, "batch_size": batch_size,
        "data_step": args.data_step, "batches_per_worker": args.batches_per_worker, "plan_seed": plan_seed,
        "neuron_groups": neuron_groups, "scale": args.scale, "device": str(device),
        "seconds": round(time.perf_counter() - started, 2),
        "method": "cosine between the mean over workers of the full model's gradient on each worker's "
                  "batch (DDP) and the SDP update: each worker's subnetwork gradient on its batch, averaged "
                  "over each unit's holders (subnetdp.measure.alignment)",
        "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(table(rows))
    print(f"\nwritten: {out}")
    if args.plot is not None:
        title = (f"{manifest['model']} {manifest['strategy']} run, N={workers}, batch {batch_size}"
                 f"{f' x {args.batches_per_worker}' if args.batches_per_worker > 1 else ''} per worker")
        written = plot(rows, args.plot, title)
        if written:
            print(f"written: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
