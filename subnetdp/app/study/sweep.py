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
import datetime
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable

from ...plotting import pyplot
from ..config import RESUMABLE_CHANGES, ConfigError, from_dict, load_config, parse_override, total_steps
from ..jsonfile import strict_json
from ..launch import ProcessTrees, stop_signals, worker_env

LAUNCHES = ("simulate", "nproc")
MAIN_METRICS = ("accuracy", "accuracy_recalibrated", "test_loss", "val_loss", "perplexity")
GROUP_KEYS = {"name", "seeds", "workers"}
STOP_GRACE_S = 10.0  # stopped: seconds the cells get to stop (train --workers gives torchrun 5) before SIGKILL


class SweepError(ValueError):
    """A sweep file, cell or output folder that cannot be used; the message says which and why."""


@dataclass
class Cell:
    id: str                    # cells/<id> under --out
    group: str
    workers: int               # N
    seed: int                  # run.seed
    overrides: dict[str, Any]  # dotted key -> value, every --set of the cell except run.seed
    config: dict[str, Any]     # load_config(base, sets).to_dict(): what summary.json must record
    aliases: list[str] = field(default_factory=list)  # ids of identical cells of later groups

    @property
    def condition(self) -> str:
        return self.id.rsplit("/", 1)[0]

    def sets(self) -> list[str]:
        return [f"{k}={_toml(v)}" for k, v in self.overrides.items()] + [f"run.seed={self.seed}"]


@dataclass
class Sweep:
    path: Path
    name: str
    base: Path
    launch: str
    cells: list[Cell]


# ---------------------------------------------------------------------------------------------
# the sweep file -> cells


