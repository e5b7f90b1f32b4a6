"""What one SDP run yields: the assembled model, each worker's subnetwork and their ensemble,
each with its accuracy (or loss), parameters, inference FLOPs and measured CPU latency, so a user
can pick the model that fits a deployment budget (`subnetdp report RUN`).

    subnetdp report runs/r18 --out runs/r18-report       # models.md, models.json, models.png

Every figure is measured here, on the run's checkpoint (the newest complete one, or --step):
- accuracy / loss: each model evaluated on the run's held-out split as its final evaluation
  covers it ([eval] max_batches). The subnetworks and the ensemble are the standalone models that
  `subnetdp export --subnetwork / --ensemble` writes; the assembled model is ``full_state_dict()``
  loaded into the plain model, as trained, with branches x k/N (B-SDP trained unscaled), and with
  norm statistics re-estimated where the run's [eval] re-estimates them;
- parameters: the model's tensors (zero-padded units included, see subnetdp/export);
- FLOPs per example: torch's FlopCounterMode on one forward;
- latency: the median wall-clock of a forward at batch 1, and per example at --batch, with
  --threads CPU threads (default 1).
Where the run's summary.json recorded the same figures (its final evaluation at this step), they
are shown beside, and a difference is a warning.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ...engine import fold_residual_scale, recalibrate_norm_statistics
from ...export import Ensemble
from ...measure.inference import InferenceCost, inference_cost
from ...plotting import pyplot
from ..runtime import autocast, machine_info
from .evaluation import eval_cap
from .subnetworks import RunWorkers, load_run_workers


def _main_metric(kind: str) -> tuple[str, bool]:
    """The metric a deployment picks by, and whether higher is better."""
    return ("accuracy", True) if kind == "classification" else ("val_loss", False)


def _assembled_views(run: RunWorkers) -> list[tuple[str, str, nn.Module]]:
    """(name, the run's final_eval key prefix / suffix, model) of the assembled model's variants."""
    config, task = run.config, run.task
    state = run.simulator.full_state_dict()
    views = []
    plain = task.make_model()
    plain.load_state_dict(state, strict=True)
    views.append(("assembled", "", plain.eval()))
    s = config.section("strategy")
    if s["level"] == "block" and s["masking"] == "forward" and s["scale"] == "none":
        scaled = task.make_model()
        scaled.load_state_dict(state, strict=True)
        fold_residual_scale(scaled, task.blocks, run.simulator.plan.k / run.simulator.plan.world_size)
        views.append((f"assembled, branches x {run.simulator.plan.k}/{run.simulator.plan.world_size}", "scaled_",
                      scaled.eval()))
    count = config["eval.recalibrate_norm_batches"]
    if count and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules()):
        for name, prefix, model in list(views):
            again = task.make_model()
            again.load_state_dict(model.state_dict(), strict=True)
            batches = task.data.calibration_batches(count, config["data.batch_size"], config["run.seed"])
            recalibrate_norm_statistics(again, batches)
            views.append((f"{name}, BN re-estimated", prefix + "|_recalibrated", again.eval()))
    return views


def _recorded(run: RunWorkers, key: str, metric: str) -> float | None:
    """The run's own figure of ``metric`` for the view ``key`` (summary.json at this step)."""
    summary = run.summary()
    if summary is None:
        return None
    final = summary.get("final_eval") or {}
    if key.startswith("subnet:"):
        per_worker = summary.get("final_subnet_by_worker")
        return per_worker[int(key[7:])].get(metric) if per_worker else None
    if key == "ensemble":
        return final.get(f"ensemble_{metric}")
    prefix, _, suffix = key.partition("|")
    return final.get(f"{prefix}{metric}{suffix}")


@torch.no_grad()
def _evaluate(run: RunWorkers, assembled: list[nn.Module], members: list[nn.Module], progress: bool
              ) -> tuple[list[dict[str, float]], list[dict[str, float]], dict[str, float]]:
    """Every model on the run's held-out split, in one pass: the members' logits serve the ensemble too."""
    config, task = run.config, run.task
    cap = eval_cap(config, final=True)
    size = config["eval.batch_size"]
    sums = torch.zeros(len(assembled) + len(members) + 1, 3, dtype=torch.float64)
    device = torch.device("cpu")
    with tqdm(total=task.eval_batch_count(size, 0, 1, cap), desc="evaluating every model", unit="batch",
              disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for x, y in task.eval_batches(size, 0, 1, cap):
            with autocast(config["run.autocast"], device):
                outs = [m(x).float() for m in assembled] + [m(x).float() for m in members]
            for i, out in enumerate(outs):
                sums[i] += torch.tensor(task.eval_sums(out, y), dtype=torch.float64)
            log_mean = Ensemble.combine(outs[len(assembled):])  # the members' logits, computed once
            sums[-1] += torch.tensor(task.eval_sums(log_mean, y), dtype=torch.float64)
            bar.update(1)
    figures = [task.eval_metrics(*row.tolist()) for row in sums]
    return figures[:len(assembled)], figures[len(assembled):-1], figures[-1]


def models_report(run_dir: Path, step: int | None = None, batch: int = 64, repeats: int = 20,
                  threads: int = 1, progress: bool = True) -> dict[str, Any]:
    """Measure every model ``run_dir``'s checkpoint yields (module docstring); returns the report."""
    run = load_run_workers(run_dir, step)
    task = run.task
    views = _assembled_views(run)
    subs = [run.standalone(r) for r in range(run.world_size)]
    members = [s.model for s in subs]
    assembled_figures, member_figures, ensemble_figures = _evaluate(run, [m for _, _, m in views], members, progress)
    example = task.example_input
    metric, higher = _main_metric(task.kind)
    rows: list[dict[str, Any]] = []

    def add(name: str, key: str, figures: dict[str, float], cost: InferenceCost, padded: int = 0) -> None:
        recorded = _recorded(run, key, metric)
        rows.append({"model": name, "key": key, "figures": figures, "recorded": recorded, **asdict(cost),
                     "padded_units": padded})

    jobs = [("assembled", views[0][2])] + [(f"subnetwork {r}", m) for r, m in enumerate(members)] \
        + [("ensemble", Ensemble(members))]
    costs = {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the timings only: evaluation above used every thread it had
    try:
        for name, model in tqdm(jobs, desc="timing", unit="model", disable=not progress, leave=False):
            costs[name] = inference_cost(model, example, batch=batch, repeats=repeats)
    finally:
        torch.set_num_threads(before)
    for (name, key, _), figures in zip(views, assembled_figures):
        add(name, key, figures, costs["assembled"])
    for r, (sub, figures) in enumerate(zip(subs, member_figures)):
        add(f"subnetwork {r}", f"subnet:{r}", figures, costs[f"subnetwork {r}"], sum(sub.padded_units.values()))
    add(f"ensemble of {run.world_size}", "ensemble", ensemble_figures, costs["ensemble"])
    mismatches = [r for r in rows if r["recorded"] is not None
                  and not math.isclose(r["recorded"], r["figures"][metric], rel_tol=1e-5, abs_tol=1e-6)]
    for r in mismatches:
        print(f"warning: {r['model']}: {metric} {r['figures'][metric]:.6f} here, {r['recorded']:.6f} in the run's "
              "summary.json", file=sys.stderr)
    return {"run": str(run_dir), "step": run.step, "strategy": run.manifest["strategy"], "workers": run.world_size,
            "task": task.kind, "metric": metric, "higher_is_better": higher, "batch": batch, "repeats": repeats,
            "threads": threads, "eval_examples": task.data.eval_size(run.config["eval.batch_size"],
                                                                      eval_cap(run.config, final=True)),
            "rows": rows, "matches_run": not mismatches, "machine": machine_info(torch.device("cpu"))}


def models_table(report: dict[str, Any]) -> str:
    """The report as a markdown table."""
    metric = report["metric"]
    second = "test_loss" if metric == "accuracy" else "perplexity"
    header = (f"| model | {metric} | {second} | parameters | FLOPs / example | latency, batch 1 (ms) | "
              f"ms / example, batch {report['batch']} |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        f = r["figures"]
        lines.append(f"| {r['model']} | {f[metric]:.4f} | {f[second]:.4f} | {r['params']:,} | "
                     f"{r['flops_per_example'] / 1e6:,.2f} M | {r['latency_ms']:.2f} | {r['ms_per_example']:.3f} |")
    return "\n".join(lines)


def plot_models(report: dict[str, Any], path: Path) -> Path | None:
    """The metric against latency per example, one point per model (None without matplotlib)."""
    plt = pyplot("the models chart is")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for r in report["rows"]:
        kind = "ensemble" if r["key"] == "ensemble" else "subnetwork" if r["key"].startswith("subnet:") else "assembled"
        marker = {"assembled": "s", "subnetwork": "o", "ensemble": "*"}[kind]
        ax.scatter(r["ms_per_example"], r["figures"][report["metric"]], marker=marker,
                   s=90 if kind == "ensemble" else 40, label=kind,
                   color={"assembled": "C0", "subnetwork": "C1", "ensemble": "C2"}[kind])
        if kind == "subnetwork" and r["key"] != "subnet:0":
            continue  # the subnetworks sit close together: one label for all of them
        label = f"{report['workers']} subnetworks" if kind == "subnetwork" else r["model"]
        ax.annotate(label, (r["ms_per_example"], r["figures"][report["metric"]]), fontsize=7, xytext=(6, 3),
                    textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys())
    ax.set_xlabel(f"ms per example, batch {report['batch']}, {report['threads']} CPU thread(s)")
    ax.set_ylabel(report["metric"] + (" (higher is better)" if report["higher_is_better"] else " (lower is better)"))
    ax.set_title(f"what one run yields: {report['strategy']}, step {report['step']}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_models_report(report: dict[str, Any], out: Path, command: str) -> list[Path]:
    """models.json, models.md (the command, the machine, the table) and models.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "models.json").write_text(json.dumps({"command": command, **report}, indent=1))
    machine = report["machine"]
    text = (f"# What one run yields\n\n`{command}`\n\nRun `{report['run']}`, checkpoint step {report['step']}, "
            f"{report['strategy']}, {report['workers']} workers. Each model evaluated here on "
            f"{report['eval_examples']} held-out examples; latency on {machine['platform']} "
            f"({machine['cpus']} CPUs) with "
            f"{report['threads']} thread(s), torch {machine['torch']}, median of {report['repeats']} "
            "forwards.\n\n" + models_table(report) + "\n")
    if not report["matches_run"]:
        text += "\nSome figures differ from the run's summary.json (see models.json: recorded).\n"
    (out / "models.md").write_text(text)
    written = [out / "models.md", out / "models.json"]
    plot = plot_models(report, out / "models.png")
    if plot is not None:
        written.append(plot)
    return written
