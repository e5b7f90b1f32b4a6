"""The README's and docs/deploy.md's tables of what one run yields, from the committed
results/deploy/<task>/models.json (written by `subnetdp report`); tests/app/test_export_subnetworks.py
checks that both documents show exactly these tables.

    python scripts/deploy_tables.py            # prints the README's table, then each task's full table
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = [("resnet18_fashion_mnist", "ResNet-18 w8, Fashion-MNIST"), ("vit_fashion_mnist", "ViT tiny, Fashion-MNIST"),
         ("llama_shakespeare", "LLaMA 4 layers, Shakespeare chars")]

sys.path.insert(0, str(ROOT))
from subnetdp.app.train.yields import models_table  # noqa: E402


def load(task: str) -> dict:
    return json.loads((ROOT / "results" / "deploy" / task / "models.json").read_text())


def _metric(report: dict, value: float) -> str:
    return f"{100 * value:.2f} %" if report["metric"] == "accuracy" else f"{value:.3f}"


def summary_table() -> str:
    """One row per task: the best assembled variant, the subnetworks (mean, and range) and the
    ensemble, each with its metric, parameters and latency per example."""
    lines = ["| task (metric) | assembled model, best variant | each subnetwork: mean (range) | ensemble of the 4 |",
             "|---|---|---|---|"]
    for task, label in TASKS:
        report = load(task)
        rows, metric, better = report["rows"], report["metric"], max if report["higher_is_better"] else min
        assembled = [r for r in rows if r["key"] not in ("ensemble",) and not r["key"].startswith("subnet:")]
        best = better(assembled, key=lambda r: r["figures"][metric])
        subs = [r for r in rows if r["key"].startswith("subnet:")]
        ensemble = next(r for r in rows if r["key"] == "ensemble")
        values = [r["figures"][metric] for r in subs]

        def cost(r: dict) -> str:
            return f"{r['params'] / 1e3:,.0f}k params, {r['ms_per_example']:.3f} ms"

        sub_cost = (f"{statistics.fmean(r['params'] for r in subs) / 1e3:,.0f}k params, "
                    f"{statistics.fmean(r['ms_per_example'] for r in subs):.3f} ms")
        lines.append(f"| {label} ({metric.replace('_', ' ')}) | {_metric(report, best['figures'][metric])} "
                     f"({best['model'].removeprefix('assembled, ') if best['model'] != 'assembled' else 'as trained'}"
                     f"; {cost(best)}) | {_metric(report, statistics.fmean(values))} "
                     f"({_metric(report, min(values))} to {_metric(report, max(values))}; {sub_cost}) | "
                     f"{_metric(report, ensemble['figures'][metric])} ({cost(ensemble)}) |")
    return "\n".join(lines)


def full_tables() -> dict[str, str]:
    return {task: models_table(load(task)) for task, _ in TASKS}


if __name__ == "__main__":
    print(summary_table())
    for task, table in full_tables().items():
        print(f"\n{task}\n\n{table}")
