"""Plans: which worker holds which unit.

Every plan uses cyclic *holder windows*: window j holds workers {π(j), π(j+1), ..., π(j+k-1)} (mod N)
for a seeded permutation π of the ranks. So there are at most N distinct holder sets (one
communicator each), every unit has exactly k holders, and the worker-overlap graph of the used
windows is a ring when k >= 2 (connected). Units are placed into windows:

- block level: greedily, largest first, into the window that keeps the most-loaded worker lightest,
  where a worker's load is the larger of its share of held parameters and of held compute; then a
  local search moves single units while that lowers (max load, sum of squared loads), keeping every
  worker covered.
- neuron level: the G groups of a site go to G evenly spaced windows from an offset chosen per site
  to keep loads level, so every worker holds about a fraction C of every site.

Heterogeneous workers (``plan_targeted``): ``coverage`` one value per rank, or a ``MemoryBudget``
per rank. Every unit still has exactly k holders (k = round(sum of the coverages), or round(C*N)),
but the holder sets are drawn from a larger family (every k-subset when there are few, else the
windows of several permutations), and the greedy + local search balances each worker's load
against its own target (its coverage's share of k) or, under memory budgets, balances as the
uniform plan does while keeping every worker's predicted peak memory within its budget.

The plan is a pure function of (units, N, C, seed[, budgets]): every rank computes it locally.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any, Sequence, cast

import numpy as np

from .errors import PlanError


@dataclass(frozen=True)
class UnitCost:
    """A unit as the planner sees it."""

    name: str
    params: int               # trainable parameter count
    bytes: int                # bytes of its parameters
    flops: float | None       # forward FLOPs on the example input; None when not counted
    site: str | None = None   # neuron units: the site they split
    group: int = 0
    num_groups: int = 1
    activations: float | None = None  # bytes saved for backward on the example input; None: not counted


def holders_needed(coverage: float, world_size: int) -> int:
    """k = max(1, round(C * N)), rounding halves up: how many workers hold each unit."""
    return max(1, min(world_size, math.floor(coverage * world_size + 0.5)))


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | float | str) -> int:
    """Bytes from ``2GiB``, ``512 MiB``, ``1.5GB``, ``1e9`` or an int (binary units are 1024-based,
    decimal ones 1000-based); ValueError naming the valid units otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"a size in bytes, not {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{value!r} is not a size: a number of bytes with an optional unit "
                             f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 2GiB")
        number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"a size must be a positive number of bytes, got {value!r}")
    return int(round(number * _UNITS[unit]))


