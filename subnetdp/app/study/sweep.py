"""`subnetdp sweep`: run a grid of `subnetdp train` cells (strategies x workers x seeds), resume a
killed sweep, and aggregate the results over seeds into a table, a JSON file and plots.

    S=sweeps/resnet18_fashion_mnist.toml R=results/resnet18_fashion_mnist
    subnetdp sweep $S --out $R --dry-run                      # the cells and their state
    subnetdp sweep $S --out $R --jobs 2                       # run them (rerun the same to resume)
    subnetdp sweep $S --out /tmp/smoke --set run.steps=2      # a smoke test of every cell
    subnetdp sweep $S --out $R --only b-fwd --only ddp        # some cells (id substrings)
    subnetdp sweep --out $R --report-only                     # tables and plots only

A sweep file (TOML):

    [sweep]
    name = "resnet18-fmnist"
    base = "../configs/resnet18_fashion_mnist.toml"  # a `subnetdp train` config, relative to this file
    launch = "simulate"        # simulate: `train --workers N --simulate`; nproc: `train --workers N` (torchrun)
    workers = [4]              # one cell per N
    seeds = [0, 1, 2]          # run.seed of the cells
    set = ["run.steps=600"]    # optional: overrides for every cell

    [[grid]]                   # one or more groups; each is the cartesian product of its lists
    name = "ddp"
    "strategy.name" = ["ddp"]

    [[grid]]
    name = "sdp-forward"
    "strategy.name" = ["sdp"]
    "strategy.coverage" = [0.25, 0.5, 0.75]
    "run.schedule" = ["flops", "iteration"]
    seeds = [0]                # optional, per group: seeds and workers

Overrides are applied in this order: the sweep's `set`, the group's grid values, run.seed, the
command line's --set. A cell's id names its group, the grid keys that vary inside that group (short
names), N and the seed: `sdp-forward/coverage=0.5,schedule=flops/n4/s1`. Cells with the same
config and N are run once (the first group's id is kept); run.schedule has no effect on DDP, so
DDP cells are normalised to schedule "iteration". Every cell's config is checked before anything
runs. A condition is a cell without its seed; results are mean, sample std and n over seeds.

Layout of --out:
    sweep.json                 the sweep's cells (id, group, N, seed, overrides, config)
    cells/<id>/                one `subnetdp train --out` folder per cell, plus train.log
    results.json, results.md   per condition: every final_eval metric, steps, FLOPs, wall time
    metric_vs_coverage.png, loss_by_step.png, loss_by_flops.png
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from .cells import cell_state, run_sweep, write_manifest
from .grid import Cell, Sweep, SweepError, cell_steps, load_sweep, plain_value, safe_name
from .results import aggregate

# ---------------------------------------------------------------------------------------------
# the command


def dry_run_table(sweep: Sweep, cells: list[Cell], out: Path) -> str:
    rows = [("id", "N", "seed", "steps", "state", "overrides")]
    for c in cells:
        try:
            state = cell_state(c, out, sweep.launch)
        except SweepError:
            state = "CONFLICT"
        rows.append((c.id, str(c.workers), str(c.seed), str(cell_steps(c)), state,
                     " ".join(f"{k}={plain_value(v)}" for k, v in c.overrides.items())
                     + (f"  (also: {', '.join(c.aliases)})" if c.aliases else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r[:5], widths)) + "  " + r[5] for r in rows)


EPILOG = """\
cell states (see --dry-run): complete (summary.json records this cell's config: skipped), new,
resume (killed after a checkpoint: rerun with --resume), restart (killed before one: the folder is
moved aside to <id>.incomplete-<time> and the cell starts afresh). A summary.json with another
config is an error: a sweep never overwrites results; use another --out.

checkpoints: a completed cell keeps its checkpoints/ folder (`subnetdp align` and `subnetdp export`
read it) unless --remove-checkpoints asks the sweep to delete it once the cell is complete (the
results are summary.json and metrics.jsonl, which are small enough to commit). Set
run.checkpoint_interval (e.g. --set run.checkpoint_interval=100) so that a killed long cell resumes
instead of restarting.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="subnetdp sweep", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", help="the sweep file (TOML); optional with --report-only")
    parser.add_argument("--out", help="output folder (default runs/sweeps/<sweep name>)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key in every cell, after the sweep's own (repeatable), "
                        "e.g. --set run.steps=2 for a smoke test")
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="run only cells whose id contains SUBSTRING (repeatable: any of them)")
    parser.add_argument("--jobs", "-j", type=int, default=1,
                        help="cells run at once (default 1); each is its own process, so with "
                        "--simulate cells use about one core each")
    parser.add_argument("--dry-run", action="store_true", help="print the cells (id, N, seed, steps, "
                        "state, overrides) and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: aggregate the complete cells in --out (results.json, results.md, plots)")
    parser.add_argument("--remove-checkpoints", action="store_true",
                        help="delete each cell's checkpoints/ once the cell is complete (default: kept, see below)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each completed cell's checkpoints/ (the default; accepted for older commands)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    command = shlex.join(["subnetdp", "sweep", *(argv if argv is not None else sys.argv[1:])])
    try:
        if args.report_only and args.sweep is None:
            if args.out is None:
                parser.error("--report-only needs --out (or the sweep file)")
            out = Path(args.out)
        else:
            if args.sweep is None:
                parser.error("give a SWEEP.toml")
            sweep = load_sweep(args.sweep, args.set)
            out = Path(args.out or f"runs/sweeps/{safe_name(sweep.name)}")
            cells = [c for c in sweep.cells if not args.only or any(s in c.id for s in args.only)]
            if args.dry_run:
                print(f"sweep {sweep.name}: base {sweep.base}, launch {sweep.launch}, {len(cells)} cells, out {out}")
                print(dry_run_table(sweep, cells, out))
                return 0
            if args.report_only and not (out / "sweep.json").exists():
                write_manifest(sweep, out, command)
        if args.report_only:
            results = aggregate(out)
            failed: list[str] = []
        else:
            if args.remove_checkpoints and args.keep_checkpoints:
                raise SweepError("--remove-checkpoints and --keep-checkpoints contradict each other: give one")
            report = run_sweep(args.sweep, out, args.set, args.only, args.jobs, not args.remove_checkpoints,
                               progress=not args.no_progress, command=command)
            results, failed = report["results"], report["failed"]
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.report_only and report["stopped_by"]:
        sig = report["stopped_by"]
        stopped = report["stopped"]
        print(f"stopped by {signal.Signals(sig).name}: {len(stopped)} running cell{'s' if len(stopped) != 1 else ''} "
              f"stopped ({', '.join(stopped) or 'none'}), {len(report['ran'])} done, {report['not_started']} not "
              f"started; rerun the same command to continue (a cell resumes from its last checkpoint, or starts "
              f"again without one): {command}", file=sys.stderr)
        return 128 + sig
    print(f"{len(results['conditions'])} conditions; written: {out}/results.md, {out}/results.json")
    if failed:
        print(f"{len(failed)} cells failed: {', '.join(failed)} (their train.log is in {out}/cells/<id>/)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
