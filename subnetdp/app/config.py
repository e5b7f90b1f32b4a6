"""Experiment configs: TOML files with five sections, validated against the schema below.

    config = load_config("configs/resnet18_fashion_mnist.toml", overrides=["strategy.coverage=0.25"])
    config.section("optim")["lr"]

Every key of [run], [strategy], [optim] and [eval] is listed in ``SCHEMA`` with its default and
what it does (``subnetdp train --list-keys`` prints it). [model] and [data] take ``name`` plus the
keyword arguments of the chosen model or dataset builder (see ``subnetdp.app.builders``); those are
checked against the builder's signature. A wrong key or value is an error that lists the valid ones.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config key or value that is not valid; the message lists the valid ones."""


@dataclass(frozen=True)
class Key:
    default: Any
    doc: str
    choices: tuple | None = None


SCHEMA: dict[str, dict[str, Key]] = {
    "run": {
        "name": Key("run", "a label for the run, written into summary.json"),
        "seed": Key(0, "seeds model initialisation, data order and dropout (same on every rank)"),
        "steps": Key(100, "optimizer steps of the DDP baseline; see schedule"),
        "tensorboard": Key(False, "also write metrics.jsonl's figures as TensorBoard events in OUT/tensorboard "
                           "(needs pip install 'subnetdp[tensorboard]')"),
        "schedule": Key("iteration", "iteration: every strategy runs `steps`; flops: SDP runs "
                        "round(steps / C) steps, so it spends about the FLOPs of DDP (the paper's choice)",
                        ("iteration", "flops")),
        "log_interval": Key(10, "steps between lines of metrics.jsonl (and progress-bar updates)"),
        "eval_interval": Key(0, "steps between evaluations of the assembled full model (0: only at the end)"),
        "checkpoint_interval": Key(0, "steps between checkpoints (0: none; one is always written at the end, and "
                                      "one at the switch to a full-model phase)"),
        "keep_checkpoints": Key(2, "how many of the newest checkpoints to keep (a run in its full-model phase also "
                                   "keeps its SDP phase's last: the subnetworks)"),
        "device": Key("auto", "auto: CUDA when available, else CPU", ("auto", "cpu", "cuda")),
        "backend": Key("auto", "auto: NCCL when every rank has a GPU of its own, else gloo",
                       ("auto", "gloo", "nccl")),
        "autocast": Key("none", "mixed precision for forward/backward (parameters stay float32)",
                        ("none", "bfloat16", "float16")),
        "threads": Key(1, "torch CPU threads per worker (1: several workers share the cores)"),
        "timeout": Key(600.0, "seconds before a collective that has not completed (dead or stuck peer) raises"),
    },
    "strategy": {
        "name": Key("sdp", "ddp: torch DistributedDataParallel; sdp: subnetwork data parallelism",
                    ("ddp", "sdp")),
        "level": Key("block", "block: residual blocks are the units (B-SDP); neuron: groups of hidden "
                     "neurons, heads or channels inside blocks (N-SDP)", ("block", "neuron")),
        "masking": Key("forward", "forward: train the subnetwork; backward: full forward, gradients "
                       "and optimizer state only for held units", ("forward", "backward")),
        "coverage": Key(0.5, "C in (0, 1]: the fraction of units each worker holds; or one value per worker "
                        "([1.0, 1.0, 0.5, 0.5], rank order; a mixed fleet): k = round(sum) holders per unit, each "
                        "worker's share of the units in proportion to its value (sdp, not with redraw_every or "
                        "memory_budget); the FLOP schedule and the reports use the mean"),
        "memory_budget": Key([], "sdp, block level: each worker's memory budget, one per worker in rank order "
                             "(\"2GiB\", \"512MiB\" or bytes); the plan keeps every worker's predicted peak (its "
                             "weights, gradients, optimizer state and the saved activations of one training batch "
                             "of data.batch_size) within its budget; coverage (one number) sets k ([]: off)"),
        "scale": Key("none", "train-time scaling of kept blocks/neurons under forward masking",
                     ("none", "inverse-coverage")),
        "neuron_groups": Key(0, "neuron level: groups per neuron site (0: one per worker)"),
        "plan_seed": Key(0, "seed of the plan (which worker holds which unit)"),
        "reduce_dtype": Key("none", "sdp only: dtype gradients are sent in (none: their own; bfloat16 or float16: "
                            "half the bytes, averaged to that precision, as DDP's compression hooks)",
                            ("none", "bfloat16", "float16")),
        "shard": Key(False, "sdp only: ZeRO-2 inside holder sets: each unit's gradient and optimizer state "
                     "split over its k holders, the shared parameters' over all workers (same training, "
                     "less memory per worker; the optimizer must be elementwise: sgd, adamw)"),
        "shard_shared_weights": Key(False, "sdp only, with shard = true: ZeRO-3 of the shared weights (embeddings, "
                                    "head, norms, stem): each worker keeps 1/N of them, all-gathered just before "
                                    "use and freed after (same training, less memory, one more all-gather of them "
                                    "per step); also the full phase's weights with full_phase_shard"),
        "full_phase": Key(0.0, "sdp (ignored, with a warning, by ddp): fraction of the DDP step budget spent at "
                          "the end training the assembled full model on every worker (DDP's updates): the SDP phase "
                          "runs (1 - f) of its steps, then the full model runs round(f x run.steps) steps (0: off). "
                          "With masking = 'backward' it is allowed and simply ends the run as DDP (the forward pass "
                          "was already the full model's). Fixed when the run starts: a resume may not move the "
                          "switch"),
        "full_phase_checkpointing": Key(False, "recompute each block's activations in backward during the "
                                        "full phase (activation checkpointing): less activation memory, the same "
                                        "updates"),
        "checkpointing": Key(False, "recompute each block's activations in backward for the whole run "
                             "(activation checkpointing, non-reentrant), any strategy: less activation memory, "
                             "about one more forward per step; the updates are unchanged"),
        "full_phase_shard": Key(True, "the full phase trains the assembled model with its gradients and "
                                "optimizer state split over all N workers (SDP at coverage 1 with shard = true: "
                                "the same updates as DDP, a quarter of the state per worker at N = 4), so with "
                                "full_phase_checkpointing its peak memory per worker stays near the SDP phase's; "
                                "false: replicated on every worker, as DDP"),
        "full_phase_start": Key("assembled", "the model the full phase starts from: the assembled model as is, "
                                "or 'scaled': each residual branch's last layer multiplied by k/N (block level, "
                                "forward masking: each block was trained in k of N subnetworks)",
                                ("assembled", "scaled")),
        "redraw_every": Key(0, "sdp only (block level, forward masking, unsharded, scale none, one coverage, no "
                            "memory_budget): re-draw the plan "
                            "every M steps (stochastic block dropping): a new plan from a seed derived from "
                            "plan_seed, run.seed and the draw, and the units that change hands move with their "
                            "optimizer state, one at a time (0: the plan is fixed)"),
        "stochastic_depth": Key(0.0, "ddp only: probability that a block is dropped in a training step "
                                "(block-level drop-path, drawn per worker and step; 1 - C gives B-SDP's "
                                "expected depth); with [eval] residual_scale = 'coverage' the evaluated "
                                "branches are scaled by the survival probability"),
    },
    "optim": {
        "name": Key("sgd", "the optimizer", ("sgd", "adamw")),
        "lr": Key(0.1, "peak learning rate"),
        "momentum": Key(0.9, "SGD momentum"),
        "nesterov": Key(False, "SGD Nesterov momentum"),
        "betas": Key([0.9, 0.95], "AdamW betas"),
        "eps": Key(1e-8, "AdamW epsilon"),
        "weight_decay": Key(0.0, "decoupled (AdamW) or L2 (SGD) weight decay"),
        "warmup_steps": Key(0, "linear warm-up steps"),
        "lr_schedule": Key("cosine", "learning-rate decay after warm-up", ("constant", "cosine", "linear")),
        "min_lr_ratio": Key(0.0, "final learning rate as a fraction of lr"),
        "grad_clip": Key(0.0, "clip the global gradient norm of the full model to this (0: off)"),
    },
    "eval": {
        "batch_size": Key(256, "evaluation batch size per worker"),
        "max_batches": Key(0, "evaluate only the first max_batches x batch_size examples (images, or windows of "
                           "seq_len tokens) of the test/validation split, the same ones for any number of workers, "
                           "simulated or real, split over them (0: the whole split)"),
        "periodic_max_batches": Key(0, "the same cap for the evaluations during training (every run.eval_interval "
                                    "steps) only, so they stay cheap; the final evaluation uses max_batches (0: as "
                                    "max_batches)"),
        "residual_scale": Key(
            "both", "'coverage': evaluate the assembled B-SDP model with each residual branch x k/N (the "
            "fraction of workers that trained it), as stochastic depth does at test time (also the survival "
            "probability of [strategy] stochastic_depth); 'none': unscaled; 'both' (default): the unscaled "
            "model's metrics, and the scaled one's as scaled_<metric> where a scale applies (docs/results.md: "
            "scaled is better for B-SDP; the exported model is the unscaled one)",
            ("none", "coverage", "both")),
        "views": Key([], "SDP: besides the assembled full model (always evaluated), also evaluate "
                     "'subnetworks' (each worker's own subnetwork as trained; mean, min and max over "
                     "workers) and/or 'ensemble' (the mean of the N subnetworks' predicted probabilities)"),
        "recalibrate_norm_batches": Key(
            20, "re-estimate the assembled model's BatchNorm statistics on this many training batches "
            "before evaluating, and report both figures as <metric> and <metric>_recalibrated (0: off; "
            "models without BatchNorm skip it)"),
    },
    "model": {"name": Key("resnet18", "the model; other keys are the builder's keyword arguments",
                          ("resnet18", "vit", "llama"))},
    "data": {"name": Key("synthetic-images", "the dataset; other keys are the builder's keyword arguments "
                         "(batch_size, the per-worker batch, for all of them)",
                         ("fashion-mnist", "cifar10", "cifar100", "text", "synthetic-images",
                          "synthetic-text"))},
}

