"""Side-by-side tables and loss plots of finished runs (their summary.json and metrics.jsonl).

    from subnetdp.app.report import comparison_table, plot_losses
    print(comparison_table([Path("runs/demo/ddp"), Path("runs/demo/sdp")]))
    plot_losses([Path("runs/demo/ddp"), Path("runs/demo/sdp")], Path("runs/demo/loss.png"))
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..plotting import pyplot

MiB = 2 ** 20


class RunReadError(ValueError):
    """A run folder whose summary.json or metrics.jsonl cannot be read; the message names it."""


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary.json, the records of metrics.jsonl) of a finished run; RunReadError when either is
    not UTF-8 JSON of the expected shape."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RunReadError(f"{run_dir}: cannot read its summary.json and metrics.jsonl: {exc}") from None
    if not isinstance(summary, dict) or not all(isinstance(m, dict) for m in metrics):
        raise RunReadError(f"{run_dir}: summary.json or metrics.jsonl is not what `subnetdp train` writes")
    return summary, metrics


def _rows(summary: dict[str, Any]) -> dict[str, str]:
    ranks = summary["per_rank"]
    final = summary["final_eval"] or {}
    largest = lambda key: max(r.get(key) or 0 for r in ranks) / MiB  # noqa: E731
    row = {"strategy": summary["strategy"], "steps": str(summary["steps"])}
    for key, label in (("accuracy", "test acc"), ("accuracy_recalibrated", "acc, BN re-est."),
                       ("val_loss", "val loss"), ("perplexity", "val ppl")):
        if key in final:
            row[label] = f"{final[key]:.4f}" if "acc" in key else f"{final[key]:.3f}"
    row.update({
        "params MiB": f"{largest('trainable_param_bytes'):.2f}",
        "grads MiB": f"{largest('grad_bytes'):.2f}",
        "optim MiB": f"{largest('optimizer_state_bytes'):.2f}",
        "peak RSS MiB": f"{largest('peak_rss_bytes_training'):.0f}",
    })
    if any("cuda_max_allocated_bytes" in r for r in ranks):
        row["CUDA peak MiB"] = f"{largest('cuda_max_allocated_bytes'):.0f}"
    comm = [r["comm_bytes_per_step"] for r in ranks if r["comm_bytes_per_step"] is not None]
    row["comm MiB/step"] = f"{statistics.mean(comm) / MiB:.2f}" if comm else "simulated"
    row["step ms"] = f"{summary['median_step_s'] * 1000:.1f}"
    return row


def comparison_table(run_dirs: list[Path]) -> str:
    """A markdown table, one row per run; memory is the largest over ranks (per worker)."""
    rows = [_rows(read_run(d)[0]) for d in run_dirs]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(r.get(c, "") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_losses(run_dirs: list[Path], path: Path, title: str = "training loss") -> Path | None:
    """Training loss against step (and the evaluation points) of each run, one PNG (None without
    matplotlib)."""
    plt = pyplot("the loss curves are")
    if plt is None:
        return None

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    for run_dir in run_dirs:
        summary, metrics = read_run(run_dir)
        train = [m for m in metrics if "loss" in m]
        label = f"{summary['strategy']}, {summary['steps']} steps"
        by_step.plot([m["step"] for m in train], [m["loss"] for m in train], label=label)
        by_time.plot([m["time_s"] for m in train], [m["loss"] for m in train], label=label)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("wall-clock seconds since start (set-up and evaluation included)")
    by_step.set_ylabel("training loss (mean over workers)")
    by_step.set_yscale("log")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
