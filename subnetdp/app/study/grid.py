"""A sweep file (see sweep.py): its cells, each a `subnetdp train` config, N and a seed."""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..config import ConfigError, from_dict, load_config, parse_override, total_steps

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
        return [f"{k}={toml_literal(v)}" for k, v in self.overrides.items()] + [f"run.seed={self.seed}"]


@dataclass
class Sweep:
    path: Path
    name: str
    base: Path
    launch: str
    cells: list[Cell]


# ---------------------------------------------------------------------------------------------
# the sweep file -> cells


def toml_literal(value: Any) -> str:
    """A value as TOML, so that `--set key=<this>` reads back the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    raise SweepError(f"value {value!r}: only strings, numbers, booleans and lists of them")


def plain_value(value: Any) -> str:
    return toml_literal(value) if not isinstance(value, str) else value


def safe_name(text: str) -> str:
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
    if len(set(map(safe_name, names))) != len(names):
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
        varying = [k for k in keys if len({toml_literal(m[k]) for _, m in merged_all}) > 1]
        shorts = [k.split(".", 1)[1] for k in varying]
        labels = [s if shorts.count(s) == 1 else k for k, s in zip(varying, shorts)]
        for n, merged in merged_all:
            seed = merged.pop("run.seed")
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise SweepError(f"{where}: run.seed must be an integer, got {seed!r}")
            parts = [safe_name(name)]
            if varying:
                parts.append(safe_name(",".join(f"{lab}={plain_value(merged[k])}" for lab, k in zip(labels, varying))))
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


def cell_steps(cell: Cell) -> int:
    """The training steps of a cell's run (its schedule decides)."""
    return total_steps(from_dict(cell.config))


def same_config(recorded: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    """Whether a finished run's config is the cell's, once both are completed with the current
    defaults: a key added to the schema later (with a default that changes nothing) does not make
    an earlier run a different one."""
    if recorded is None:
        return False
    try:
        return from_dict(recorded).to_dict() == from_dict(wanted).to_dict()
    except ConfigError:
        return False
