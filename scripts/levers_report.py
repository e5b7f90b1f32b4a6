"""Issue 18's tables and Pareto chart: one model as good as DDP's, inside SDP's memory.

    python scripts/levers_report.py                                  # markdown tables to stdout
    python scripts/levers_report.py --plot docs/levers_pareto.png    # and the chart

For each study task, every lever cell of the sweep (results/<task>/results.json, written by
`subnetdp sweep`) against DDP: the assembled model (as exported, and its best evaluation: as is,
branches x k/N, BatchNorm re-estimated), the subnetworks and their ensemble, the training FLOPs
over DDP's, and the measured whole-run peak memory per worker over DDP's. Memory comes from
results/memory/<task>/<recipe>/summary.json (scripts/memory_per_worker.sh: a few steps of the
same model, batch and recipe; memory does not depend on the run's length).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from study_tables import SWEEPS, _label, _table

# the lever groups of each sweep file, in the order the tables show them
GROUPS = ["ddp", "b-fwd", "redraw", "full-phase", "safe-full-phase", "redraw-full-phase", "full-phase-neuron",
          "safe-full-phase-neuron", "safe-full-phase-0.2", "fwd-coverage"]
LONG = ["long", "long-sdp", "long-neuron"]  # lever 5: the same at 4x the budget
NO_BATCHNORM = {"vit_fashion_mnist", "llama_shakespeare"}  # recomputation changes nothing there
# the chart's points (the tables have every cell)
CHARTED = {"DDP", "DDP + ckpt", "B-SDP", "B-SDP re-draw/10", "B-SDP + full replicated", "B-SDP + full sharded, scaled",
           "B-SDP re-draw/10 + full sharded", "B-SDP re-draw/10 + full sharded, scaled", "N-SDP + full sharded",
           "N-SDP + full sharded + ckpt", "N-SDP + full replicated"}


def memory_recipe(config: dict[str, Any]) -> str:
    """The scripts/memory_per_worker.sh recipe that measures this run's memory."""
    s = config["strategy"]
    if s["name"] == "ddp":
        return "ddp-ckpt" if s.get("checkpointing") else "ddp"
    name = ("b" if s["level"] == "block" else "n") + "-sdp"
    if s.get("shard"):
        name += "-shard"
    if s.get("redraw_every"):
        name += "-redraw"
    if s.get("full_phase"):
        if not s.get("full_phase_shard", False):
            name += "-full-replicated" if s.get("full_phase_checkpointing") else "-full-ddp"
        else:
            name += "-full-sharded"
    return name


def short_label(config: dict[str, Any]) -> str:
    """A few words for the chart: the level and the levers."""
    s = config["strategy"]
    if s["name"] == "ddp":
        return "DDP"
    words = ["B-SDP" if s["level"] == "block" else "N-SDP"]
    if s.get("redraw_every"):
        words.append(f"re-draw/{s['redraw_every']}")
    if s.get("full_phase"):
        words.append("+ full" + (" sharded" if s.get("full_phase_shard", False) else " replicated")
                     + (", scaled" if s.get("full_phase_start") == "scaled" else ""))
    return " ".join(words)


def _memory(root: Path, task: str, recipe: str) -> dict[str, Any] | None:
    path = root / "memory" / task / recipe / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("peak_memory_per_worker")


def _best_assembled(metrics: dict[str, Any], metric: str, lower: bool) -> tuple[float | None, str]:
    """The best evaluation of the assembled model, and which one it is."""
    views = {"as is": metric, "BN re-est.": f"{metric}_recalibrated", "x k/N": f"scaled_{metric}",
             "x k/N, BN re-est.": f"scaled_{metric}_recalibrated"}
    found = {name: metrics[key]["mean"] for name, key in views.items() if key in metrics}
    if not found:
        return None, ""
    name = (min if lower else max)(found, key=found.get)
    return found[name], name


def _compared(cond: dict[str, Any], groups: list[str]) -> bool:
    """A condition of the lever table: DDP itself, or SDP at C = 0.5, forward, FLOP-matched, N = 4."""
    s, run = cond["config"]["strategy"], cond["config"]["run"]
    if cond["group"] not in groups or cond["workers"] != 4:
        return False
    if s["name"] == "ddp":
        return cond["group"] in ("ddp", "long")
    return s["coverage"] == 0.5 and run["schedule"] == "flops" and s["masking"] == "forward"