EVAL_VIEWS = ("subnetworks", "ensemble")

# Keys that a resumed run may change: they do not alter the trained values.
RESUMABLE_CHANGES = {("run", "steps"), ("run", "log_interval"), ("run", "eval_interval"),
                     ("run", "checkpoint_interval"), ("run", "keep_checkpoints"), ("run", "timeout"),
                     ("eval", "batch_size"), ("eval", "max_batches"), ("eval", "periodic_max_batches"),
                     ("eval", "views")}


# keys that take one number, or a list of one per worker (a mixed fleet)
PER_WORKER_KEYS = {("strategy", "coverage")}


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _unknown(what: str, name: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown {what} {name!r}{hint}; valid: {', '.join(valid)}"


# where a value came from: (section, key) -> the ``--set`` text that gave it; other keys come from the file
Origins = dict[tuple[str, str], str]


def _blame(origins: Origins, source: str, keys: tuple[tuple[str, str], ...], message: str) -> ConfigError:
    """``message`` about ``keys``, prefixed with where the value came from: the ``--set`` that
    gave one of them, else the config file ``source`` (if any)."""
    for key in keys:
        if key in origins:
            return ConfigError(f"--set {origins[key]}: {message}")
    return ConfigError(f"{source}: {message}" if source else message)


@dataclass
class Config:
    """A validated config: ``sections[section][key]``; model/data keys are checked by their builders."""

    sections: dict[str, dict[str, Any]]
    source: str = ""
    origins: Origins = field(default_factory=dict, compare=False, repr=False)

    def error(self, section: str, key: str, message: str, *also: tuple[str, str]) -> ConfigError:
        """A ConfigError about ``section.key`` (and the keys ``also``): it names the ``--set`` that
        gave the value, or the config file."""
        return _blame(self.origins, self.source, ((section, key), *also), message)

    def section(self, name: str) -> dict[str, Any]:
        return self.sections[name]

    def __getitem__(self, dotted: str) -> Any:
        section, _, key = dotted.partition(".")
        return self.sections[section][key]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self.sections)

    def differences(self, other: "Config") -> list[tuple[str, str, Any, Any]]:
        """(section, key, ours, theirs) for every key whose value differs."""
        out = []
        for section in sorted(set(self.sections) | set(other.sections)):
            a, b = self.sections.get(section, {}), other.sections.get(section, {})
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append((section, key, a.get(key), b.get(key)))
        return out


