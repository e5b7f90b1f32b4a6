"""Running a sweep's cells: each one's state in --out, its `subnetdp train` command, and the
loop that starts, resumes and stops them (``run_sweep``)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterable

from ..config import RESUMABLE_CHANGES, ConfigError, from_dict
from ..launch import ProcessTrees, stop_signals, worker_env
from .grid import STOP_GRACE_S, Cell, Sweep, SweepError, cell_steps, load_sweep, same_config, toml_literal
from .results import aggregate

# ---------------------------------------------------------------------------------------------
# running the cells


def cell_state(cell: Cell, out: Path, launch: str) -> str:
    """complete | new | resume | restart; SweepError when summary.json records another config."""
    folder = out / "cells" / cell.id
    summary = folder / "summary.json"
    if summary.exists():
        try:
            recorded = json.loads(summary.read_text()).get("config")
        except (ValueError, AttributeError):  # not JSON, not UTF-8, not an object
            recorded = None
        if same_config(recorded, cell.config):
            return "complete"
        diffs = []
        if recorded is not None:
            diffs = [f"{s}.{k}: {b!r} there, {a!r} now" for s, k, a, b in
                     from_dict(cell.config).differences(from_dict(recorded))]
        raise SweepError(f"cell {cell.id}: {summary} was written with a different config"
                         + (f" ({'; '.join(diffs[:3])})" if diffs else "")
                         + "; use a different --out (a sweep never overwrites results)")
    if not folder.exists():
        return "new"
    from ..train.checkpoint import CheckpointError, latest
    try:
        found = latest(folder / "checkpoints", verify=False)
        if found is None:
            return "restart"
        manifest = found[1]
        if manifest["step"] >= cell_steps(cell):
            return "restart"  # `train --resume` from the final checkpoint would not evaluate again
        changed = [d for d in from_dict(cell.config).differences(from_dict(manifest["config"]))
                   if (d[0], d[1]) not in RESUMABLE_CHANGES]
    except (CheckpointError, ConfigError):  # a manifest that lacks a key, or another version's config
        return "restart"  # the folder is moved aside, never deleted
    same_world = (manifest.get("virtual_world_size") == cell.workers
                  and manifest.get("simulate") == (launch == "simulate"))
    return "resume" if not changed and same_world else "restart"


def train_command(cell: Cell, base: Path, out: Path, launch: str, resume: bool) -> list[str]:
    """The cell's `subnetdp train`. A resume continues the run as it was started, so it also
    names every key a resume may change with the cell's value: the resumed run is the cell."""
    cmd = [sys.executable, "-m", "subnetdp.app.cli", "train", str(base), "--out", str(out / "cells" / cell.id),
           "--no-progress", "--workers", str(cell.workers), *(["--simulate"] if launch == "simulate" else [])]
    sets = cell.sets()
    if resume:
        sets += [f"{section}.{key}={toml_literal(cell.config[section][key])}"
                 for section, key in sorted(RESUMABLE_CHANGES)]
    for item in sets:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def _start_cell(trees: ProcessTrees, cell: Cell, base: Path, out: Path, launch: str, state: str
                ) -> tuple[subprocess.Popen, IO[str], float]:
    """Start the cell's `subnetdp train` (its output to the cell's train.log): (process, log, start)."""
    folder = out / "cells" / cell.id
    if state == "restart":  # killed before its first checkpoint, or a checkpoint we cannot resume
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        else:
            aside = folder.with_name(f"{folder.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = train_command(cell, base, out, launch, state == "resume")
    log = open(folder / "train.log", "a" if state == "resume" else "w")
    try:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        # cells may run side by side: one thread per worker
        proc = trees.start(cmd, worker_env(1), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except BaseException:
        log.close()
        raise
    return proc, log, time.perf_counter()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + x for x in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "    (no log)"


def write_manifest(sweep: Sweep, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    body = {"sweep": str(sweep.path), "name": sweep.name, "base": str(sweep.base), "launch": sweep.launch,
            "command": command, "cells": [{"id": c.id, "group": c.group, "condition": c.condition,
                                           "workers": c.workers, "seed": c.seed, "overrides": c.overrides,
                                           "aliases": c.aliases, "config": c.config} for c in sweep.cells]}
    (out / "sweep.json").write_text(json.dumps(body, indent=1))


def run_sweep(sweep_path: str | Path, out: str | Path, extra_sets: Iterable[str] = (), only: Iterable[str] = (),
              jobs: int = 1, keep_checkpoints: bool = True, progress: bool = True,
              command: str | None = None) -> dict[str, Any]:
    """Run every cell not yet complete (and matching --only), then aggregate. Returns
    {"ran", "skipped", "failed": lists of ids, "results": aggregate(out), "stopped_by": None}; stopped
    by a signal, {..., "results": None, "stopped_by": the signal, "stopped": the ids of the cells it
    stopped, "not_started": how many cells it did not start}."""
    from tqdm import tqdm

    out = Path(out)
    sweep = load_sweep(sweep_path, extra_sets)
    only = list(only)
    cells = [c for c in sweep.cells if not only or any(s in c.id for s in only)]
    states = {c.id: cell_state(c, out, sweep.launch) for c in cells}  # every conflict before any run
    write_manifest(sweep, out, command or shlex.join(["subnetdp", "sweep", str(sweep_path), "--out", str(out)]))
    todo = [c for c in cells if states[c.id] != "complete"]
    skipped = [c.id for c in cells if states[c.id] == "complete"]
    print(f"sweep {sweep.name}: {len(cells)} cells, {len(skipped)} complete (skipped), {len(todo)} to run "
          f"with --jobs {jobs}", flush=True)
    ran, failed = [], []
    bar = tqdm(total=len(todo), unit="cell", disable=not progress or not todo, dynamic_ncols=True)

    def finished(cell: Cell, rc: int, seconds: float) -> None:
        folder = out / "cells" / cell.id
        if rc == 0 and (folder / "summary.json").exists():
            ran.append(cell.id)
            final = json.loads((folder / "summary.json").read_text()).get("final_eval") or {}
            resumed = ", resumed" if states[cell.id] == "resume" else ""
            bar.write(f"done   {cell.id} ({seconds:.0f} s{resumed}): "
                      + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "step"))
            if not keep_checkpoints:  # the user asked for it (--remove-checkpoints)
                shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        else:
            failed.append(cell.id)
            bar.write(f"FAILED {cell.id} (exit {rc or 1}); the end of {folder / 'train.log'}:\n"
                      + _tail(folder / "train.log"))
        bar.update(1)
        bar.set_postfix_str(f"{len(failed)} failed" if failed else "")

    # Every cell is a process started from this thread, which waits for all of them: a cell never
    # outlives the sweep (see ProcessTrees), whether the sweep is stopped (SIGINT, SIGTERM, SIGHUP:
    # its cells get SIGTERM, and SIGKILL 10 s later or on a second signal), killed (SIGKILL: the
    # kernel sends them SIGTERM) or fails.
    queue, running, interrupted = list(todo), {}, []
    with ProcessTrees(grace_s=STOP_GRACE_S) as trees, stop_signals() as received:
        while queue or running:
            if trees.stops < len(received):  # a (further) stop signal
                queue.clear()
                trees.stop()
            while queue and len(running) < max(1, jobs):
                cell = queue.pop(0)
                bar.set_description_str(cell.id)
                proc, log, started = _start_cell(trees, cell, sweep.base, out, sweep.launch, states[cell.id])
                running[proc.pid] = (cell, log, started)
            for proc in trees.poll():
                cell, log, started = running.pop(proc.pid)
                log.close()
                done = proc.returncode == 0 and (out / "cells" / cell.id / "summary.json").exists()
                if received and not done:
                    interrupted.append(cell.id)
                else:
                    finished(cell, proc.returncode, time.perf_counter() - started)
            if running:
                time.sleep(0.25)
    bar.close()
    if received:
        return {"ran": ran, "skipped": skipped, "failed": failed, "results": None, "stopped_by": received[0],
                "stopped": interrupted, "not_started": len(todo) - len(ran) - len(failed) - len(interrupted)}
    results = aggregate(out)
    return {"ran": ran, "skipped": skipped, "failed": failed, "results": results, "stopped_by": None}