def rows_for(task: str, root: Path, groups: list[str] = GROUPS
             ) -> tuple[list[list[str]], list[dict[str, Any]]]:
    title, metric, _, scale = SWEEPS[task]
    lower = metric.endswith("loss")
    results = json.loads((root / task / "results.json").read_text())
    conditions = [c for c in results["conditions"] if _compared(c, groups)]
    if not any(c["config"]["strategy"]["name"] == "ddp" for c in conditions):
        return [], []
    conditions.sort(key=lambda c: groups.index(c["group"]))
    ddp = next(c for c in conditions if c["config"]["strategy"]["name"] == "ddp")
    ddp_flops = ddp["metrics"]["train_flops"]["mean"]
    ddp_memory = _memory(root, task, "ddp")
    digits = 2 if scale == 100.0 else 3
    rows, points = [], []
    for cond in conditions:
        m = cond["metrics"]

        def fmt(key: str) -> str:
            stat = m.get(key)
            if not stat:
                return ""
            text = f"{stat['mean'] * scale:.{digits}f}"
            return text + (f" ± {stat['std'] * scale:.{digits}f} (n={stat['n']})" if stat.get("n", 1) > 1 else "")

        best, which = _best_assembled(m, metric, lower)
        memory = _memory(root, task, memory_recipe(cond["config"]))
        ratio = memory["whole_run"] / ddp_memory["training"] if memory and ddp_memory else None
        phase = (memory["full_phase"] / memory["sdp_phase"] if memory and "full_phase" in memory
                 and "sdp_phase" in memory else None)
        rows.append([_label(cond), fmt(metric), "" if best is None else f"{best * scale:.{digits}f} ({which})",
                     fmt(f"subnet_{metric}_mean"), fmt(f"ensemble_{metric}"),
                     f"{m['train_flops']['mean'] / ddp_flops:.2f}x",
                     "" if ratio is None else f"{ratio:.2f}x", "" if phase is None else f"{phase:.2f}x"])
        points.append({"label": short_label(cond["config"]), "metric": best, "memory": ratio,
                       "ddp": cond["config"]["strategy"]["name"] == "ddp"})
        recipe = memory_recipe(cond["config"])
        ckpt_memory = _memory(root, task, recipe.replace("-sdp", "-sdp-ckpt", 1))
        if task in NO_BATCHNORM and recipe.endswith("-full-sharded") and ckpt_memory and ddp_memory:
            # checkpointing in both phases: the same updates (tests/app/test_train_levers.py), so the
            # same model; only the memory is another run's
            ratio = ckpt_memory["whole_run"] / ddp_memory["training"]
            phase = ckpt_memory["full_phase"] / ckpt_memory["sdp_phase"]
            rows.append(["... with strategy.checkpointing = true (the same updates)", "", "", "", "",
                         rows[-1][5], f"{ratio:.2f}x", f"{phase:.2f}x"])
            points.append({"label": short_label(cond["config"]) + " + ckpt", "metric": best, "memory": ratio,
                           "ddp": False})
    ckpt = _memory(root, task, "ddp-ckpt")
    if ckpt and ddp_memory:  # DDP with activation checkpointing trains exactly as DDP
        ddp_best = _best_assembled(ddp["metrics"], metric, lower)[0]
        points.append({"label": "DDP + ckpt", "metric": ddp_best,
                       "memory": ckpt["training"] / ddp_memory["training"], "ddp": True})
    return rows, points


def plot(all_points: dict[str, list[dict[str, Any]]], out: Path, root: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_points), figsize=(5.5 * len(all_points), 5))
    for ax, (task, points) in zip(axes if len(all_points) > 1 else [axes], all_points.items()):
        title, metric, unit, scale = SWEEPS[task]
        shown: set[str] = set()
        for p in points:
            if p["metric"] is None or p["memory"] is None or p["label"] not in CHARTED or p["label"] in shown:
                continue
            shown.add(p["label"])
            ax.scatter(p["memory"], p["metric"] * scale, color="black" if p["ddp"] else "tab:blue",
                       marker="s" if p["ddp"] else "o")
            below = len(shown) % 2 == 0  # alternate sides: neighbours' labels overlap less
            ax.annotate(p["label"], (p["memory"], p["metric"] * scale), fontsize=7, xytext=(4, -9 if below else 3),
                        textcoords="offset points")
        ax.set_xlabel("whole-run peak memory per worker / DDP's")
        ax.set_xlim(0.3, 1.25)
        ax.set_ylabel(f"assembled model, best evaluation: {unit}")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("One model from one run, C = 0.5, FLOP-matched, N = 4: the assembled model's best evaluation "
                 "against measured peak memory per worker (live tensors, CPU). Better: left, and up (accuracy) or "
                 "down (loss)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="the study's results folder (default results)")
    parser.add_argument("--plot", type=Path, help="write the Pareto chart (PNG) here")
    args = parser.parse_args(argv)
    root = Path(args.results)
    all_points = {}
    for task, (title, metric, unit, _) in SWEEPS.items():
        if not (root / task / "results.json").is_file():
            continue
        header = ["run", "assembled (as exported)", "assembled, best evaluation", "subnetwork (mean of N)",
                  "ensemble of N", "train FLOPs / DDP", "peak memory / DDP", "full phase / SDP phase peak"]
        rows, all_points[task] = rows_for(task, root)
        print(f"### {title}: {unit}, C = 0.5, FLOP-matched, N = 4\n")
        print(_table(header, rows))
        print()
        rows, _ = rows_for(task, root, LONG)
        if rows:
            print(f"{title}, at 4x the budget (one seed)\n")
            print(_table(header, rows))
            print()
    if args.plot:
        plot(all_points, args.plot, root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
