"""Worker-count scaling from `subnetdp bench` runs at several N: per-worker peak memory, bytes on
the wire and step time, each as a ratio to DDP at the same N, one line per strategy.

    python scripts/plot_scaling.py benchmarks/scaling-cpu/n2 benchmarks/scaling-cpu/n4 \\
        benchmarks/scaling-cpu/n8 --out benchmarks/scaling-cpu/scaling.png

Each folder holds one bench.json. Runs whose coverage is 2/N (k = 2 holders at every N) are also
joined into one line, "...@2/N".
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("peak_tensor_mib", "peak tensor memory / DDP"), ("wire_mib_per_step", "bytes on the wire / DDP"),
          ("step_ms", "step time / DDP"))


def labels(strategy: str, workers: int) -> list[str]:
    """The lines a run belongs to: its own name, and "...@2/N" when its coverage is 2/N (k = 2
    holders at every N; at N = 4 a C = 0.5 run is on both lines)."""
    match = re.fullmatch(r"(.*)@([0-9.]+)", strategy)
    if match and workers > 2 and abs(float(match.group(2)) - 2 / workers) < 1e-9:
        return [strategy, f"{match.group(1)}@2/N"]
    return [strategy]


def ratios(folders: list[Path]) -> dict[str, dict[int, dict[str, float]]]:
    """{line: {N: {figure: ratio to DDP at N}}} over the folders' bench.json files."""
    lines: dict[str, dict[int, dict[str, float]]] = {}
    for folder in folders:
        bench = json.loads((folder / "bench.json").read_text())
        workers = bench["args"]["workers"]
        rows = {r["strategy"]: r for r in bench["summary"]}
        if "ddp" not in rows:
            raise SystemExit(f"{folder}: no ddp row to take ratios against")
        ddp = rows["ddp"]
        for name, row in rows.items():
            for line in labels(name, workers) if name != "ddp" else []:
                lines.setdefault(line, {})[workers] = {
                    key: row[key] / ddp[key] if ddp[key] else float("nan") for key, _ in PANELS}
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="bench output folders, one per worker count")
    parser.add_argument("--out", type=Path, required=True, help="the png to write")
    args = parser.parse_args(argv)
    lines = ratios(args.folders)
    # a strategy run at one N only (e.g. C = 0.25 at N = 8) is drawn on its "@2/N" line
    lines = {name: by_n for name, by_n in lines.items() if len(by_n) > 1} or lines
    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4.5))
    for ax, (key, title) in zip(axes, PANELS):
        for name, by_n in sorted(lines.items()):
            ns = sorted(by_n)
            ax.plot(ns, [by_n[n][key] for n in ns], marker="o", label=name)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers N")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
