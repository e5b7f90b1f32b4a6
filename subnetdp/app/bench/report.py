"""The report of `subnetdp bench`: bench.json, bench.md (ratios to DDP of the same run, the issue's
targets checked) and three PNG charts."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ...plotting import pyplot

MiB = 2 ** 20
KINDS = ("parameters", "gradients", "optimizer_state", "saved_activations", "other")


def summarize(result: dict[str, Any]) -> dict[str, Any] | None:
    """Per-worker figures of one strategy: memory is the largest over ranks, time the median."""
    ranks = result["ranks"]
    if not ranks:
        return None
    worst = lambda f: max(f(r) for r in ranks)  # noqa: E731
    row: dict[str, Any] = {
        "strategy": result["strategy"],
        "param_mib": worst(lambda r: r["param_bytes"]) / MiB,
        "grad_mib": worst(lambda r: r["grad_bytes"]) / MiB,
        "optimizer_mib": worst(lambda r: r["optimizer_state_bytes"]) / MiB,
        "peak_rss_mib": worst(lambda r: r["peak_rss_bytes"] or 0) / MiB,
        "comm_mib_per_step": statistics.mean(r["comm_bytes_per_step"] for r in ranks) / MiB,
        # older records (before the ring model) have no wire figure
        "wire_mib_per_step": (statistics.mean(r["wire_bytes_per_step"] for r in ranks) / MiB
                              if all("wire_bytes_per_step" in r for r in ranks) else float("nan")),
        "step_ms": statistics.median(r["time_s"]["step"] for r in ranks) * 1e3,
        "forward_ms": statistics.median(r["time_s"]["forward"] for r in ranks) * 1e3,
        "backward_ms": statistics.median(r["time_s"]["backward"] for r in ranks) * 1e3,
        "optimizer_ms": statistics.median(r["time_s"]["optimizer"] for r in ranks) * 1e3,
        "exposed_sync_ms": statistics.median(r["exposed_sync_s"] for r in ranks) * 1e3,
        "samples_per_s": sum(r["samples_per_s"] for r in ranks),
    }
    if "live_tensors" in ranks[0]:
        peak_rank = max(ranks, key=lambda r: r["live_tensors"]["peak_bytes"])
        row["peak_tensor_mib"] = peak_rank["live_tensors"]["peak_bytes"] / MiB
        row["kinds_mib"] = {k: peak_rank["live_tensors"][k] / MiB for k in KINDS}
        row["peak_source"] = "live tensors (CPU)"
    if "cuda_max_allocated_bytes" in ranks[0]:
        row["peak_tensor_mib"] = worst(lambda r: r["cuda_max_allocated_bytes"]) / MiB
        row["cuda_reserved_mib"] = worst(lambda r: r["cuda_max_reserved_bytes"]) / MiB
        row["peak_source"] = "CUDA allocator"
    if "tokens_per_s" in ranks[0]:
        row["tokens_per_s"] = sum(r["tokens_per_s"] for r in ranks)
    if "plan" in ranks[0]:
        plan = ranks[0]["plan"]
        row["shared_fraction"] = plan["shared_bytes"] / plan["total_bytes"]
    return row


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def markdown(rows: list[dict[str, Any]], failed: list[str], args: dict[str, Any], command: str,
             machine: dict[str, Any]) -> str:
    ddp = next((r for r in rows if r["strategy"] == "ddp"), None)
    base = lambda key: ddp[key] if ddp else None  # noqa: E731
    lines = [f"# subnetdp bench: {args['model']}" + (f" {args['preset']}" if args.get("preset") else
                                                      f" width {args['width']}" if args["model"] == "resnet18" else ""),
             "", f"`{command}`", "",
             f"Machine: {machine['device']}, {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}. "
             f"{args['workers']} ranks ({args['backend']}), {args['batch_size']} samples per rank per step"
             + (f" of {args['seq_len']} tokens" if args["model"] == "llama" else " (1 x 32 x 32 images, 10 classes)")
             + f", AdamW, {args['steps']} timed steps after {args['warmup']} warm-up"
             + (", bf16 autocast" if args.get("bf16") or args.get("autocast") == "bfloat16" else "") + ".", "",
             "Per worker: memory is the largest over ranks, time the median over steps and ranks; "
             "ratios are to DDP in this run.", "",
             "| strategy | peak tensor MiB | vs DDP | params | grads | optim | activations | other | "
             "peak RSS MiB | comm MiB/step | vs DDP | wire MiB/step | vs DDP | step ms | vs DDP | fwd | bwd | opt | "
             "exposed sync ms |",
             "|" + "---|" * 19]
    for r in rows:
        kinds = r.get("kinds_mib", {})
        lines.append(
            f"| {r['strategy']} | {r.get('peak_tensor_mib', 0):.1f} "
            f"| {_ratio(r.get('peak_tensor_mib', 0), base('peak_tensor_mib'))} "
            f"| {r['param_mib']:.2f} | {r['grad_mib']:.2f} | {r['optimizer_mib']:.2f} "
            f"| {kinds.get('saved_activations', float('nan')):.1f} | {kinds.get('other', float('nan')):.1f} "
            f"| {r['peak_rss_mib']:.0f} | {r['comm_mib_per_step']:.2f} "
            f"| {_ratio(r['comm_mib_per_step'], base('comm_mib_per_step'))} "
            f"| {r['wire_mib_per_step']:.2f} | {_ratio(r['wire_mib_per_step'], base('wire_mib_per_step'))} "
            f"| {r['step_ms']:.1f} | {_ratio(r['step_ms'], base('step_ms'))} | {r['forward_ms']:.1f} "
            f"| {r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['exposed_sync_ms']:.1f} |")
    for name in failed:
        lines.append(f"| {name} | failed: see bench.log |" + " |" * 17)
    source = rows[0].get("peak_source", "") if rows else ""
    lines += ["", f"Peak tensor memory: {source}. " + (
        "On CPU: baseline tensors (parameters, optimizer state, the batch) plus the peak of every storage "
        "created during one step and not yet freed (subnetdp.measure.LiveTensorTracker); the kinds are "
        "those live storages at that peak: gradients (a parameter's .grad), optimizer state, saved "
        "activations (kept by autograd for backward), other (temporaries, communication buffers, "
        "recomputed activations). Peak RSS: VmHWM of the whole process over the timed steps, "
        "interpreter and torch included." if "CPU" in source else
        "torch.cuda.max_memory_allocated over the timed steps, per rank (each rank has its own allocator, "
        "also when ranks share one GPU)."),
        "Comm: bytes handed to collectives per step, counted where issued (DDP comm hook; SDP's buckets; "
        "FSDP2's all-gather and reduce-scatter inputs). Wire: what each worker sends for them under a "
        "ring model over each collective's g workers (all-reduce 2(g-1)/g of the bytes, all-gather (g-1) "
        "times its input, reduce-scatter (g-1)/g of its input, broadcast (g-1)/g): an all-reduce over a "
        "holder set of k workers sends less than one over all N. Exposed sync: median forward+backward with "
        "gradient sync minus without it (no_sync).", ""]
    lines += targets(rows, args)
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]], args: dict[str, Any]) -> list[str]:
    """The issue's targets for B-SDP forward masking at C = 0.5 (and 0.25) versus DDP."""
    by = {r["strategy"]: r for r in rows}
    ddp, sdp = by.get("ddp"), by.get("sdp-block-fwd@0.5")
    if not ddp or not sdp or "peak_tensor_mib" not in ddp:
        return []
    memory_target = 0.55 if args["model"] == "resnet18" else 0.65
    out = ["## Targets (B-SDP, forward masking, versus DDP in this run)", "",
           "| target | measured | met |", "|---|---|---|"]

    def check(label: str, value: float, limit: float, unit: str = "x") -> None:
        out.append(f"| {label} <= {limit:.2f}{unit} | {value:.3f}{unit} | "
                   f"{'yes' if value <= limit else f'no, by {value - limit:.3f}{unit}'} |")

    check("peak tensor memory, C=0.5", sdp["peak_tensor_mib"] / ddp["peak_tensor_mib"], memory_target)
    check("comm bytes per step, C=0.5 (C + shared fraction)", sdp["comm_mib_per_step"] / ddp["comm_mib_per_step"],
          0.5 + sdp.get("shared_fraction", 0.0))
    check("step time, C=0.5", sdp["step_ms"] / ddp["step_ms"], 0.65)
    check("exposed sync time vs DDP's, C=0.5", sdp["exposed_sync_ms"], ddp["exposed_sync_ms"], " ms")
    quarter = by.get("sdp-block-fwd@0.25")
    if quarter and args["model"] == "resnet18":
        check("peak tensor memory, C=0.25", quarter["peak_tensor_mib"] / ddp["peak_tensor_mib"], 0.40)
    return out + [""]


