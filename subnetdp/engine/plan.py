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

The plan is a pure function of (units, N, C, seed): every rank computes it locally.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Sequence, cast

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
        payload = json.dumps({"n": self.world_size, "c": self.coverage, "seed": self.seed,
                              "level": self.level, "holders": sorted(self.holders.items()),
                              "params": sorted(self.unit_params.items()),
                              "shared": self.shared_params}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["holders"] = {u: list(r) for u, r in self.holders.items()}
        out["holder_sets"] = [list(s) for s in self.holder_sets]
        out["balance"] = self.balance()
        return out

    def table(self) -> str:
        """The plan as readable text: one row per unit, then one row per worker."""
        n = self.world_size
        name_w = max([len(u) for u in self.holders] + [8])
        lines = [f"SDP plan: {self.level} level, N={n} workers, coverage C={self.coverage:g} "
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
        lines.append(f"{'worker':>6}  {'units':>5}  {'params':>13}  {'of model':>8}  {'param MiB':>9}  {'GFLOP':>8}")
        for r in range(n):
            lines.append(f"{r:>6}  {len(self.held_units(r)):>5}  {self.worker_params[r]:>13,}  "
                         f"{self.worker_params[r] / total:>8.1%}  {self.worker_bytes[r] / 2**20:>9.2f}  "
                         f"{self.worker_flops[r] / 1e9:>8.3f}")
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
        return "\n".join(lines)


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


def make_plan(units: Sequence[UnitCost], world_size: int, coverage: float, seed: int = 0, *,
              level: str = "block", shared_params: int = 0, shared_bytes: int = 0,
              shared_flops: float | None = None, tolerance: float | None = None) -> Plan:
    """Assign every unit to k = max(1, round(C*N)) workers, balancing parameters and compute.
    ``tolerance``: a random plan instead of the most balanced one: each unit (largest first) goes
    to a window drawn at random among those that keep the most-loaded worker within (1 + tolerance)
    of the best choice for that unit (so re-drawn plans mix the units, not only the workers'
    names), still covering every worker and connected."""
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
    p_total = sum(u.params for u in units) or 1
    f_total = sum(flops.values()) or 1.0
    columns = [[u.params / p_total for u in units], [flops[u.name] / f_total for u in units]]
    activations = [u.activations for u in units if u.activations is not None]
    if len(activations) == len(units) and sum(activations) > 0:  # every unit's counted
        # activation memory is not proportional to either: early ResNet stages hold most of it
        a_total = sum(activations)
        columns.append([a / a_total for a in activations])
    cost = np.array(columns).T  # (U, criteria): each worker's load is balanced on its largest share
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
    return Plan(world_size=n, coverage=coverage, k=k, seed=seed, level=level, holders=holders,
                unit_params={u.name: u.params for u in units}, unit_bytes={u.name: u.bytes for u in units},
                unit_activations={u.name: float(u.activations or 0.0) for u in units},
                unit_flops=flops, flops_counted=flops_counted, shared_params=shared_params,
                shared_bytes=shared_bytes,
                shared_flops=float(shared_flops if shared_flops is not None and flops_counted else (
                    shared_params if not flops_counted else 0.0)))


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
    """Greedy + local search from several seeded tie-breaks; the best (connected, then balanced)."""
    best, best_key = None, None
    for attempt in range(RESTARTS):
        assignment = _assign_greedy(units, cost, member, random.Random(rng.random()), forced,
                                    randomise=attempt > 0)
        if assignment is None:
            continue
        counts = np.bincount(assignment, minlength=member.shape[0])
        load = _load(assignment, cost, member)
        key = (_components(member, counts), *_objective(load))
        if best_key is None or key < best_key:
            best, best_key = assignment, key
    return best


def _assign_greedy(units: Sequence[UnitCost], cost: np.ndarray, member: np.ndarray,
                   rng: random.Random, forced: list[int] | None = None,
                   randomise: bool = False) -> list[int] | None:
    """Largest unit first into the best window, then local search; None if a worker is left out.
    Ties go to the least-used window, then to the lowest index (or a seeded random one)."""
    num_windows, n = member.shape
    order = sorted(range(len(units)), key=lambda i: (-cost[i].max(), rng.random()))
    load = np.zeros((n, cost.shape[1]))
    assignment = [-1] * len(units)
    covered = np.zeros(n)
    counts = np.zeros(num_windows, dtype=int)
    connected = False
    for position, i in enumerate(order):
        best, best_key = 0, None
        choices = [forced[position]] if forced and position < len(forced) else range(num_windows)
        for j in choices:
            trial = load + np.outer(member[j], cost[i])
            uncovered = float(((covered + member[j]) == 0).sum())
            # A connected overlap graph comes before balance: otherwise worker groups never mix.
            parts = 1
            if not connected:
                counts[j] += 1
                parts = _components(member, counts)
                counts[j] -= 1
            tie = rng.random() if randomise else j
            key = (uncovered, parts, *_objective(trial), counts[j], tie)
            if best_key is None or key < best_key:
                best, best_key = j, key
        assignment[i] = best
        load += np.outer(member[best], cost[i])
        covered += member[best]
        counts[best] += 1
        connected = connected or _components(member, counts) == 1
    # Local search: move one unit at a time while it helps, keeping every worker covered and the
    # overlap graph as connected as the greedy pass left it.
    parts = _components(member, counts)
    for _ in range(50):
        improved = False
        current = _objective(load)
        for i in range(len(units)):
            src = assignment[i]
            base = load - np.outer(member[src], cost[i])
            cover_without = covered - member[src]
            for j in range(num_windows):
                if j == src or ((cover_without + member[j]) == 0).any():
                    continue
                trial = base + np.outer(member[j], cost[i])
                if _objective(trial) >= tuple(x - 1e-12 for x in current):
                    continue
                counts[src] -= 1
                counts[j] += 1
                if _components(member, counts) > parts:
                    counts[src] += 1
                    counts[j] -= 1
                    continue
                assignment[i], load, covered = j, trial, cover_without + member[j]
                current, src = _objective(load), j
                base = load - np.outer(member[src], cost[i])
                cover_without = covered - member[src]
                improved = True
        if not improved:
            break
    return assignment if (covered > 0).all() else None


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
