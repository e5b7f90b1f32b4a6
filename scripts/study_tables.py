"""The tables of docs/results.md, from the study's committed sweep results.

    python scripts/study_tables.py                      # every table, markdown, to stdout
    python scripts/study_tables.py --results results    # another results folder

Reads results/<sweep>/results.json (written by `subnetdp sweep`) and results/alignment/*.json
(written by `subnetdp align`); prints one markdown table per question of the study. A condition
that has not run yet is left out of its table, so the script works on a partial study.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SWEEPS = {"resnet18_fashion_mnist": ("ResNet-18 w8, Fashion-MNIST", "accuracy", "test accuracy (%)", 100.0),
          "vit_fashion_mnist": ("ViT tiny, Fashion-MNIST", "accuracy", "test accuracy (%)", 100.0),
          "llama_shakespeare": ("LLaMA 4L d128, Shakespeare (chars)", "val_loss", "validation loss", 1.0)}


def _fmt(stat: dict[str, Any] | None, scale: float, digits: int) -> str:
    if not stat:
        return ""
    mean = f"{stat['mean'] * scale:.{digits}f}"
    if stat.get("std") is None or stat["n"] < 2:
        return mean
    return f"{mean} ± {stat['std'] * scale:.{digits}f} (n={stat['n']})"


def _label(cond: dict[str, Any]) -> str:
    s, run = cond["config"]["strategy"], cond["config"]["run"]
    if s["name"] == "ddp":
        label = "DDP" + (f" + stochastic depth {s['stochastic_depth']:g}" if s.get("stochastic_depth") else "")
        label += f" + dropout {cond['config']['model']['dropout']:g}" if cond["config"]["model"].get("dropout") else ""
        return label + f", {run['steps']} steps"
    level, masking = ("B" if s["level"] == "block" else "N"), ("fwd" if s["masking"] == "forward" else "bwd")
    label = f"{level}-SDP {masking} C={s['coverage']:g}"
    extras = [f"{run['schedule']}-matched"]
    if s.get("scale") != "none":
        extras.append(f"scale {s['scale']}")
    if s.get("plan_seed"):
        extras.append(f"plan seed {s['plan_seed']}")
    if s.get("redraw_every"):
        extras.append(f"re-drawn every {s['redraw_every']}")
    if s.get("full_phase"):
        # runs from before issue 18 have no full_phase_shard key: their full phase was replicated
        how = "sharded" if s.get("full_phase_shard", False) else "replicated"
        how += " + ckpt" if s.get("full_phase_checkpointing") else ""
        how += ", scaled start" if s.get("full_phase_start") == "scaled" else ""
        extras.append(f"full phase {s['full_phase']:g} {how}")
    depth = cond["config"]["model"].get("n_layers")
    return f"{label} ({', '.join(extras)})" + (f", {depth} layers" if depth and depth != 4 else "")


def _flops(value: float | None) -> str:
    return "" if value is None else f"{value / 1e12:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, without the columns that are empty in every row."""
    keep = [i for i in range(len(header)) if i < 2 or any(r[i] for r in rows)]
    header, rows = [header[i] for i in keep], [[r[i] for i in keep] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def inference_table(results: dict[str, Any], folder: Path) -> str:
    """Forward FLOPs per sample of each view, read from one cell's summary.json per condition."""
    rows = []
    for cond in results["conditions"]:
        if cond["config"]["strategy"]["name"] != "sdp":
            continue
        summary = json.loads((folder / "cells" / cond["cells"][0] / "summary.json").read_text())
        flops = summary.get("inference_flops_per_sample") or {}
        if "subnetwork" not in flops:  # a run that ended with the full model has one view only
            continue
        rows.append([_label(cond), f"{cond['workers']}"] + [
            f"{flops[k] / 1e6:.2f}" if k in flops else "" for k in ("assembled", "subnetwork", "ensemble")])
    return _table(["run", "N", "assembled", "one subnetwork", "ensemble of N"], rows)


def views_table(results: dict[str, Any], metric: str, scale: float, digits: int,
                keep: Any = lambda c: True) -> str:
    """Assembled (unscaled, x k/N, each BN re-estimated), each subnetwork, ensemble: mean ± std."""
    rows = []
    # DDP first, then its regularised variants, then SDP (a stable sort keeps the sweep's order)
    ordered = sorted(results["conditions"], key=lambda c: (
        c["workers"], c["config"]["strategy"]["name"] != "ddp", bool(c["config"]["strategy"].get("stochastic_depth")),
        bool(c["config"]["model"].get("dropout"))))
    for cond in ordered:
        if not keep(cond):
            continue
        m = dict(cond["metrics"])
        if cond["config"]["strategy"].get("masking") == "backward":  # full forward: no branch to scale
            m = {k: v for k, v in m.items() if not k.startswith("scaled_")}
        rows.append([_label(cond), f"{cond['workers']}",
                     _fmt(m.get(metric), scale, digits), _fmt(m.get(f"{metric}_recalibrated"), scale, digits),
                     _fmt(m.get(f"scaled_{metric}"), scale, digits),
                     _fmt(m.get(f"scaled_{metric}_recalibrated"), scale, digits),
                     _fmt(m.get(f"subnet_{metric}_mean"), scale, digits),
                     _fmt(m.get(f"ensemble_{metric}"), scale, digits),
                     _flops(m.get("train_flops", {}).get("mean"))])
    header = ["run", "N", "assembled", "assembled, BN re-est.", "assembled x k/N", "x k/N, BN re-est.",
              "subnetwork (mean of N)", "ensemble of N", "train TFLOP"]
    return _table(header, rows)


def alignment_table(path: Path) -> str:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "cosine" in r]
    steps = sorted({r["step"] for r in rows})
    variants = sorted({(r["level"], r["masking"], r["coverage"]) for r in rows})
    out = []
    for level, masking, coverage in variants:
        cells = {r["step"]: r for r in rows if (r["level"], r["masking"], r["coverage"]) == (level, masking, coverage)}
        out.append([level, masking, f"{coverage:g}"] + [
            f"{cells[s]['cosine']:.3f} ({cells[s]['norm_ratio']:.2f})" if s in cells else "" for s in steps])
    return _table(["level", "masking", "C"] + [f"step {s}" for s in steps], out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="the study's results folder (default results)")
    args = parser.parse_args(argv)
    root = Path(args.results)
    for name, (title, metric, unit, scale) in SWEEPS.items():
        path = root / name / "results.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        digits = 2 if scale == 100.0 else 3
        print(f"### {title}: {unit}, mean ± std over seeds\n")
        print(views_table(results, metric, scale, digits))
        print(f"\n{title}: forward MFLOP per sample of each view (inference cost)\n")
        print(inference_table(results, root / name))
        print()
    for path in sorted((root / "alignment").glob("*.json")):
        print(f"### gradient alignment: {path.stem} (cosine to DDP's gradient, norm ratio |g_SDP|/|g_DDP|)\n")
        print(alignment_table(path))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