def _toml(value: Any) -> str:
    """A value as TOML, so that `--set key=<this>` reads back the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise SweepError(f"value {value!r}: only strings, numbers, booleans and lists of them")


def _plain(value: Any) -> str:
    return _toml(value) if not isinstance(value, str) else value


def _safe(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    return "_" + text if text in ("", ".", "..") or text.startswith(".") else text


def _list(value: Any, what: str, kind: type) -> list:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise SweepError(f"{what} must be a non-empty list of {kind.__name__}s, got {value!r}")
    return values


def _sets(items: Iterable[str], what: str) -> dict[str, Any]:
    out = {}
    for text in items:
        try:
            section, key, value = parse_override(text)
        except ConfigError as exc:
            raise SweepError(f"{what}: {exc}") from None
        out[f"{section}.{key}"] = value
    return out


def load_sweep(sweep_path: str | Path, extra_sets: Iterable[str] = ()) -> Sweep:
    """Read a sweep file, expand its groups into cells, dedupe them and validate every config."""
    from ..builders import check_builder_keys

    path = Path(sweep_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SweepError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8
        raise SweepError(f"{path}: not a TOML file: byte {exc.start} is not UTF-8 text "
                         f"({exc.object[exc.start:exc.start + 1]!r})") from None
    unknown = set(raw) - {"sweep", "grid"}
    if unknown or "sweep" not in raw:
        raise SweepError(f"{path}: expected a [sweep] table and [[grid]] tables, got {sorted(raw)}")
    head = dict(raw["sweep"])
    bad = set(head) - {"name", "base", "launch", "workers", "seeds", "set"}
    if bad or "base" not in head:
        raise SweepError(f"{path}: [sweep] needs base; valid keys: name, base, launch, workers, seeds, set"
                         + (f" (unknown: {', '.join(sorted(bad))})" if bad else ""))
    base = (path.parent / head["base"]).resolve()
    launch = head.get("launch", "simulate")
    if launch not in LAUNCHES:
        raise SweepError(f"{path}: launch = {launch!r}; valid: {', '.join(LAUNCHES)}")
    sweep_set = _sets(head.get("set", []), f"{path}: [sweep] set")
    cli_set = _sets(extra_sets, "--set")
    try:
        base_config = load_config(base)
    except ConfigError as exc:
        raise SweepError(f"{path}: base config: {exc}") from None
    groups = raw.get("grid", [{"name": "base"}])
    names = [str(g.get("name", f"grid{i}")) for i, g in enumerate(groups)]
    if len(set(map(_safe, names))) != len(names):
        raise SweepError(f"{path}: [[grid]] names must be distinct: {names}")

    cells: list[Cell] = []
    for name, group in zip(names, groups):
        where = f"{path}: [[grid]] {name!r}"
        keys = [k for k in group if k not in GROUP_KEYS]
        for key in keys:
            if "." not in key or key == "run.seed":
                raise SweepError(f"{where}: key {key!r} must be a config key 'section.key' "
                                 "(other than run.seed: use seeds), or one of name, seeds, workers")
        workers = _list(group.get("workers", head.get("workers", [1])), f"{where}: workers", int)
        if any(n < 1 for n in workers):
            raise SweepError(f"{where}: workers must be >= 1, got {workers}")
        seeds = _list(group.get("seeds", head.get("seeds", [0])), f"{where}: seeds", int)
        options = [group[k] if isinstance(group[k], list) else [group[k]] for k in keys]
        merged_all = []
        for combo in itertools.product(*options):
            for n, seed in itertools.product(workers, seeds):
                merged = {**sweep_set, **dict(zip(keys, combo)), "run.seed": seed, **cli_set}
                ddp = merged.get("strategy.name", base_config["strategy.name"]) == "ddp"
                if ddp and ("run.schedule" in merged or base_config["run.schedule"] != "iteration"):
                    merged["run.schedule"] = "iteration"  # no effect on DDP: the same run
                merged_all.append((n, merged))
        varying = [k for k in keys if len({_toml(m[k]) for _, m in merged_all}) > 1]
        shorts = [k.split(".", 1)[1] for k in varying]
        labels = [s if shorts.count(s) == 1 else k for k, s in zip(varying, shorts)]
        for n, merged in merged_all:
            seed = merged.pop("run.seed")
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise SweepError(f"{where}: run.seed must be an integer, got {seed!r}")
            parts = [_safe(name)]
            if varying:
                parts.append(_safe(",".join(f"{lab}={_plain(merged[k])}" for lab, k in zip(labels, varying))))
            cell_id = "/".join(parts + [f"n{n}", f"s{seed}"])
            cell = Cell(cell_id, name, n, seed, merged, {})
            try:
                config = load_config(base, cell.sets())
                check_builder_keys(config)
            except ConfigError as exc:
                raise SweepError(f"cell {cell_id}: {exc}") from None
            cell.config = config.to_dict()
            cells.append(cell)

    unique: dict[tuple[int, str], Cell] = {}
    for cell in cells:
        key = (cell.workers, json.dumps(cell.config, sort_keys=True))
        if key in unique:
            if cell.id != unique[key].id and cell.id not in unique[key].aliases:
                unique[key].aliases.append(cell.id)
        else:
            unique[key] = cell
    out, seen = list(unique.values()), set()
    for cell in out:  # ids whose values only differ in characters _safe replaced
        base_id, i = cell.id, 2
        while cell.id in seen:
            cell.id, i = f"{base_id}_{i}", i + 1
        seen.add(cell.id)
    return Sweep(path, head.get("name", path.stem), base, launch, out)


def expand(sweep_path: str | Path, extra_sets: Iterable[str] = ()) -> list[Cell]:
    """The sweep's cells, deduplicated, every config validated (SweepError names the bad cell)."""
    return load_sweep(sweep_path, extra_sets).cells


# ---------------------------------------------------------------------------------------------
# running the cells


