"""A run that loses a worker and gets it back: 4 -> 3 -> 4 workers, killed at two checkpoints and
resumed each time with `--resume` on the new worker count, next to the same run uninterrupted.

    python scripts/elastic_demo.py --out results/elastic                  # ResNet-18 w8, Fashion-MNIST
    python scripts/elastic_demo.py --out /tmp/e --steps 24 --set data.name=synthetic-images

Each phase is a real `subnetdp train --workers N --simulate` process; the first two are killed (SIGKILL) as
soon as the checkpoint at their stop step is complete, as a lost allocation would be. Writes
OUT/{whole,elastic}/ (the two runs), OUT/elastic_loss.png and OUT/elastic.md (final metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(out: Path, workers: int, sets: list[str], resume: bool, kill_at: int | None) -> None:
    cmd = [sys.executable, "-m", "subnetdp.app.cli", "train", str(CONFIG), "--out", str(out), "--workers",
           str(workers), "--simulate", "--no-progress", *[a for s in sets for a in ("--set", s)],
           *(["--resume"] if resume else [])]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, env=ENV)
    marker = out / "checkpoints" / f"step-{kill_at:08d}" / "manifest.json" if kill_at else None
    while proc.poll() is None:
        if marker is not None and marker.exists():
            proc.send_signal(signal.SIGKILL)  # the allocation ends: no clean shutdown
            proc.wait()
            print(f"  killed after the checkpoint at step {kill_at}", flush=True)
            return
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"train exited with {proc.returncode}")


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/elastic")
    parser.add_argument("--steps", type=int, default=300, help="total steps (default 300); stops at 1/3 and 2/3")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config overrides for both runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    third = args.steps // 3
    sets = ["model.width=8", "run.schedule=iteration", f"run.steps={args.steps}", f"run.checkpoint_interval={third}",
            "run.keep_checkpoints=2", f"run.log_interval={max(1, third // 10)}", *args.set]
    _train(out / "whole", 4, sets, resume=False, kill_at=None)
    _train(out / "elastic", 4, sets, resume=False, kill_at=third)
    _train(out / "elastic", 3, sets, resume=True, kill_at=2 * third)
    _train(out / "elastic", 4, sets, resume=True, kill_at=None)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("whole", "-"), ("elastic", "--")):
        losses = _losses(out / name)
        ax.plot(list(losses), list(losses.values()), style, label={"whole": "4 workers throughout",
                                                                   "elastic": "4 -> 3 -> 4 workers"}[name])
    for stop in (third, 2 * third):
        ax.axvline(stop, color="grey", lw=0.8)
    ax.set(xlabel="step", ylabel="training loss (mean over workers)",
           title="B-SDP C=0.5, killed and resumed on another worker count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "elastic_loss.png", dpi=120)
    rows = ["| run | final loss (last 10 %) | final eval |", "|---|---|---|"]
    for name in ("whole", "elastic"):
        losses = list(_losses(out / name).values())
        tail = losses[-max(1, len(losses) // 10):]
        final = json.loads((out / name / "summary.json").read_text())["final_eval"] or {}
        evals = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "step")
        rows.append(f"| {name} | {sum(tail) / len(tail):.4f} | {evals} |")
    (out / "elastic.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    print(f"written: {out / 'elastic_loss.png'}, {out / 'elastic.md'}")


if __name__ == "__main__":
    main()