def validate(raw: dict[str, Any], source: str = "", origins: Origins | None = None) -> Config:
    """Fill defaults and check every key and value of a parsed TOML document. ``origins``: the
    keys set by ``--set`` (errors about them name the ``--set``, not the file)."""
    origins = dict(origins or {})
    for section in raw:
        if section not in SCHEMA:
            given = tuple(k for k in origins if k[0] == section)
            raise _blame(origins, source, given, _unknown("section", section, list(SCHEMA)))
        if not isinstance(raw[section], dict):
            raise _blame(origins, source, (), f"[{section}] must be a table of keys")
    sections: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        given = dict(raw.get(section, {}))
        values = {k: copy.deepcopy(spec.default) for k, spec in keys.items()}
        for key, value in given.items():
            if key not in keys:
                if section in ("model", "data"):
                    values[key] = value  # checked against the builder's signature
                    continue
                raise _blame(origins, source, ((section, key),), _unknown(f"key in [{section}]", key, list(keys)))
            spec = keys[key]
            if (section, key) in PER_WORKER_KEYS and isinstance(value, list):
                if not value or not all(_type_ok(v, spec.default) for v in value):
                    raise _blame(origins, source, ((section, key),), f"[{section}] {key} = {value!r}: expected a "
                                 f"number like {spec.default!r}, or a list of one number per worker")
                values[key] = [float(v) for v in value]
                continue
            if not _type_ok(value, spec.default):
                raise _blame(origins, source, ((section, key),), f"[{section}] {key} = {value!r}: expected a "
                             f"{type(spec.default).__name__} like {spec.default!r}")
            if spec.choices and value not in spec.choices:
                raise _blame(origins, source, ((section, key),), f"[{section}] {key} = {value!r} is not valid; "
                             f"valid: {', '.join(map(str, spec.choices))}")
            values[key] = value
        sections[section] = values
    _check_ranges(sections, source, origins)
    return Config(sections, source, origins)