def _same_config(recorded: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    """Whether a finished run's config is the cell's, once both are completed with the current
    defaults: a key added to the schema later (with a default that changes nothing) does not make
    an earlier run a different one."""
    if recorded is None:
        return False
    try:
        return from_dict(recorded).to_dict() == from_dict(wanted).to_dict()
    except ConfigError:
        return False


def cell_state(cell: Cell, out: Path, launch: str) -> str:
    """complete | new | resume | restart; SweepError when summary.json records another config."""
    folder = out / "cells" / cell.id
    summary = folder / "summary.json"
    if summary.exists():
        try:
            recorded = json.loads(summary.read_text()).get("config")
        except (ValueError, AttributeError):  # not JSON, not UTF-8, not an object
            recorded = None
        if _same_config(recorded, cell.config):
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
        if manifest["step"] >= _steps(cell):
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
        sets += [f"{section}.{key}={_toml(cell.config[section][key])}" for section, key in sorted(RESUMABLE_CHANGES)]
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


# ---------------------------------------------------------------------------------------------
# aggregation: results.json, results.md and the plots


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate(out_dir: str | Path) -> dict[str, Any]:
    """Read the complete cells listed in OUT/sweep.json, group them into conditions (cells without
    their seed), write results.json, results.md and the plots; return the results."""
    out = Path(out_dir)
    try:
        manifest = json.loads((out / "sweep.json").read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
        raise SweepError(f"{out}/sweep.json: not a sweep folder ({exc})") from None
    conditions: dict[tuple[int, str], dict[str, Any]] = {}
    machine = None
    for cell in manifest["cells"]:
        folder = out / "cells" / cell["id"]
        try:
            summary = json.loads((folder / "summary.json").read_text())
            metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
        except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8 text
            continue
        if not _same_config(summary.get("config"), cell["config"]):
            continue
        machine = machine or summary.get("machine")
        config = json.loads(json.dumps(cell["config"]))
        config["run"].pop("seed")
        key = (cell["workers"], json.dumps(config, sort_keys=True))
        cond = conditions.setdefault(key, {
            "id": cell["condition"], "group": cell["group"], "strategy": summary.get("strategy"),
            "workers": cell["workers"], "overrides": {k: v for k, v in cell["overrides"].items()},
            "config": config, "seeds": [], "cells": [], "values": {}, "curves": [], "flops_per_step": []})
        cond["seeds"].append(cell["seed"])
        cond["cells"].append(cell["id"])
        figures = {k: v for k, v in (summary.get("final_eval") or {}).items() if k != "step" and _number(v)}
        figures.update({k: summary[k] for k in ("steps", "train_flops", "wall_s") if _number(summary.get(k))})
        for name, value in figures.items():
            cond["values"].setdefault(name, {"seeds": [], "values": []})
            cond["values"][name]["seeds"].append(cell["seed"])
            cond["values"][name]["values"].append(float(value))
        cond["curves"].append({m["step"]: m["loss"] for m in metrics if _number(m.get("loss"))})
        if _number(summary.get("train_flops_per_step")):
            cond["flops_per_step"].append(summary["train_flops_per_step"])

    rows = []
    for cond in conditions.values():
        cond["metrics"] = {name: {**_stats(v["values"]), **v} for name, v in cond.pop("values").items()}
        curves, fps = cond.pop("curves"), cond.pop("flops_per_step")
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        cond["loss_curve"] = {"step": steps, "loss": [statistics.fmean(c[s] for c in curves) for s in steps]}
        cond["train_flops_per_step"] = statistics.fmean(fps) if fps else None
        rows.append(cond)
    s = lambda c: c["config"]["strategy"]  # noqa: E731
    rows.sort(key=lambda c: (c["workers"], s(c)["name"] != "ddp", s(c)["level"], s(c)["masking"],
                             c["config"]["run"]["schedule"], s(c)["coverage"], c["id"]))
    main_metric = next((m for m in ("accuracy", "val_loss") if any(m in c["metrics"] for c in rows)),
                       next((m for c in rows for m in c["metrics"]
                             if m not in ("steps", "train_flops", "wall_s")), None))
    for cond in rows:
        ddp = _matching_ddp(cond, rows)
        ours, theirs = cond["metrics"].get(main_metric), ddp and ddp["metrics"].get(main_metric)
        cond["vs_ddp"] = ours["mean"] - theirs["mean"] if ours and theirs and ddp is not cond else None
        cond["vs_ddp_condition"] = ddp["id"] if ddp else None
    if machine is None:
        import torch
        machine = {"host": socket.gethostname(), "cpus": os.cpu_count(), "torch": torch.__version__}
    results = {"sweep": manifest["sweep"], "name": manifest["name"], "command": manifest["command"],
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine,
               "main_metric": main_metric, "conditions": rows}
    (out / "results.json").write_text(strict_json(results, indent=1))  # a diverged cell's NaN as null
    (out / "results.md").write_text(results_markdown(results))
    if rows:
        plot_results(results, out)
    return results


def _matching_ddp(cond: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The DDP condition with the same N that shares most of this condition's other overrides."""
    if cond["config"]["strategy"]["name"] == "ddp":
        return cond
    def shared(other: dict[str, Any]) -> int:
        return sum(other["overrides"].get(k) == v for k, v in cond["overrides"].items()
                   if not k.startswith("strategy.") and k != "run.schedule")
    ddps = [r for r in rows if r["config"]["strategy"]["name"] == "ddp" and r["workers"] == cond["workers"]]
    return max(ddps, key=shared) if ddps else None


def _flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def results_markdown(results: dict[str, Any]) -> str:
    rows = results["conditions"]
    m = results["machine"] or {}
    lines = [f"# Sweep {results['name']}", "",
             f"- sweep file: `{results['sweep']}`", f"- command: `{results['command']}`",
             f"- machine: {m.get('host', '?')}, {m.get('cpus', '?')} CPUs, torch {m.get('torch', '?')}"
             + (f", {m['device']}" if m.get("device") else ""),
             f"- date: {results['date']}",
             f"- mean ± sample std over seeds (n = seeds); vs DDP: difference of the mean "
             f"{results['main_metric']} to DDP with the same N", ""]
    metrics = [k for k in MAIN_METRICS if any(k in r["metrics"] for r in rows)]
    header = ["strategy", "N", "schedule", *metrics, f"vs DDP ({results['main_metric']})", "steps",
              "train FLOPs", "wall", "condition"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        def fmt(name: str) -> str:
            x = r["metrics"].get(name)
            if x is None or x["mean"] is None or not math.isfinite(x["mean"]):
                return "" if x is None else "nan"
            return f"{x['mean']:.4f}" + (f" ± {x['std']:.4f}" if x["std"] is not None else "") + f" (n={x['n']})"
        g = lambda name: (r["metrics"].get(name) or {}).get("mean")  # noqa: E731
        steps, flops, wall = g("steps"), g("train_flops"), g("wall_s")
        cells = [r["strategy"] or "?", str(r["workers"]), r["config"]["run"]["schedule"], *(fmt(k) for k in metrics),
                 "" if r["vs_ddp"] is None else f"{r['vs_ddp']:+.4f}",
                 "" if steps is None else f"{steps:g}", "" if flops is None else _flops(flops),
                 "" if wall is None else (f"{wall:.1f} s" if wall < 120 else f"{wall / 60:.1f} min"), f"`{r['id']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every metric of every condition, with the per-seed values: results.json.", ""]
    return "\n".join(lines)


def plot_results(results: dict[str, Any], out: Path) -> list[Path]:
    """metric_vs_coverage.png, loss_by_step.png and (when summaries have train_flops_per_step)
    loss_by_flops.png."""
    plt = pyplot("the sweep's plots are")
    if plt is None:
        return []
    rows, metric, written = results["conditions"], results["main_metric"], []
    is_ddp = lambda r: r["config"]["strategy"]["name"] == "ddp"  # noqa: E731
    # overrides that differ between conditions, besides those already in the label
    known = {"strategy.name", "strategy.level", "strategy.masking", "strategy.coverage", "run.schedule"}
    keys = {k for r in rows for k in r["overrides"]} - known
    varying = sorted(k for k in keys if len({_toml(r["overrides"].get(k, "")) for r in rows}) > 1)
    extra = lambda r: "".join(f", {k.split('.')[-1]}={_plain(r['overrides'].get(k, '-'))}" for k in varying)  # noqa: E731
    line = lambda r: ("DDP" if is_ddp(r) else f"{r['config']['strategy']['level'][0].upper()}-SDP "  # noqa: E731
                      f"{r['config']['strategy']['masking'][:3].replace('for', 'fwd').replace('bac', 'bwd')}, "
                      f"{r['config']['run']['schedule']}") + extra(r)
    ns = sorted({r["workers"] for r in rows})

    if metric and any(metric in r["metrics"] for r in rows):
        fig, axes = plt.subplots(1, len(ns), figsize=(5.5 * len(ns), 4.2), dpi=120, squeeze=False)
        for ax, n in zip(axes[0], ns):
            here = [r for r in rows if r["workers"] == n and metric in r["metrics"]]
            for i, r in enumerate(x for x in here if is_ddp(x)):
                mean, std = r["metrics"][metric]["mean"], r["metrics"][metric]["std"] or 0.0
                ax.axhline(mean, color=f"C{i}", ls="--", label=line(r))
                ax.axhspan(mean - std, mean + std, color=f"C{i}", alpha=0.15)
            lines: dict[str, list] = {}
            for r in here:
                if not is_ddp(r):
                    lines.setdefault(line(r), []).append(r)
            for i, (label, points) in enumerate(lines.items()):
                points.sort(key=lambda r: r["config"]["strategy"]["coverage"])
                ax.errorbar([p["config"]["strategy"]["coverage"] for p in points],
                            [p["metrics"][metric]["mean"] for p in points],
                            yerr=[p["metrics"][metric]["std"] or 0.0 for p in points],
                            marker="o", capsize=3, color=f"C{i + 3}", label=label)
            ax.set(xlabel="coverage C", ylabel=metric, title=f"N = {n}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{results['name']}: {metric} (mean ± std over seeds)")
        fig.tight_layout()
        written.append(out / "metric_vs_coverage.png")
        fig.savefig(written[-1])
        plt.close(fig)

    for name, per_flops in (("loss_by_step.png", False), ("loss_by_flops.png", True)):
        curves = [r for r in rows if r["loss_curve"]["step"] and (not per_flops or r["train_flops_per_step"])]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
        for r in curves:
            x = [s * (r["train_flops_per_step"] if per_flops else 1) for s in r["loss_curve"]["step"]]
            label = line(r) if is_ddp(r) else f"{r['strategy']}, {r['config']['run']['schedule']}" + extra(r)
            ax.plot(x, r["loss_curve"]["loss"], label=label + (f", N={r['workers']}" if len(ns) > 1 else ""),
                    ls="--" if is_ddp(r) else "-")
        ax.set(xlabel="training FLOPs" if per_flops else "optimizer step", ylabel="training loss (mean over seeds)",
               title=results["name"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1])
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------
# the command


def _steps(cell: Cell) -> int:
    return total_steps(from_dict(cell.config))


def dry_run_table(sweep: Sweep, cells: list[Cell], out: Path) -> str:
    rows = [("id", "N", "seed", "steps", "state", "overrides")]
    for c in cells:
        try:
            state = cell_state(c, out, sweep.launch)
        except SweepError:
            state = "CONFLICT"
        rows.append((c.id, str(c.workers), str(c.seed), str(_steps(c)), state,
                     " ".join(f"{k}={_plain(v)}" for k, v in c.overrides.items())
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
            out = Path(args.out or f"runs/sweeps/{_safe(sweep.name)}")
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
