"""A sweep's results: mean, std and n over seeds per condition (``aggregate``), the markdown
table and the plots."""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import statistics
from pathlib import Path
from typing import Any

from ...plotting import pyplot
from ..jsonfile import strict_json
from .grid import MAIN_METRICS, SweepError, plain_value, same_config, toml_literal

# ---------------------------------------------------------------------------------------------
# aggregation: results.json, results.md and the plots



def _mean_coverage(coverage: float | list[float]) -> float:
    """A cell's coverage as one number: the mean of a per-worker list (a mixed fleet)."""
    return sum(coverage) / len(coverage) if isinstance(coverage, list) else float(coverage)

def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate(out_dir: str | Path) -> dict[str, Any]:
    """Read the complete cells listed in OUT/sweep.json, group them into conditions (cells without
    their seed), write results.json, results.md and the plots; return the results."""
    out = Path(out_dir)
    try:
        manifest = json.loads((out / "sweep.json").read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
        raise SweepError(f"{out}/sweep.json: not a sweep folder ({exc})") from None
    conditions: dict[tuple[int, str], dict[str, Any]] = {}
    machine = None
    for cell in manifest["cells"]:
        folder = out / "cells" / cell["id"]
        try:
            summary = json.loads((folder / "summary.json").read_text())
            metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
        except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8 text
            continue
        if not same_config(summary.get("config"), cell["config"]):
            continue
        machine = machine or summary.get("machine")
        config = json.loads(json.dumps(cell["config"]))
        config["run"].pop("seed")
        key = (cell["workers"], json.dumps(config, sort_keys=True))
        cond = conditions.setdefault(key, {
            "id": cell["condition"], "group": cell["group"], "strategy": summary.get("strategy"),
            "workers": cell["workers"], "overrides": {k: v for k, v in cell["overrides"].items()},
            "config": config, "seeds": [], "cells": [], "values": {}, "curves": [], "flops_per_step": []})
        cond["seeds"].append(cell["seed"])
        cond["cells"].append(cell["id"])
        figures = {k: v for k, v in (summary.get("final_eval") or {}).items() if k != "step" and _number(v)}
        figures.update({k: summary[k] for k in ("steps", "train_flops", "wall_s") if _number(summary.get(k))})
        for name, value in figures.items():
            cond["values"].setdefault(name, {"seeds": [], "values": []})
            cond["values"][name]["seeds"].append(cell["seed"])
            cond["values"][name]["values"].append(float(value))
        cond["curves"].append({m["step"]: m["loss"] for m in metrics if _number(m.get("loss"))})
        if _number(summary.get("train_flops_per_step")):
            cond["flops_per_step"].append(summary["train_flops_per_step"])

    rows = []
    for cond in conditions.values():
        cond["metrics"] = {name: {**_stats(v["values"]), **v} for name, v in cond.pop("values").items()}
        curves, fps = cond.pop("curves"), cond.pop("flops_per_step")
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        cond["loss_curve"] = {"step": steps, "loss": [statistics.fmean(c[s] for c in curves) for s in steps]}
        cond["train_flops_per_step"] = statistics.fmean(fps) if fps else None
        rows.append(cond)
    s = lambda c: c["config"]["strategy"]  # noqa: E731
    rows.sort(key=lambda c: (c["workers"], s(c)["name"] != "ddp", s(c)["level"], s(c)["masking"],
                             c["config"]["run"]["schedule"], _mean_coverage(s(c)["coverage"]), c["id"]))
    main_metric = next((m for m in ("accuracy", "val_loss") if any(m in c["metrics"] for c in rows)),
                       next((m for c in rows for m in c["metrics"]
                             if m not in ("steps", "train_flops", "wall_s")), None))
    for cond in rows:
        ddp = _matching_ddp(cond, rows)
        ours, theirs = cond["metrics"].get(main_metric), ddp and ddp["metrics"].get(main_metric)
        cond["vs_ddp"] = ours["mean"] - theirs["mean"] if ours and theirs and ddp is not cond else None
        cond["vs_ddp_condition"] = ddp["id"] if ddp else None
    if machine is None:
        import torch
        machine = {"host": socket.gethostname(), "cpus": os.cpu_count(), "torch": torch.__version__}
    results = {"sweep": manifest["sweep"], "name": manifest["name"], "command": manifest["command"],
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine,
               "main_metric": main_metric, "conditions": rows}
    (out / "results.json").write_text(strict_json(results, indent=1))  # a diverged cell's NaN as null
    (out / "results.md").write_text(results_markdown(results))
    if rows:
        plot_results(results, out)
    return results


def _matching_ddp(cond: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The DDP condition with the same N that shares most of this condition's other overrides."""
    if cond["config"]["strategy"]["name"] == "ddp":
        return cond
    def shared(other: dict[str, Any]) -> int:
        return sum(other["overrides"].get(k) == v for k, v in cond["overrides"].items()
                   if not k.startswith("strategy.") and k != "run.schedule")
    ddps = [r for r in rows if r["config"]["strategy"]["name"] == "ddp" and r["workers"] == cond["workers"]]
    return max(ddps, key=shared) if ddps else None


def _flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def results_markdown(results: dict[str, Any]) -> str:
    rows = results["conditions"]
    m = results["machine"] or {}
    lines = [f"# Sweep {results['name']}", "",
             f"- sweep file: `{results['sweep']}`", f"- command: `{results['command']}`",
             f"- machine: {m.get('host', '?')}, {m.get('cpus', '?')} CPUs, torch {m.get('torch', '?')}"
             + (f", {m['device']}" if m.get("device") else ""),
             f"- date: {results['date']}",
             f"- mean ± sample std over seeds (n = seeds); vs DDP: difference of the mean "
             f"{results['main_metric']} to DDP with the same N", ""]
    metrics = [k for k in MAIN_METRICS if any(k in r["metrics"] for r in rows)]
    header = ["strategy", "N", "schedule", *metrics, f"vs DDP ({results['main_metric']})", "steps",
              "train FLOPs", "wall", "condition"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        def fmt(name: str) -> str:
            x = r["metrics"].get(name)
            if x is None or x["mean"] is None or not math.isfinite(x["mean"]):
                return "" if x is None else "nan"
            return f"{x['mean']:.4f}" + (f" ± {x['std']:.4f}" if x["std"] is not None else "") + f" (n={x['n']})"
        g = lambda name: (r["metrics"].get(name) or {}).get("mean")  # noqa: E731
        steps, flops, wall = g("steps"), g("train_flops"), g("wall_s")
        cells = [r["strategy"] or "?", str(r["workers"]), r["config"]["run"]["schedule"], *(fmt(k) for k in metrics),
                 "" if r["vs_ddp"] is None else f"{r['vs_ddp']:+.4f}",
                 "" if steps is None else f"{steps:g}", "" if flops is None else _flops(flops),
                 "" if wall is None else (f"{wall:.1f} s" if wall < 120 else f"{wall / 60:.1f} min"), f"`{r['id']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every metric of every condition, with the per-seed values: results.json.", ""]
    return "\n".join(lines)


def plot_results(results: dict[str, Any], out: Path) -> list[Path]:
    """metric_vs_coverage.png, loss_by_step.png and (when summaries have train_flops_per_step)
    loss_by_flops.png."""
    plt = pyplot("the sweep's plots are")
    if plt is None:
        return []
    rows, metric, written = results["conditions"], results["main_metric"], []
    is_ddp = lambda r: r["config"]["strategy"]["name"] == "ddp"  # noqa: E731
    # overrides that differ between conditions, besides those already in the label
    known = {"strategy.name", "strategy.level", "strategy.masking", "strategy.coverage", "run.schedule"}
    keys = {k for r in rows for k in r["overrides"]} - known
    varying = sorted(k for k in keys if len({toml_literal(r["overrides"].get(k, "")) for r in rows}) > 1)
    extra = lambda r: "".join(f", {k.split('.')[-1]}={plain_value(r['overrides'].get(k, '-'))}" for k in varying)  # noqa: E731
    line = lambda r: ("DDP" if is_ddp(r) else f"{r['config']['strategy']['level'][0].upper()}-SDP "  # noqa: E731
                      f"{r['config']['strategy']['masking'][:3].replace('for', 'fwd').replace('bac', 'bwd')}, "
                      f"{r['config']['run']['schedule']}") + extra(r)
    ns = sorted({r["workers"] for r in rows})

    if metric and any(metric in r["metrics"] for r in rows):
        fig, axes = plt.subplots(1, len(ns), figsize=(5.5 * len(ns), 4.2), dpi=120, squeeze=False)
        for ax, n in zip(axes[0], ns):
            here = [r for r in rows if r["workers"] == n and metric in r["metrics"]]
            for i, r in enumerate(x for x in here if is_ddp(x)):
                mean, std = r["metrics"][metric]["mean"], r["metrics"][metric]["std"] or 0.0
                ax.axhline(mean, color=f"C{i}", ls="--", label=line(r))
                ax.axhspan(mean - std, mean + std, color=f"C{i}", alpha=0.15)
            lines: dict[str, list] = {}
            for r in here:
                if not is_ddp(r):
                    lines.setdefault(line(r), []).append(r)
            for i, (label, points) in enumerate(lines.items()):
                points.sort(key=lambda r: _mean_coverage(r["config"]["strategy"]["coverage"]))
                ax.errorbar([_mean_coverage(p["config"]["strategy"]["coverage"]) for p in points],
                            [p["metrics"][metric]["mean"] for p in points],
                            yerr=[p["metrics"][metric]["std"] or 0.0 for p in points],
                            marker="o", capsize=3, color=f"C{i + 3}", label=label)
            ax.set(xlabel="coverage C", ylabel=metric, title=f"N = {n}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{results['name']}: {metric} (mean ± std over seeds)")
        fig.tight_layout()
        written.append(out / "metric_vs_coverage.png")
        fig.savefig(written[-1])
        plt.close(fig)

    for name, per_flops in (("loss_by_step.png", False), ("loss_by_flops.png", True)):
        curves = [r for r in rows if r["loss_curve"]["step"] and (not per_flops or r["train_flops_per_step"])]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
        for r in curves:
            x = [s * (r["train_flops_per_step"] if per_flops else 1) for s in r["loss_curve"]["step"]]
            label = line(r) if is_ddp(r) else f"{r['strategy']}, {r['config']['run']['schedule']}" + extra(r)
            ax.plot(x, r["loss_curve"]["loss"], label=label + (f", N={r['workers']}" if len(ns) > 1 else ""),
                    ls="--" if is_ddp(r) else "-")
        ax.set(xlabel="training FLOPs" if per_flops else "optimizer step", ylabel="training loss (mean over seeds)",
               title=results["name"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1])
        plt.close(fig)
    return written