def _check_ranges(s: dict[str, dict[str, Any]], source: str, origins: Origins) -> None:
    def need(ok: bool, message: str, *keys: str) -> None:
        """``keys``: the dotted keys the rule is about (an error names the --set of one of them)."""
        if not ok:
            raise _blame(origins, source, tuple(tuple(k.split(".", 1)) for k in keys), message)  # type: ignore[misc]

    coverage = s["strategy"]["coverage"]
    need(all(0 < c <= 1 for c in (coverage if isinstance(coverage, list) else [coverage])),
         f"[strategy] coverage must be in (0, 1]{' for every worker' if isinstance(coverage, list) else ''}, "
         f"got {coverage}", "strategy.coverage")
    need(s["run"]["steps"] >= 1, "[run] steps must be >= 1", "run.steps")
    need(s["run"]["log_interval"] >= 1, "[run] log_interval must be >= 1", "run.log_interval")
    for key in ("eval_interval", "checkpoint_interval"):
        need(s["run"][key] >= 0, f"[run] {key} must be >= 0", f"run.{key}")
    need(s["run"]["keep_checkpoints"] >= 1, "[run] keep_checkpoints must be >= 1", "run.keep_checkpoints")
    need(s["run"]["threads"] >= 1, "[run] threads must be >= 1", "run.threads")
    need(s["run"]["timeout"] > 0, f"[run] timeout must be positive seconds, got {s['run']['timeout']}", "run.timeout")
    need(s["optim"]["lr"] > 0, "[optim] lr must be positive", "optim.lr")
    need(s["optim"]["grad_clip"] >= 0, "[optim] grad_clip must be >= 0", "optim.grad_clip")
    need(0 <= s["optim"]["min_lr_ratio"] <= 1, "[optim] min_lr_ratio must be in [0, 1]", "optim.min_lr_ratio")
    need(len(s["optim"]["betas"]) == 2, "[optim] betas must be two numbers", "optim.betas")
    need(s["optim"]["warmup_steps"] >= 0, "[optim] warmup_steps must be >= 0", "optim.warmup_steps")
    need(s["optim"]["weight_decay"] >= 0, "[optim] weight_decay must be >= 0", "optim.weight_decay")
    need(s["eval"]["batch_size"] >= 1, "[eval] batch_size must be >= 1", "eval.batch_size")
    need(s["eval"]["max_batches"] >= 0, "[eval] max_batches must be >= 0 (0: the whole split)", "eval.max_batches")
    need(s["eval"]["periodic_max_batches"] >= 0, "[eval] periodic_max_batches must be >= 0 (0: as max_batches)",
         "eval.periodic_max_batches")
    need(s["eval"]["recalibrate_norm_batches"] >= 0, "[eval] recalibrate_norm_batches must be >= 0 (0: off)",
         "eval.recalibrate_norm_batches")
    views = s["eval"]["views"]
    need(all(v in EVAL_VIEWS for v in views), f"[eval] views = {views!r}: valid views are {', '.join(EVAL_VIEWS)}",
         "eval.views")
    need(s["strategy"]["neuron_groups"] >= 0,
         f"[strategy] neuron_groups must be >= 0 (0: one group per worker), got {s['strategy']['neuron_groups']}",
         "strategy.neuron_groups")
    need(0 <= s["strategy"]["stochastic_depth"] < 1, "[strategy] stochastic_depth must be in [0, 1)",
         "strategy.stochastic_depth")
    need(0 <= s["strategy"]["full_phase"] < 1, "[strategy] full_phase must be in [0, 1)", "strategy.full_phase")
    need(s["strategy"]["stochastic_depth"] == 0 or s["strategy"]["name"] == "ddp",
         "[strategy] stochastic_depth is a DDP baseline: it needs name = 'ddp'",
         "strategy.stochastic_depth", "strategy.name")
    need(s["strategy"]["reduce_dtype"] == "none" or s["strategy"]["name"] == "sdp",
         "[strategy] reduce_dtype sets SDP's gradient buckets: it needs name = 'sdp'",
         "strategy.reduce_dtype", "strategy.name")
    st = s["strategy"]
    need(st["redraw_every"] >= 0, "[strategy] redraw_every must be >= 0 (0: the plan is fixed)",
         "strategy.redraw_every")
    need(st["redraw_every"] == 0 or (st["name"] == "sdp" and st["level"] == "block" and st["masking"] == "forward"
                                     and not st["shard"] and st["scale"] == "none"),
         "[strategy] redraw_every re-draws B-SDP's plan: it needs name = 'sdp', level = 'block', masking = "
         "'forward', shard = false and scale = 'none'", "strategy.redraw_every")
    need(st["full_phase_start"] == "assembled" or (st["level"] == "block" and st["masking"] == "forward"
                                                   and st["scale"] == "none"),
         "[strategy] full_phase_start = 'scaled' folds k/N into blocks trained unscaled in k of N subnetworks: it "
         "needs level = 'block', masking = 'forward' and scale = 'none'", "strategy.full_phase_start")
    need(not s["strategy"]["shard"] or s["strategy"]["name"] == "sdp",
         "[strategy] shard splits SDP's holder-set state (for DDP use FSDP): it needs name = 'sdp'",
         "strategy.shard", "strategy.name")
    need(not s["strategy"]["shard_shared_weights"] or s["strategy"]["shard"],
         "[strategy] shard_shared_weights shards the shared weights on top of shard: it needs shard = true",
         "strategy.shard_shared_weights", "strategy.shard")
    need(not isinstance(coverage, list) or st["name"] == "sdp",
         "[strategy] coverage as a list (one per worker) sets SDP's plan: it needs name = 'sdp'",
         "strategy.coverage", "strategy.name")
    need(not isinstance(coverage, list) or st["redraw_every"] == 0,
         "[strategy] redraw_every draws uniform plans: it cannot keep a per-worker coverage list (give one "
         "coverage, or redraw_every = 0)", "strategy.redraw_every", "strategy.coverage")
    budget = st["memory_budget"]
    if budget:
        for value in budget:
            problem = size_problem(value)
            need(problem is None, f"[strategy] memory_budget: {problem}", "strategy.memory_budget")
        need(st["name"] == "sdp", "[strategy] memory_budget sets SDP's plan: it needs name = 'sdp'",
             "strategy.memory_budget", "strategy.name")
        need(st["level"] == "block", "[strategy] memory_budget needs level = 'block' (saved activations are "
             "counted per block)", "strategy.memory_budget", "strategy.level")
        need(not isinstance(coverage, list), "[strategy] memory_budget takes one coverage (it sets k, the holders "
             "per unit), not one per worker: give a number, or drop memory_budget",
             "strategy.memory_budget", "strategy.coverage")
        need(st["redraw_every"] == 0, "[strategy] redraw_every draws uniform plans: it cannot keep memory_budget "
             "(give one or the other)", "strategy.redraw_every", "strategy.memory_budget")