def _stacked_bars(ax: Any, names: list[str], layers: list[tuple[str, list[float]]]) -> None:
    bottom = [0.0] * len(names)
    for label, values in layers:
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]


def charts(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    plt = pyplot("the bench charts are")
    if plt is None:
        return []

    names = [r["strategy"] for r in rows]
    paths = []
    if all("kinds_mib" in r for r in rows):
        fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
        _stacked_bars(ax, names, [(kind.replace("_", " "), [r["kinds_mib"][kind] for r in rows]) for kind in KINDS])
        ax.set_ylabel("MiB at the live-tensor peak (largest rank)")
        ax.set_title("memory by kind, per worker")
        ax.legend()
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        paths.append(out / "memory_by_kind.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    _stacked_bars(ax, names, [(label, [r[key] for r in rows]) for key, label in (
        ("forward_ms", "forward"), ("backward_ms", "backward (+ overlapped sync)"),
        ("optimizer_ms", "optimizer (+ weight sync)"))])
    ax.scatter(names, [r["exposed_sync_ms"] for r in rows], color="black", marker="_", s=300, zorder=3,
               label="exposed sync")
    ax.set_ylabel("ms per step (median)")
    ax.set_title("step time split")
    ax.legend()
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(out / "step_time.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    if all("peak_tensor_mib" in r for r in rows):
        fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
        points = [(r["step_ms"], r["peak_tensor_mib"], r["strategy"]) for r in rows]
        front = [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)]
        for t, m, name in points:
            ax.scatter(t, m, color="tab:red" if (t, m, name) in front else "tab:gray", zorder=3)
            ax.annotate(name, (t, m), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front.sort()
        ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", alpha=0.5,
                label="not beaten on both by any other strategy")
        ax.set_xlabel("step time, ms (median)")
        ax.set_ylabel("peak tensor memory per worker, MiB")
        ax.set_title("memory against time")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "memory_vs_time.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def write_report(out: Path, results: list[dict[str, Any]], args: dict[str, Any], command: str,
                 machine: dict[str, Any]) -> None:
    rows = [row for r in results if (row := summarize(r)) is not None]
    failed = [r["strategy"] for r in results if r["failed"]]
    (out / "bench.json").write_text(json.dumps({"command": command, "machine": machine, "args": args,
                                                "summary": rows, "results": results}, indent=1, default=str))
    text = markdown(rows, failed, args, command, machine)
    (out / "bench.md").write_text(text)
    pictures = charts(rows, out) if rows else []
    print(text)
    print("written: " + ", ".join(str(p) for p in [out / "bench.json", out / "bench.md", *pictures]))