def format_bytes(n: float) -> str:
    """1.25 GiB, 40.0 MiB, 512 B: binary units, three significant figures."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class MemoryBudget:
    """Each worker's memory budget in bytes, and the assumptions of the model that predicts a
    worker's peak (``SubnetworkDataParallel(memory_budget=...)``; a plain list of sizes takes the
    defaults). The prediction, from what the planner counts on the example input (which should be
    one worker's training batch):

        peak = weights + gradients + optimizer states of the parameters it trains
               + max(saved activations, the optimizer step's temporaries)

    where the parameters are the shared ones plus its held units' (forward masking; backward
    masking keeps every unit's weights as well), the saved activations are those of its held
    blocks plus the shared part's (saved outside any block, two tensors the size of the output for
    the loss, and two the size of the largest saved tensor for the gradients in flight).

    optimizer_states_per_param: 2 for Adam/AdamW (two moments), 1 for SGD with momentum, 0 for SGD.
    gradients_per_param: 1 (one gradient per parameter, in its dtype).
    optimizer_workspace_per_param: temporaries the optimizer step allocates, per parameter
        (1 for foreach Adam/AdamW: the square root of the second moment).
    activation_scale: multiplies the counted activations (counted in the example input's dtype,
        in eval mode: under bf16 autocast they take about half).
    masking: "forward" (dropped blocks are gone) or "backward" (every worker keeps every unit's
        weights and runs every block forward).

    Not modelled: buffers (norm statistics), the gradient bucket being packed (up to
    ``bucket_cap_mb`` more, briefly, in a real run), the allocator's fragmentation and the CUDA
    context; with ``shard=True`` the prediction is an upper bound."""

    per_worker: tuple[int, ...]
    optimizer_states_per_param: float = 2.0
    gradients_per_param: float = 1.0
    optimizer_workspace_per_param: float = 1.0
    activation_scale: float = 1.0
    masking: str = "forward"

    def __post_init__(self) -> None:
        if isinstance(self.per_worker, (str, bytes, int, float)) or not isinstance(self.per_worker, Sequence):
            raise PlanError(f"memory_budget takes one size per worker (a list), got {self.per_worker!r}")
        sizes = []
        for value in self.per_worker:
            try:
                sizes.append(parse_size(value))
            except ValueError as exc:
                raise PlanError(f"memory_budget: {exc}") from None
        object.__setattr__(self, "per_worker", tuple(sizes))
        for name in ("optimizer_states_per_param", "gradients_per_param", "optimizer_workspace_per_param",
                     "activation_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise PlanError(f"MemoryBudget.{name} must be a number >= 0, got {value!r}")
        if self.masking not in ("forward", "backward"):
            raise PlanError(f"MemoryBudget.masking must be 'forward' or 'backward', got {self.masking!r}")

    def assumptions(self) -> dict[str, Any]:
        """The model's keywords, without the budgets."""
        return {k: v for k, v in asdict(self).items() if k != "per_worker"}

    def columns(self, unit_bytes: Sequence[float], unit_activations: Sequence[float], shared_bytes: float,
                shared_activations: float) -> tuple[np.ndarray, np.ndarray]:
        """(fixed (2,), per unit (U, 2)): a worker's predicted peak is the larger of the two columns'
        fixed part plus the sum over its held units. Column 0: state and saved activations (the
        backward's peak); column 1: state and the optimizer's temporaries (the step's)."""
        per_param = 1.0 + self.gradients_per_param + self.optimizer_states_per_param
        work = self.optimizer_workspace_per_param
        b = np.asarray(unit_bytes, dtype=float)
        a = np.asarray(unit_activations, dtype=float) * self.activation_scale
        shared_a = shared_activations * self.activation_scale
        if self.masking == "forward":
            per_unit = np.stack([per_param * b + a, (per_param + work) * b], axis=1)
            fixed = np.array([per_param * shared_bytes + shared_a, (per_param + work) * shared_bytes])
        else:  # every weight on every worker, every block run forward; gradients and state only where held
            per_unit = np.stack([(per_param - 1) * b, (per_param - 1 + work) * b], axis=1)
            fixed = np.array([per_param * shared_bytes + b.sum() + shared_a + a.sum(),
                              (per_param + work) * shared_bytes + b.sum()])
        return fixed, per_unit.reshape(len(b), 2)


@dataclass
class Plan:
    """Who holds what, and the figures that say how good the assignment is."""

    world_size: int
    coverage: float
    k: int
    seed: int
    level: str
    holders: dict[str, tuple[int, ...]]
    unit_params: dict[str, int]
    unit_bytes: dict[str, int]
    unit_flops: dict[str, float]
    flops_counted: bool
    shared_params: int
    shared_bytes: int
    shared_flops: float
    unit_activations: dict[str, float] = field(default_factory=dict)
    worker_params: list[int] = field(default_factory=list)
    worker_bytes: list[int] = field(default_factory=list)
    worker_flops: list[float] = field(default_factory=list)
    worker_activations: list[float] = field(default_factory=list)
    holder_sets: list[tuple[int, ...]] = field(default_factory=list)
    algebraic_connectivity: float = 0.0
    # heterogeneous plans only (None otherwise, and then left out of to_dict and the fingerprint)
    worker_coverage: list[float] | None = None   # the per-rank coverages asked for
    worker_target: list[float] | None = None     # each worker's target share of the unit load (sums to k)
    worker_budget: list[int] | None = None       # each worker's memory budget, bytes
    memory_model: dict[str, Any] | None = None   # MemoryBudget's assumptions
    shared_activations: float = 0.0              # bytes of activations every worker keeps (memory model)
    worker_predicted_peak: list[float] | None = None  # the memory model's peak per worker, bytes

    def __post_init__(self) -> None:
        n = self.world_size
        self.worker_params = [self.shared_params] * n
        self.worker_bytes = [self.shared_bytes] * n
        self.worker_flops = [self.shared_flops] * n
        self.worker_activations = [0.0] * n  # of the units only
        for unit, ranks in self.holders.items():
            for r in ranks:
                self.worker_activations[r] += self.unit_activations.get(unit, 0.0)
                self.worker_params[r] += self.unit_params[unit]
                self.worker_bytes[r] += self.unit_bytes[unit]
                self.worker_flops[r] += self.unit_flops[unit]
        self.holder_sets = sorted(set(self.holders.values()))
        self.algebraic_connectivity = algebraic_connectivity(n, self.holder_sets)
        if self.worker_budget is not None and self.memory_model is not None:
            self.worker_predicted_peak = predicted_peaks(self)

    @property
    def heterogeneous(self) -> bool:
        """Per-rank coverages or memory budgets (a plan_targeted plan)."""
        return self.worker_coverage is not None or self.worker_budget is not None

    # -- queries ---------------------------------------------------------------------------
    def held_units(self, rank: int) -> list[str]:
        return [u for u, ranks in self.holders.items() if rank in ranks]

    def owner(self, unit: str) -> int:
        """The holder whose copy is taken when the full model is assembled."""
        return self.holders[unit][0]

    @property
    def total_params(self) -> int:
        return self.shared_params + sum(self.unit_params.values())

    def balance(self) -> dict[str, float]:
        """max/min over workers of held parameters and held compute (1.0 is perfect)."""
        def ratio(values: Sequence[float]) -> float:
            return float(max(values) / min(values)) if min(values) > 0 else math.inf
        out = {"params_max_over_min": ratio(self.worker_params),
               "flops_max_over_min": ratio(self.worker_flops)}
        if any(self.worker_activations):
            out["unit_activations_max_over_min"] = ratio(self.worker_activations)
        return out

    def fingerprint(self) -> str:
        """A digest that two ranks agree on exactly when their plans are identical."""
        data: dict[str, Any] = {"n": self.world_size, "c": self.coverage, "seed": self.seed,
                                "level": self.level, "holders": sorted(self.holders.items()),
                                "params": sorted(self.unit_params.items()), "shared": self.shared_params}
        if self.worker_coverage is not None:  # only when given: uniform plans keep their fingerprints
            data["coverages"] = self.worker_coverage
        if self.worker_budget is not None:
            data["budgets"] = self.worker_budget
            data["memory_model"] = self.memory_model
        payload = json.dumps(data, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.heterogeneous:
            for key in ("worker_coverage", "worker_target", "worker_budget", "memory_model", "shared_activations",
                        "worker_predicted_peak"):
                del out[key]
        out["holders"] = {u: list(r) for u, r in self.holders.items()}
        out["holder_sets"] = [list(s) for s in self.holder_sets]
        out["balance"] = self.balance()
        return out

    def table(self) -> str:
        """The plan as readable text: one row per unit, then one row per worker."""
        n = self.world_size
        name_w = max([len(u) for u in self.holders] + [8])
        per_rank = ("" if self.worker_coverage is None else
                    " (per worker: " + ", ".join(f"{c:g}" for c in self.worker_coverage) + ")")
        lines = [f"SDP plan: {self.level} level, N={n} workers, coverage C={self.coverage:g}{per_rank} "
                 f"-> k={self.k} holders per unit, seed {self.seed}",
                 f"{'unit':<{name_w}}  {'params':>11}  {'GFLOP':>8}  " + " ".join(f"{r:>3}" for r in range(n))]
        for unit, ranks in self.holders.items():
            marks = " ".join(f"{'x' if r in ranks else '.':>3}" for r in range(n))
            lines.append(f"{unit:<{name_w}}  {self.unit_params[unit]:>11,}  "
                         f"{self.unit_flops[unit] / 1e9:>8.3f}  {marks}")
        lines.append(f"{'(shared)':<{name_w}}  {self.shared_params:>11,}  {self.shared_flops / 1e9:>8.3f}  "
                     + " ".join(f"{'x':>3}" for _ in range(n)))
        lines.append("")
        total = self.total_params
        extra = ""
        if self.worker_target is not None:
            extra += f"  {'load':>6}  {'target':>6}"
        if self.worker_predicted_peak is not None and self.worker_budget is not None:
            extra += f"  {'predicted peak':>14}  {'budget':>10}  {'of budget':>9}"
        lines.append(f"{'worker':>6}  {'units':>5}  {'params':>13}  {'of model':>8}  {'param MiB':>9}  {'GFLOP':>8}"
                     + extra)
        loads = self.worker_loads() if self.worker_target is not None else None
        for r in range(n):
            row = (f"{r:>6}  {len(self.held_units(r)):>5}  {self.worker_params[r]:>13,}  "
                   f"{self.worker_params[r] / total:>8.1%}  {self.worker_bytes[r] / 2**20:>9.2f}  "
                   f"{self.worker_flops[r] / 1e9:>8.3f}")
            if loads is not None and self.worker_target is not None:
                row += f"  {loads[r]:>6.3f}  {self.worker_target[r]:>6.3f}"
            if self.worker_predicted_peak is not None and self.worker_budget is not None:
                peak, budget = self.worker_predicted_peak[r], self.worker_budget[r]
                row += (f"  {format_bytes(peak):>14}  {format_bytes(budget):>10}  {peak / budget:>9.1%}")
            lines.append(row)
        b = self.balance()
        flops_note = "counted on the example input" if self.flops_counted else (
            "not counted: no example input, so compute is taken as proportional to parameters")
        lines += ["",
                  f"balance: params max/min {b['params_max_over_min']:.3f}, "
                  f"compute max/min {b['flops_max_over_min']:.3f} ({flops_note})"
                  + (f", saved activations of held blocks max/min {b['unit_activations_max_over_min']:.3f}"
                     if "unit_activations_max_over_min" in b else ""),
                  f"distinct holder sets: {len(self.holder_sets)}; worker-overlap graph algebraic "
                  f"connectivity: {self.algebraic_connectivity:.3f}"
                  + ("  (0: disconnected, workers share only the shared parameters)"
                     if self.algebraic_connectivity < 1e-9 and n > 1 else "")]
        if self.worker_target is not None:
            lines.append("load: the worker's share of the units' parameters, compute and saved activations, the "
                         "largest of the three (k in all); target: its coverage's share of k")
        if self.worker_budget is not None and self.memory_model is not None:
            model = ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                              for key, value in self.memory_model.items())
            lines.append(f"predicted peak: weights, gradients and optimizer state of the trained parameters plus the "
                         f"larger of saved activations (shared part {format_bytes(self.shared_activations)}) and "
                         f"the step's temporaries ({model})")
        return "\n".join(lines)

    def worker_loads(self) -> list[float]:
        """Each worker's share of the units' load (the largest of its shares of parameters, compute
        and counted activations; each unit counts once per holder, so the shares sum to about k)."""
        names = list(self.holders)
        units = [UnitCost(u, self.unit_params[u], self.unit_bytes[u], self.unit_flops[u],
                          activations=self.unit_activations.get(u)) for u in names]
        cost = _cost_matrix(units, {u: self.unit_flops[u] for u in names})
        load = np.zeros((self.world_size, cost.shape[1]))
        for i, u in enumerate(names):
            load[list(self.holders[u])] += cost[i]
        return [float(x) for x in load.max(axis=1)]


def algebraic_connectivity(world_size: int, holder_sets: Sequence[tuple[int, ...]]) -> float:
    """Second-smallest Laplacian eigenvalue of the graph linking workers that share a unit."""
    if world_size < 2:
        return 0.0
    adj = np.zeros((world_size, world_size))
    for s in holder_sets:
        for a in s:
            for b in s:
                if a != b:
                    adj[a, b] = 1.0
    lap = np.diag(adj.sum(1)) - adj
    return float(max(0.0, np.linalg.eigvalsh(lap)[1]))


def _windows(n: int, k: int, perm: list[int]) -> list[tuple[int, ...]]:
    if k >= n:
        return [tuple(range(n))]
    return [tuple(sorted(perm[(j + i) % n] for i in range(k))) for j in range(n)]


def make_plan(units: Sequence[UnitCost], world_size: int, coverage: float | Sequence[float], seed: int = 0, *,
              level: str = "block", shared_params: int = 0, shared_bytes: int = 0,
              shared_flops: float | None = None, tolerance: float | None = None,
              memory_budget: MemoryBudget | Sequence[int | str] | None = None,
              shared_activations: float = 0.0) -> Plan:
    """Assign every unit to k = max(1, round(C*N)) workers, balancing parameters and compute.
    ``tolerance``: a random plan instead of the most balanced one: each unit (largest first) goes
    to a window drawn at random among those that keep the most-loaded worker within (1 + tolerance)
    of the best choice for that unit (so re-drawn plans mix the units, not only the workers'
    names), still covering every worker and connected.
    ``coverage`` one value per rank, or ``memory_budget`` (one size per rank, or a MemoryBudget;
    ``shared_activations``: the bytes of activations every worker keeps): ``plan_targeted``. Per-rank
    coverages that are all equal give the uniform plan (the same fingerprint)."""
    if not isinstance(coverage, (int, float)):
        coverages = _check_coverages(coverage, world_size)
        if memory_budget is None and len(set(coverages)) == 1:
            coverage = coverages[0]
    if memory_budget is not None or not isinstance(coverage, (int, float)):
        if tolerance is not None:
            raise PlanError("a re-drawn plan (tolerance=) takes one coverage for every worker and no memory budget")
        return plan_targeted(units, world_size, coverage, seed, level=level, shared_params=shared_params,
                             shared_bytes=shared_bytes, shared_flops=shared_flops, memory_budget=memory_budget,
                             shared_activations=shared_activations)
    if not 0 < coverage <= 1:
        raise PlanError(f"coverage must be in (0, 1], got {coverage}")
    if world_size < 1:
        raise PlanError(f"world size must be >= 1, got {world_size}")
    if not units:
        raise PlanError("no units to plan")
    if len({u.name for u in units}) != len(units):
        raise PlanError("unit names repeat")
    n, k = world_size, holders_needed(coverage, world_size)
    flops_counted = all(u.flops is not None for u in units)
    flops = {u.name: float(u.flops) if flops_counted and u.flops is not None else float(u.params) for u in units}
    rng = random.Random(seed)
    perm = list(range(n))
    rng.shuffle(perm)
    windows = _windows(n, k, perm)
    min_windows = 1 if k >= n else math.ceil(n / k)
    if len(units) < min_windows:
        raise PlanError(
            f"{len(units)} units with k={k} holders each cannot give all {n} workers a unit "
            f"(need at least {min_windows} units); use more blocks, neuron level, or higher coverage")
    cost = _cost_matrix(units, flops)
    member = np.zeros((len(windows), n))
    for j, w in enumerate(windows):
        member[j, list(w)] = 1.0
    assignment = None
    if level == "neuron" and all(u.site is not None for u in units):
        assignment = _assign_sites(units, cost, member)
    if assignment is None:
        assignment = _best_of_restarts(units, cost, member, rng, forced=None)
    if tolerance is not None and assignment is not None:
        # a random plan whose most-loaded worker stays within the tolerance of the balanced one's
        limit = _objective(_load(assignment, cost, member))[0] * (1 + tolerance) + 1e-12
        parts = _components(member, np.bincount(assignment, minlength=member.shape[0]))  # k = 1: N parts
        for _ in range(RESTARTS * 8):
            drawn = _assign_at_random(cost, member, rng, tolerance, parts)
            if drawn is not None and _objective(_load(drawn, cost, member))[0] <= limit:
                assignment = drawn
                break
    if assignment is None:
        # Windows starting k positions apart cover the ring: give each one a unit first.
        cover = list(range(0, n, k))[:min_windows] if k < n else [0]
        assignment = _best_of_restarts(units, cost, member, rng, forced=cover)
    assert assignment is not None
    holders = {u.name: windows[assignment[i]] for i, u in enumerate(units)}
    return _plan(units, n, coverage, k, seed, level, holders, flops, flops_counted, shared_params, shared_bytes,
                 shared_flops)


def _plan(units: Sequence[UnitCost], n: int, coverage: float, k: int, seed: int, level: str,
          holders: dict[str, tuple[int, ...]], flops: dict[str, float], flops_counted: bool, shared_params: int,
          shared_bytes: int, shared_flops: float | None, **heterogeneous: Any) -> Plan:
    """The Plan of a placement (both planners); ``heterogeneous``: plan_targeted's fields."""
    return Plan(world_size=n, coverage=coverage, k=k, seed=seed, level=level, holders=holders,
                unit_params={u.name: u.params for u in units}, unit_bytes={u.name: u.bytes for u in units},
                unit_activations={u.name: float(u.activations or 0.0) for u in units},
                unit_flops=flops, flops_counted=flops_counted, shared_params=shared_params,
                shared_bytes=shared_bytes,
                shared_flops=float(shared_flops if shared_flops is not None and flops_counted else (
                    shared_params if not flops_counted else 0.0)), **heterogeneous)


def _cost_matrix(units: Sequence[UnitCost], flops: dict[str, float]) -> np.ndarray:
    """(U, criteria): each unit's share of the parameters, of the compute and (when every unit's
    is counted) of the saved activations; each worker's load is balanced on its largest share."""
    p_total = sum(u.params for u in units) or 1
    f_total = sum(flops.values()) or 1.0
    columns = [[u.params / p_total for u in units], [flops[u.name] / f_total for u in units]]
    activations = [u.activations for u in units if u.activations is not None]
    if len(activations) == len(units) and sum(activations) > 0:  # every unit's counted
        # activation memory is not proportional to either: early ResNet stages hold most of it
        a_total = sum(activations)
        columns.append([a / a_total for a in activations])
    return np.array(columns).T


def _check_coverages(coverage: Sequence[float], world_size: int) -> list[float]:
    if isinstance(coverage, (str, bytes)) or not isinstance(coverage, Sequence):
        raise PlanError(f"coverage must be a number in (0, 1] or one per worker, got {coverage!r}")
    values = list(coverage)
    if len(values) != world_size:
        raise PlanError(f"coverage has {len(values)} values for {world_size} workers: give one number, or one per "
                        "worker (rank order)")
    bad = [c for c in values if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1]
    if bad:
        raise PlanError(f"each worker's coverage must be in (0, 1], got {bad[0]!r} in {values}")
    return [float(c) for c in values]


# -- heterogeneous workers -------------------------------------------------------------------


def plan_targeted(units: Sequence[UnitCost], world_size: int, coverage: float | Sequence[float], seed: int = 0, *,
                  level: str = "block", shared_params: int = 0, shared_bytes: int = 0,
                  shared_flops: float | None = None,
                  memory_budget: MemoryBudget | Sequence[int | str] | None = None,
                  shared_activations: float = 0.0) -> Plan:
    """A plan for workers that differ. Every unit has exactly k holders:

    - per-rank ``coverage`` c_r: k = max(1, round(sum c_r)); worker r's target is c_r / sum(c) * k
      of the unit load (its share of parameters, compute and saved activations, the largest of
      the three), and the plan minimises the largest load / target;
    - ``memory_budget`` (``coverage`` one number, giving k): the loads are balanced as in the
      uniform plan, under the constraint that every worker's predicted peak (MemoryBudget's model)
      stays within its budget. A budget that cannot hold the shared part plus one unit, budgets
      that together cannot hold k copies of every unit, or a unit that fits on fewer than k
      workers raise PlanError naming the shortfall in bytes.

    Holder sets come from every k-subset of the workers when there are at most max(16, 4N) of them,
    else from the windows of four permutations (one with the workers sorted by target, three
    seeded); a worker-overlap graph connected when k >= 2 and every worker holding a unit come
    first, as in the uniform plan."""
    n = world_size
    if n < 1:
        raise PlanError(f"world size must be >= 1, got {n}")
    if not units:
        raise PlanError("no units to plan")
    if len({u.name for u in units}) != len(units):
        raise PlanError("unit names repeat")
    budget: MemoryBudget | None = None
    if memory_budget is not None:
        budget = memory_budget if isinstance(memory_budget, MemoryBudget) else MemoryBudget(memory_budget)  # type: ignore[arg-type]
        if len(budget.per_worker) != n:
            raise PlanError(f"memory_budget has {len(budget.per_worker)} sizes for {n} workers: give one per worker "
                            "(rank order)")
        if not isinstance(coverage, (int, float)):
            raise PlanError("give per-rank coverage or memory_budget, not both: with memory_budget, coverage is one "
                            "number (it sets k, the holders per unit)")
    coverages: list[float] | None = None
    if isinstance(coverage, (int, float)):
        if isinstance(coverage, bool) or not 0 < coverage <= 1:
            raise PlanError(f"coverage must be in (0, 1], got {coverage}")
        k = holders_needed(coverage, n)
        targets = np.full(n, k / n)
        mean = float(coverage)
    else:
        coverages = _check_coverages(coverage, n)
        total = sum(coverages)
        k = max(1, min(n, math.floor(total + 0.5)))
        targets = np.array([k * c / total for c in coverages])
        mean = total / n
    flops_counted = all(u.flops is not None for u in units)
    flops = {u.name: float(u.flops) if flops_counted and u.flops is not None else float(u.params) for u in units}
    min_windows = 1 if k >= n else math.ceil(n / k)
    if len(units) < min_windows:
        raise PlanError(
            f"{len(units)} units with k={k} holders each cannot give all {n} workers a unit "
            f"(need at least {min_windows} units); use more blocks, neuron level, or higher coverage")
    cost = _cost_matrix(units, flops)
    mem = room = None
    if budget is not None:
        fixed, mem = budget.columns([u.bytes for u in units], [u.activations or 0.0 for u in units], shared_bytes,
                                    shared_activations)
        _check_budgets([u.name for u in units], fixed, mem, np.array(budget.per_worker, dtype=float), k)
        room = np.array(budget.per_worker, dtype=float)[:, None] - fixed[None, :]
    rng = random.Random(seed)
    sets = _candidate_sets(n, k, targets, rng)
    member = np.zeros((len(sets), n))
    for j, w in enumerate(sets):
        member[j, list(w)] = 1.0
    assignment = _best_targeted(cost, member, targets, rng, mem, room)
    if assignment is None:
        # windows k positions apart along the first permutation cover every worker: one unit each first
        order = sorted(range(n), key=lambda r: (-targets[r], r))
        cover = [tuple(sorted(order[(j + i) % n] for i in range(k))) for j in range(0, n, k)][:min_windows]
        for w in cover:
            if w not in sets:
                sets.append(w)
                member = np.vstack([member, np.zeros(n)])
                member[-1, list(w)] = 1.0
        assignment = _best_targeted(cost, member, targets, rng, mem, room, forced=[sets.index(w) for w in cover])
    if assignment is None:
        raise PlanError(_no_placement(n, k, budget, mem, room))
    holders = {u.name: sets[assignment[i]] for i, u in enumerate(units)}
    return _plan(units, n, mean, k, seed, level, holders, flops, flops_counted, shared_params, shared_bytes,
                 shared_flops, worker_coverage=coverages, worker_target=[float(t) for t in targets],
                 worker_budget=list(budget.per_worker) if budget is not None else None,
                 memory_model=budget.assumptions() if budget is not None else None,
                 shared_activations=float(shared_activations) if budget is not None else 0.0)


def predicted_peaks(plan: Plan) -> list[float]:
    """The memory model's peak of every worker of a plan made with memory budgets, bytes."""
    assert plan.worker_budget is not None and plan.memory_model is not None
    budget = MemoryBudget(tuple(plan.worker_budget), **plan.memory_model)
    names = list(plan.holders)
    fixed, per_unit = budget.columns([plan.unit_bytes[u] for u in names],
                                     [plan.unit_activations.get(u, 0.0) for u in names],
                                     plan.shared_bytes, plan.shared_activations)
    peaks = []
    for r in range(plan.world_size):
        held = [i for i, u in enumerate(names) if r in plan.holders[u]]
        peaks.append(float((fixed + per_unit[held].sum(axis=0)).max()))
    return peaks


def _check_budgets(names: Sequence[str], fixed: np.ndarray, mem: np.ndarray, budgets: np.ndarray, k: int) -> None:
    """PlanError naming the shortfall in bytes when no plan can fit the budgets."""
    need = (fixed[None, :] + mem).max(axis=1)  # a worker holding unit u alone
    smallest = int(np.argmin(need))
    col = int(np.argmax(fixed + mem[smallest]))
    short = [f"worker {r}'s budget of {format_bytes(b)} cannot hold the shared weights, their state and "
             f"activations ({format_bytes(fixed[col])}) plus its smallest unit ({names[smallest]}: "
             f"{format_bytes(mem[smallest, col])}): short by {format_bytes(need[smallest] - b)}"
             for r, b in enumerate(budgets) if b < need[smallest]]
    if short:
        raise PlanError("; ".join(short))
    what = ("saved activations", "the optimizer step's temporaries")
    for c in range(2):
        total = mem[:, c].sum()
        usable = np.minimum(np.maximum(budgets - fixed[c], 0.0), total).sum()
        if usable < k * total:
            raise PlanError(f"the budgets together leave {format_bytes(usable)} for units beyond each worker's shared "
                            f"part; k={k} copies of every unit (with {what[c]}) need {format_bytes(k * total)}: "
                            f"short by {format_bytes(k * total - usable)}")
    for i, name in enumerate(names):
        fits = [r for r, b in enumerate(budgets) if (fixed + mem[i] <= b).all()]
        if len(fits) < k:
            raise PlanError(f"unit {name} (with the shared part {format_bytes(need[i])}) fits in the budget of only "
                            f"{len(fits)} worker(s) {fits}; it needs k={k} holders: raise those budgets or lower "
                            "the coverage")


def _no_placement(n: int, k: int, budget: MemoryBudget | None, mem: np.ndarray | None,
                  room: np.ndarray | None) -> str:
    if budget is None or mem is None or room is None:
        return f"no placement of the units gives all {n} workers a unit with k={k} holders each"
    return (f"no placement found that keeps every worker within its memory budget with k={k} holders per unit "
            f"(the units need {format_bytes(k * mem.sum(axis=0).max())} beyond the shared parts, the budgets leave "
            f"{format_bytes(np.maximum(room, 0).sum(axis=0).min())}): raise the tightest budgets or lower the coverage")


def _candidate_sets(n: int, k: int, targets: np.ndarray, rng: random.Random) -> list[tuple[int, ...]]:
    if k >= n:
        return [tuple(range(n))]
    if math.comb(n, k) <= max(16, 4 * n):
        return list(combinations(range(n), k))
    perms = [sorted(range(n), key=lambda r: (-targets[r], r))]  # the heaviest workers side by side
    for _ in range(3):
        perm = list(range(n))
        rng.shuffle(perm)
        perms.append(perm)
    sets: list[tuple[int, ...]] = []
    for perm in perms:
        sets += [w for w in _windows(n, k, perm) if w not in sets]
    return sets


def _best_targeted(cost: np.ndarray, member: np.ndarray, targets: np.ndarray, rng: random.Random,
                   mem: np.ndarray | None, room: np.ndarray | None,
                   forced: list[int] | None = None) -> list[int] | None:
    """Greedy + local search from several seeded tie-breaks (and, under budgets, a memory-first
    greedy too); the best (connected, then balanced against the targets)."""
    best, best_key = None, None
    modes = (False, True) if mem is not None else (False,)
    for fill in modes:
        for attempt in range(RESTARTS):
            assignment = _assign_targeted(cost, member, targets, random.Random(rng.random()), attempt > 0,
                                          mem, room, fill, forced)
            if assignment is None:
                continue
            counts = np.bincount(assignment, minlength=member.shape[0])
            load = _load(assignment, cost, member) / targets[:, None]
            key = (_components(member, counts), *_objective(load))
            if best_key is None or key < best_key:
                best, best_key = assignment, key
    return best


def _assign_targeted(cost: np.ndarray, member: np.ndarray, targets: np.ndarray, rng: random.Random,
                     randomise: bool, mem: np.ndarray | None, room: np.ndarray | None,
                     fill: bool, forced: list[int] | None = None) -> list[int] | None:
    """Largest unit first into the best holder set (fewest workers left uncovered, then a connected
    overlap graph, then balance: otherwise worker groups never mix; ties to the least-used set,
    then the lowest index or a seeded random one), then local search moving one unit at a time
    while it helps, keeping every worker covered and the graph as connected as the greedy pass
    left it. Each worker's load is divided by its target; under budgets only sets with room for the unit on every
    holder, and ``fill`` ranks them by the fullest worker's fraction of its room first (the
    placement most likely to fit). None if a unit fits nowhere or a worker is left out."""
    num_sets, n = member.shape
    scale = (1.0 / targets)[:, None]
    if fill and mem is not None and room is not None:
        size = (mem / np.maximum(room.mean(axis=0), 1.0)).max(axis=1)
        order = sorted(range(len(cost)), key=lambda i: (-size[i], rng.random()))
    else:
        order = sorted(range(len(cost)), key=lambda i: (-cost[i].max(), rng.random()))
    load = np.zeros((n, cost.shape[1]))
    used = np.zeros((n, 2))
    assignment = [-1] * len(cost)
    covered = np.zeros(n)
    counts = np.zeros(num_sets, dtype=int)
    connected = False

    def fits(j: int, i: int, base: np.ndarray) -> bool:
        return mem is None or room is None or bool((base + np.outer(member[j], mem[i]) <= room + 1e-6).all())

    for position, i in enumerate(order):
        best, best_key = -1, None
        choices = [forced[position]] if forced and position < len(forced) else range(num_sets)
        for j in choices:
            if not fits(j, i, used):
                continue
            trial = load + np.outer(member[j], cost[i])
            uncovered = float(((covered + member[j]) == 0).sum())
            parts = 1
            if not connected:
                counts[j] += 1
                parts = _components(member, counts)
                counts[j] -= 1
            fullest = 0.0
            if fill and mem is not None and room is not None:
                fullest = float(((used + np.outer(member[j], mem[i])) / np.maximum(room, 1.0)).max())
            tie = rng.random() if randomise else j
            key = (uncovered, parts, fullest, *_objective(trial * scale), counts[j], tie)
            if best_key is None or key < best_key:
                best, best_key = j, key
        if best < 0:
            return None
        assignment[i] = best
        load += np.outer(member[best], cost[i])
        if mem is not None:
            used += np.outer(member[best], mem[i])
        covered += member[best]
        counts[best] += 1
        connected = connected or _components(member, counts) == 1
    parts = _components(member, counts)
    for _ in range(50):
        improved = False
        current = _objective(load * scale)
        for i in range(len(cost)):
            src = assignment[i]
            base = load - np.outer(member[src], cost[i])
            base_used = used - np.outer(member[src], mem[i]) if mem is not None else used
            cover_without = covered - member[src]
            for j in range(num_sets):
                if j == src or ((cover_without + member[j]) == 0).any() or not fits(j, i, base_used):
                    continue
                trial = base + np.outer(member[j], cost[i])
                if _objective(trial * scale) >= tuple(x - 1e-12 for x in current):
                    continue
                counts[src] -= 1
                counts[j] += 1
                if _components(member, counts) > parts:
                    counts[src] += 1
                    counts[j] -= 1
                    continue
                assignment[i], load, covered = j, trial, cover_without + member[j]
                if mem is not None:
                    used = base_used + np.outer(member[j], mem[i])
                current, src = _objective(load * scale), j
                base = load - np.outer(member[src], cost[i])
                base_used = used - np.outer(member[src], mem[i]) if mem is not None else used
                cover_without = covered - member[src]
                improved = True
        if not improved:
            break
    return assignment if (covered > 0).all() else None


def _objective(load: np.ndarray) -> tuple[float, float]:
    worst = load.max(axis=1)  # each worker: the larger of its parameter share and compute share
    return float(worst.max()), float((worst ** 2).sum())


def _components(member: np.ndarray, counts: np.ndarray) -> int:
    """Connected components of the worker-overlap graph of the windows in use."""
    n = member.shape[1]
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for j in np.nonzero(counts)[0]:
        ranks = np.nonzero(member[j])[0]
        for r in ranks[1:]:
            parent[find(int(r))] = find(int(ranks[0]))
    return len({find(r) for r in range(n)})


RESTARTS = 8


def _best_of_restarts(units: Sequence[UnitCost], cost: np.ndarray, member: np.ndarray,
                      rng: random.Random, forced: list[int] | None) -> list[int] | None:
    """Greedy + local search from several seeded tie-breaks; the best (connected, then balanced):
    ``_best_targeted`` with every worker's target 1, which takes the same steps and draws."""
    return _best_targeted(cost, member, np.ones(member.shape[1]), rng, None, None, forced)


def _load(assignment: list[int], cost: np.ndarray, member: np.ndarray) -> np.ndarray:
    # an array, not sum()'s start 0: there is at least one unit (make_plan rejects none)
    return cast(np.ndarray, sum(np.outer(member[a], cost[i]) for i, a in enumerate(assignment)))


def _assign_at_random(cost: np.ndarray, member: np.ndarray, rng: random.Random, tolerance: float,
                      max_parts: int = 1) -> list[int] | None:
    """Largest unit first, each into a window drawn among those within the tolerance of the most
    balanced choice; None when a worker is left out or the overlap graph falls into more than
    ``max_parts`` parts."""
    num_windows, n = member.shape
    order = sorted(range(len(cost)), key=lambda i: (-cost[i].max(), rng.random()))
    load = np.zeros((n, cost.shape[1]))
    counts = np.zeros(num_windows, dtype=int)
    assignment = [-1] * len(cost)
    for i in order:
        worst = [_objective(load + np.outer(member[j], cost[i]))[0] for j in range(num_windows)]
        best = min(worst)
        j = rng.choice([j for j in range(num_windows) if worst[j] <= best * (1 + tolerance) + 1e-12])
        assignment[i] = j
        load += np.outer(member[j], cost[i])
        counts[j] += 1
    if (member[assignment].sum(0) == 0).any() or _components(member, counts) > max_parts:
        return None
    return assignment


def _assign_sites(units: Sequence[UnitCost], cost: np.ndarray, member: np.ndarray) -> list[int] | None:
    num_windows, n = member.shape
    by_site: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        by_site.setdefault(u.site, []).append(i)  # type: ignore[arg-type]
    sites = sorted(by_site, key=lambda s: (-cost[by_site[s]].sum(), s))
    load = np.zeros((n, cost.shape[1]))
    assignment = [-1] * len(units)
    for site in sites:
        idx = sorted(by_site[site], key=lambda i: units[i].group)
        g = len(idx)

        def window_of(offset: int, rank_in_site: int) -> int:
            step = rank_in_site * num_windows // g if g <= num_windows else rank_in_site
            return (offset + step) % num_windows

        best, best_key = 0, None
        for offset in range(num_windows):
            trial = load.copy()
            for r, i in enumerate(idx):
                trial += np.outer(member[window_of(offset, r)], cost[i])
            key = (*_objective(trial), offset)
            if best_key is None or key < best_key:
                best, best_key = offset, key
        for r, i in enumerate(idx):
            assignment[i] = window_of(best, r)
            load += np.outer(member[assignment[i]], cost[i])
    covered = member[assignment].sum(0)
    return assignment if (covered > 0).all() else None