# sizes as the engine's plan.parse_size reads them (checked here without importing torch)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from ``"2GiB"``, ``"512 MiB"``, ``"1.5GB"`` or an int, as ``subnetdp.engine.plan.parse_size``;
    ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not a size: a number of bytes, or a string such as \"2GiB\"")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"{value!r} is not a size: a number of bytes with an optional unit "
                             "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. \"2GiB\"")
        number = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    else:
        number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"a size must be a positive number of bytes, got {value!r}")
    return int(round(number))


def size_problem(value: Any) -> str | None:
    try:
        parse_size(value)
    except ValueError as exc:
        return str(exc)
    return None


def worker_coverages(config: Config) -> list[float] | None:
    """strategy.coverage's per-worker list (a mixed fleet), or None for one coverage."""
    coverage = config["strategy.coverage"]
    return list(coverage) if isinstance(coverage, list) else None


def mean_coverage(config: Config) -> float:
    """The one coverage where a number is needed (the FLOP schedule, labels): the mean of a
    per-worker list."""
    coverage = config["strategy.coverage"]
    return sum(coverage) / len(coverage) if isinstance(coverage, list) else float(coverage)


def coverage_text(coverage: float | list[float]) -> str:
    """``0.5``, or ``[0.75, 0.75, 0.25, 0.25]`` for one per worker."""
    return f"[{', '.join(f'{c:g}' for c in coverage)}]" if isinstance(coverage, list) else f"{coverage:g}"


