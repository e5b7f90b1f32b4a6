"""The README demo: ResNet-18 (width 16) on Fashion-MNIST with 4 gloo workers on CPU, first DDP,
then B-SDP (block level, forward masking, C = 0.5), each a `subnetdp train` run of
configs/demo.toml launched through torchrun; then a side-by-side table and a PNG of both loss
curves.

    subnetdp demo                                  # about 6 minutes on 2 CPU cores
    subnetdp demo --steps 100 --out runs/demo-short
    subnetdp demo --set strategy.coverage=0.25     # any config key, applied to the SDP run

Every figure is measured, per worker (the largest over the 4): parameter, gradient and optimizer
state bytes from the live tensors, peak resident memory during training steps from /proc (VmHWM,
which includes the interpreter, torch and the dataset), bytes handed to collectives counted where
they are issued (a DDP comm hook; SDP's own buckets), the median step time by the wall clock, and
the test accuracy of the assembled full model on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .launch import run_process_tree, worker_env
from .report import comparison_table, plot_losses, read_run

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="subnetdp demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="gloo worker processes (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's, 470)")
    parser.add_argument("--config", default=str(CONFIG),
                        help=f"the config (default {CONFIG.relative_to(CONFIG.parents[1])})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config overrides for the SDP run (and, except [strategy], the DDP run)")
    parser.add_argument("--out", default="runs/demo",
                        help="where both runs are written (default runs/demo); a rerun replaces OUT/ddp and OUT/sdp")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out = Path(args.out)
    common = [s for s in args.set if not s.startswith("strategy.")]
    if args.steps is not None:
        common.append(f"run.steps={args.steps}")
    env = worker_env(1)  # several workers share the cores
    runs = {"ddp": common + ["strategy.name=ddp"], "sdp": common + [s for s in args.set if s.startswith("strategy.")]}
    for name, sets in runs.items():
        print(f"\n=== {name.upper()}: {args.workers} workers ===", flush=True)
        # a rerun of the demo replaces the demo's own two runs in --out (and nothing else there)
        cmd = [sys.executable, "-m", "subnetdp.app.cli", "train", args.config, "--workers", str(args.workers),
               "--out", str(out / name), "--overwrite"]
        for item in sets:
            cmd += ["--set", item]
        if args.no_progress:
            cmd.append("--no-progress")
        # its own session, dying with this process (even of SIGKILL); a stop signal is passed on
        result = run_process_tree(cmd, env, grace_s=10.0)  # `train --workers` gives torchrun 5 s
        if result.stopped_by or result.returncode < 0:
            sig = result.stopped_by or -result.returncode
            print(f"{'stopped' if result.stopped_by else 'error: the run was killed'} by {signal.Signals(sig).name}: "
                  f"the demo's {name.upper()} run is stopped, with its workers; run the demo again to start over",
                  file=sys.stderr)
            return 128 + sig
        if result.returncode != 0:
            print(f"error: the demo's {name.upper()} run failed (exit code {result.returncode}; its output is above)",
                  file=sys.stderr)
            return result.returncode
    dirs = [out / name for name in runs]
    table = comparison_table(dirs)
    plot = plot_losses(dirs, out / "loss.png", title="ResNet-18 on Fashion-MNIST, 4 workers")
    summary, _ = read_run(dirs[0])
    note = (f"per worker, the largest over {args.workers} workers (comm: mean; step: median). Peak RSS is "
            f"the whole process during training steps (interpreter, torch, dataset included). Accuracy: the "
            f"assembled full model on the 10,000 test images (B-SDP: residual branches x k/N when "
            f"[eval] residual_scale = 'coverage'), as assembled and after re-estimating BatchNorm "
            f"statistics on 20 training batches. Machine: {summary['machine']['platform']}, "
            f"{summary['machine']['cpus']} CPUs, torch {summary['machine']['torch']}.")
    (out / "table.md").write_text(table + "\n\n" + note + "\n")
    print("\n" + table + "\n\n" + note)
    print(f"\nwritten: {out}/table.md, " + (f"{plot}, " if plot else "") + f"{out}/ddp/, {out}/sdp/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