def holders_per_unit(coverage: float | list[float], workers: int) -> int:
    """k, as the engine plans it: round(C*N) for one coverage, round(sum) for one per worker (at
    least 1, at most N)."""
    total = sum(coverage) if isinstance(coverage, list) else coverage * workers
    return max(1, min(workers, math.floor(total + 0.5)))


def smallest_coverage(workers: int) -> float:
    """The smallest coverage that gives every unit a holder on ``workers`` workers: 1/N (the
    engine rounds C*N to whole holders, so C below 1/(2N) leaves units with none)."""
    return 1 / workers


def check_workers(config: Config, workers: int) -> None:
    """What can only be checked once the number of workers N is known (before anything starts):
    SDP's coverage must give each unit at least one holder, round(C*N) >= 1, as the planner requires."""
    if workers < 1:
        raise ConfigError(f"the number of workers must be >= 1, got {workers}")
    coverage = config["strategy.coverage"]
    if isinstance(coverage, list):
        if len(coverage) != workers:
            raise config.error("strategy", "coverage",
                               f"[strategy] coverage has {len(coverage)} values for {workers} workers: give one "
                               "number, or one per worker (rank order)")
        return
    budget = config["strategy.memory_budget"]
    if budget and len(budget) != workers:
        raise config.error("strategy", "memory_budget",
                           f"[strategy] memory_budget has {len(budget)} sizes for {workers} workers: give one per "
                           "worker (rank order)")
    if config["strategy.name"] == "sdp" and math.floor(coverage * workers + 0.5) == 0:
        raise config.error("strategy", "coverage",
                           f"[strategy] coverage {coverage:g} is below 1/N for N = {workers} workers (no worker "
                           f"would hold a unit); the smallest valid coverage for {workers} workers is "
                           f"{smallest_coverage(workers):.4g}")


def config_warnings(config: Config, workers: int | None = None) -> list[str]:
    """Settings that are valid but probably not meant (printed as warnings before training);
    ``workers``: the number of workers N, for what depends on it."""
    out = []
    warmup, steps = config["optim.warmup_steps"], total_steps(config)
    if warmup > steps:
        out.append(f"optim.warmup_steps = {warmup} is more than the run's {steps} steps: the learning rate "
                   f"never leaves warm-up and peaks at {steps}/{warmup} of optim.lr = {config['optim.lr']:g}")
    strategy = config.section("strategy")
    if strategy["name"] == "ddp" and strategy["full_phase"] > 0:
        # a config that ships the full phase (the one-model recipe) also runs its DDP baseline
        out.append(f"strategy.full_phase = {strategy['full_phase']:g} is ignored with strategy.name = 'ddp': DDP "
                   "trains the full model throughout")
    if strategy["name"] == "sdp" and strategy["full_phase"] > 0:
        if phase_steps(config)[1] == 0:
            out.append(f"strategy.full_phase = {strategy['full_phase']:g} of run.steps = {config['run.steps']} "
                       "rounds to 0 steps: the run has no full-model phase")
        if strategy["masking"] == "backward":
            out.append("strategy.full_phase with masking = 'backward': the workers already train with the full "
                       "model's forward pass, so the full phase only makes the end of the run plain DDP (full "
                       "gradients and optimizer state on every worker)")
    if workers is not None and workers > 1 and strategy["name"] == "sdp":
        holders = holders_per_unit(strategy["coverage"], workers)
        if holders == 1:
            out.append(f"strategy.coverage = {coverage_text(strategy['coverage'])} on {workers} workers gives each "
                       "unit a single holder (k = 1): no two workers share a unit, so the worker-overlap graph is "
                       f"disconnected and each unit trains on 1/{workers} of the data; only the shared parameters are "
                       f"averaged over all workers (a coverage of at least {2 / workers:.3g} gives k >= 2"
                       + (", a list summing to at least 1.5" if isinstance(strategy["coverage"], list) else "") + ")")
    return out


def phase_steps(config: Config) -> tuple[int, int]:
    """(steps of the strategy's own phase, steps of the final full-model phase). Under the FLOP
    schedule SDP runs steps / C; [strategy] full_phase = f moves f of the DDP budget to the end."""
    run, strategy = config.section("run"), config.section("strategy")
    if strategy["name"] != "sdp":
        return run["steps"], 0
    full = round(strategy["full_phase"] * run["steps"])
    own = run["steps"] - full
    if run["schedule"] == "flops":
        own = round(own / mean_coverage(config))
    return max(1, own), full


def total_steps(config: Config) -> int:
    return sum(phase_steps(config))


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value``; the value is read as TOML (numbers, booleans, lists), else a string."""
    dotted, sep, value_text = text.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. strategy.coverage=0.25")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return section, key, value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (or start from the defaults when ``path`` is None) and apply ``--set``s."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:  # TOML is UTF-8
            raise ConfigError(f"{path}: not a TOML file: byte {exc.start} is not UTF-8 text "
                              f"({exc.object[exc.start:exc.start + 1]!r})") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    origins = _apply_overrides(raw, overrides, str(path))
    return validate(raw, str(path) if path else "", origins)


def from_dict(sections: dict[str, dict[str, Any]]) -> Config:
    """A config recorded by a run (config.json, a checkpoint's manifest), as that run ran it: a
    full phase recorded before strategy.full_phase_shard existed was replicated, as DDP."""
    sections = copy.deepcopy(sections)
    strategy = sections.get("strategy")
    if isinstance(strategy, dict) and strategy.get("full_phase", 0) > 0:
        strategy.setdefault("full_phase_shard", False)
    return validate(sections)


def _apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], where: str) -> Origins:
    """Apply ``--set section.key=value`` texts to ``raw`` in place; returns their origins."""
    origins: Origins = {}
    for text in overrides:
        section, key, value = parse_override(text)
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"--set {text.strip()}: [{section}] is not a table in {where}")
        raw.setdefault(section, {})[key] = value
        origins[(section, key)] = text.strip()
    return origins


def with_overrides(sections: dict[str, dict[str, Any]], overrides: list[str] | tuple[str, ...], source: str
                   ) -> Config:
    """A recorded config (a run folder's, e.g. a checkpoint manifest's) with ``--set``s applied on
    top; ``source`` names where it was recorded, for errors."""
    raw = copy.deepcopy(sections)
    origins = _apply_overrides(raw, overrides, source)
    return validate(raw, source, origins)


def describe_schema() -> str:
    """Every fixed key with its default and meaning (``subnetdp train --list-keys``)."""
    lines = []
    for section, keys in SCHEMA.items():
        lines.append(f"[{section}]")
        for key, spec in keys.items():
            choices = f"  one of: {', '.join(map(str, spec.choices))}" if spec.choices else ""
            lines.append(f"  {key} = {json.dumps(spec.default)}\n      {spec.doc}{choices}")
        lines.append("")
    return "\n".join(lines)
