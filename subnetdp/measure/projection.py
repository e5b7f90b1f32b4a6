"""On paper, past one machine: step time of DDP, FSDP2 and B-SDP projected to 8..1024 GPUs from
measured per-worker compute and an alpha-beta model of every collective (issue 11, item 8).

    python -m subnetdp.measure.projection --bench benchmarks/h200-llama134m/bench.json \\
        --out docs/scaling/llama134m

writes ``projection.md`` (the table), ``projection.json`` (every figure) and ``projection.png``
(step time against N on a log2 axis, and SDP / DDP) into ``--out``. It is a projection, not a
measurement.

Inputs, from a ``subnetdp bench`` record (``bench.json``):
- per-worker compute: ``time_s`` forward / backward / optimizer of each strategy. On a fake process
  group collectives do nothing, so this is compute only. A worker's compute does not depend on N
  (each worker keeps its own batch, and its subnetwork depends on C, not on N), so the figures
  measured at the bench's N (4 on one GPU) serve every N. B-SDP at a coverage the bench did not
  measure (C = 2/N) takes a least-squares line in C through the measured B-SDP forward-masking
  points and DDP at C = 1, per phase;
- bytes: P, the gradient bytes DDP all-reduces per step (``comm_bytes_per_step``); S, the shared
  bytes, and U = P - S, the unit bytes (``plan``); the number of blocks (FSDP2 wraps each block;
  B-SDP's units are the blocks).

Collectives per step, per worker (bucketed at 25 MiB, as DDP and our reducer do):
- DDP: all-reduce of P over N;
- FSDP2: all-gather of the parameters in forward and again in backward, reduce-scatter of the
  gradients, each over N, one per wrapped block and one for the root. (FSDP2 does not gather the
  root again in backward: on LLaMA-134m, whose root is the embeddings and head, it hands 0.94x of
  these bytes and sends 0.88x on the wire; not modelled.)
- B-SDP at coverage C: all-reduce of S over N, and of the held units, C * U bytes, within holder
  sets of k = round(C * N) workers, one set per held block (round(C * blocks), at least 1).

Alpha-beta model of one collective over g workers, on nodes of G GPUs (NVLink inside a node, one
NIC per GPU between nodes), placed p members per node on m nodes:
- bandwidth: w = ``ring_wire_bytes(kind, size, g)`` bytes leave each worker. Inside one node they
  go over NVLink: w / B_nvlink. Across nodes NCCL runs one ring per NIC, and each of a node's p
  members is the exit of 1/p of them, so w / p bytes per worker cross the network and the rest
  NVLink; the two pipeline: max((w - w/p) / B_nvlink, (w/p) / B_net). (This is also the
  inter-node term of a hierarchical all-reduce: reduce-scatter in the node, all-reduce of 1/p of
  the bytes between nodes, all-gather in the node.)
- latency, NCCL's own cost model (src/graph/tuning.cc, Simple protocol): ring: a launch latency
  plus alpha per step, 2(g-1) steps for an all-reduce, g-1 for an all-gather or reduce-scatter,
  of which 2m (resp. m-1) cross nodes at the network's alpha; tree (all-reduce only, NCCL's
  double binary tree): launch + 2((p-1) alpha_nvlink + ceil(log2 m) alpha_net), same bandwidth.
  ``--allreduce auto`` takes the faster of the two for each all-reduce, as NCCL's tuner does.
- placement of SDP's holder sets: ``packed`` (as few nodes as possible: a set of k <= G workers
  inside one node) is the best case; ``spread`` (each holder on a different node) the worst.

Step time: ``no overlap`` = forward + backward + optimizer + all communication; ``overlap`` (perfect
overlap, what DDP's and our reducer's buckets aim at) = max(forward, forward comm) + max(backward,
backward comm) + optimizer; only FSDP2 has forward communication.

The network figures below are peak figures of a DGX H100/H200-class cluster and NCCL's latency
table; docs/scaling.md gives their sources, every assumption and the results.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from ..engine.exchange import ring_wire_bytes
from ..plotting import pyplot

MiB = 2 ** 20
BUCKET_BYTES = 25 * MiB        # DDP's bucket_cap_mb default, and our reducer's
GPUS_PER_NODE = 8              # DGX/HGX H100 and H200
NVLINK_BW = 450e9              # bytes/s per GPU per direction: NVLink 4, 900 GB/s bidirectional (H100/H200 SXM)
NET_BW = 50e9                  # bytes/s per GPU: one 400 Gb/s NDR InfiniBand ConnectX-7 per GPU (DGX H100/H200)
LAUNCH_LATENCY = 8.4e-6        # s, NCCL baseLat, ring, Simple protocol
NVLINK_LATENCY = 3.4e-6        # s per step, NCCL hwLat NVLink, ring, Simple
NET_LATENCY = 14e-6            # s per step, NCCL hwLat NET, ring, Simple
WORKERS = tuple(2 ** i for i in range(3, 11))  # 8 .. 1024


@dataclass(frozen=True)
class Network:
    gpus_per_node: int = GPUS_PER_NODE
    nvlink_bw: float = NVLINK_BW
    net_bw: float = NET_BW
    launch_latency: float = LAUNCH_LATENCY
    nvlink_latency: float = NVLINK_LATENCY
    net_latency: float = NET_LATENCY
    allreduce: str = "auto"    # ring | tree | auto (the faster, per collective)


@dataclass(frozen=True)
class Phases:
    forward: float
    backward: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.optimizer


@dataclass(frozen=True)
class Workload:
    """What the bench measured, per worker: bytes of the model and compute of each strategy."""
    total_bytes: float                 # P: gradient bytes DDP all-reduces per step
    shared_bytes: float                # S: held by every worker (embeddings, head, stem, norms)
    blocks: int                        # FSDP2's wrapped blocks, B-SDP's units
    ddp: Phases
    fsdp: Phases | None
    sdp: dict[float, Phases]           # B-SDP forward masking, by measured coverage

    @property
    def unit_bytes(self) -> float:
        return self.total_bytes - self.shared_bytes

    def scaled(self, factor: float) -> Workload:
        """Every compute time times ``factor``: a what-if (faster hardware, a smaller batch per GPU)."""
        def scale(p: Phases) -> Phases:
            return Phases(p.forward * factor, p.backward * factor, p.optimizer * factor)

        return replace(self, ddp=scale(self.ddp), fsdp=scale(self.fsdp) if self.fsdp else None,
                       sdp={c: scale(p) for c, p in self.sdp.items()})

    def sdp_compute(self, coverage: float) -> Phases:
        """Measured at this coverage, else the least-squares line in C through the measured B-SDP
        points and DDP at C = 1 (per phase, never below zero)."""
        for c, phases in self.sdp.items():
            if abs(c - coverage) < 1e-9:
                return phases
        points = [(1.0, self.ddp), *self.sdp.items()]
        return Phases(*(max(0.0, _line([c for c, _ in points], [getattr(p, f) for _, p in points], coverage))
                        for f in ("forward", "backward", "optimizer")))


def _line(xs: list[float], ys: list[float], x: float) -> float:
    if len(set(xs)) < 2:
        return ys[0] * x / xs[0]       # one point: proportional to C
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return my + slope * (x - mx)


@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str                          # ddp | fsdp | sdp
    coverage: float | None = None      # B-SDP: fixed C ...
    holders: int | None = None         # ... or fixed k (C = k / N)

    def coverage_at(self, n: int) -> float:
        if self.kind != "sdp":
            return 1.0
        return self.coverage if self.coverage is not None else min(1.0, self.holders / n)

    def k_at(self, n: int) -> int:
        return n if self.kind != "sdp" else max(1, round(self.coverage_at(n) * n))


STRATEGIES = (Strategy("DDP", "ddp"), Strategy("FSDP2", "fsdp"), Strategy("B-SDP C=0.5", "sdp", coverage=0.5),
              Strategy("B-SDP C=0.25", "sdp", coverage=0.25), Strategy("B-SDP k=2 (C=2/N)", "sdp", holders=2))


@dataclass(frozen=True)
class Collective:
    kind: str                          # all_reduce | all_gather | reduce_scatter
    size: float                        # input bytes of one collective, as ring_wire_bytes takes them
    count: int                         # how many per step
    group: int                         # workers in the group
    phase: str                         # forward | backward: what it can overlap with
    spread: bool = False               # members on as many nodes as possible (else packed)


# ---------------------------------------------------------------------------------------------
# alpha-beta model of one collective


def placement(group: int, world: int, net: Network, spread: bool = False) -> tuple[int, int]:
    """(members per node p, nodes m) of a group of ``group`` workers among ``world``."""
    if spread:
        nodes = min(group, max(1, math.ceil(world / net.gpus_per_node)))
        return math.ceil(group / nodes), nodes
    per_node = min(group, net.gpus_per_node)
    return per_node, math.ceil(group / per_node)


def wire_split(kind: str, size: float, group: int, per_node: int, nodes: int) -> tuple[float, float]:
    """Bytes one worker sends (all of them, those that cross nodes) under the ring model."""
    wire = ring_wire_bytes(kind, size, group)
    return wire, (wire / per_node if nodes > 1 else 0.0)


def bandwidth_time(kind: str, size: float, group: int, per_node: int, nodes: int, net: Network) -> float:
    wire, crossing = wire_split(kind, size, group, per_node, nodes)
    return max((wire - crossing) / net.nvlink_bw, crossing / net.net_bw)


def ring_latency(kind: str, group: int, nodes: int, net: Network) -> float:
    """NCCL's ring latency: launch + alpha per step; 2(g-1) steps for an all-reduce (2m of them
    across nodes when m > 1), g-1 for an all-gather / reduce-scatter (m-1 across nodes)."""
    if group <= 1:
        return 0.0
    if kind == "all_reduce":
        steps, crossing = 2 * (group - 1), (2 * nodes if nodes > 1 else 0)
    else:
        steps, crossing = group - 1, nodes - 1
    crossing = min(crossing, steps)
    return net.launch_latency + (steps - crossing) * net.nvlink_latency + crossing * net.net_latency


def tree_latency(group: int, per_node: int, nodes: int, net: Network) -> float:
    """NCCL's tree all-reduce latency: a chain inside the node, a double binary tree between nodes,
    up and down: launch + 2((p-1) alpha_nvlink + ceil(log2 m) alpha_net)."""
    if group <= 1:
        return 0.0
    return net.launch_latency + 2 * ((per_node - 1) * net.nvlink_latency
                                     + math.ceil(math.log2(nodes)) * net.net_latency)


def collective_time(kind: str, size: float, group: int, world: int, net: Network, spread: bool = False) -> float:
    """Seconds for one collective of ``size`` input bytes over ``group`` of ``world`` workers."""
    if group <= 1:
        return 0.0
    per_node, nodes = placement(group, world, net, spread)
    latency = ring_latency(kind, group, nodes, net)
    if kind == "all_reduce" and net.allreduce != "ring":
        tree = tree_latency(group, per_node, nodes, net)
        latency = tree if net.allreduce == "tree" else min(latency, tree)
    return latency + bandwidth_time(kind, size, group, per_node, nodes, net)


# ---------------------------------------------------------------------------------------------
# strategies: their collectives, compute and step time


def _buckets(total: float, bucket: float) -> int:
    return max(1, math.ceil(total / bucket))


def collectives(strategy: Strategy, work: Workload, n: int, bucket: float = BUCKET_BYTES,
                spread: bool = False) -> list[Collective]:
    """One worker's collectives per step (see the module docstring)."""
    p, s = work.total_bytes, work.shared_bytes
    if strategy.kind == "ddp":
        count = _buckets(p, bucket)
        return [Collective("all_reduce", p / count, count, n, "backward")]
    if strategy.kind == "fsdp":
        groups = work.blocks + 1                      # every block, and the root
        shard = p / groups / n                        # one group's all-gather input on one worker
        return [Collective("all_gather", shard, groups, n, "forward"),
                Collective("all_gather", shard, groups, n, "backward"),
                Collective("reduce_scatter", p / groups, groups, n, "backward")]
    coverage, k = strategy.coverage_at(n), strategy.k_at(n)
    held = coverage * work.unit_bytes
    sets = max(1, round(coverage * work.blocks))      # one holder set per held block
    per_set = _buckets(held / sets, bucket)
    shared = _buckets(s, bucket)
    return [Collective("all_reduce", s / shared, shared, n, "backward"),
            Collective("all_reduce", held / (sets * per_set), sets * per_set, k, "backward", spread)]


def compute(strategy: Strategy, work: Workload, n: int, fsdp_compute: str = "measured") -> Phases:
    if strategy.kind == "ddp":
        return work.ddp
    if strategy.kind == "fsdp":
        return work.fsdp if (work.fsdp is not None and fsdp_compute == "measured") else work.ddp
    return work.sdp_compute(strategy.coverage_at(n))


def project(strategy: Strategy, work: Workload, n: int, net: Network, bucket: float = BUCKET_BYTES,
            spread: bool = False, fsdp_compute: str = "measured") -> dict[str, Any]:
    """Projected figures of one strategy on n workers (seconds, bytes per worker per step)."""
    colls = collectives(strategy, work, n, bucket, spread)
    comm = {"forward": 0.0, "backward": 0.0}
    wire = crossing = 0.0
    for c in colls:
        comm[c.phase] += c.count * collective_time(c.kind, c.size, c.group, n, net, c.spread)
        per_node, nodes = placement(c.group, n, net, c.spread)
        w, x = wire_split(c.kind, c.size, c.group, per_node, nodes)
        wire, crossing = wire + c.count * w, crossing + c.count * x
    phases = compute(strategy, work, n, fsdp_compute)
    coverage = strategy.coverage_at(n)
    return {
        "n": n, "strategy": strategy.name, "k": strategy.k_at(n), "coverage": coverage,
        "feasible": strategy.kind != "sdp" or coverage * work.blocks >= 1 - 1e-9,
        "collectives": sum(c.count for c in colls if c.group > 1),
        "wire_bytes": wire, "net_bytes": crossing,
        "comm_forward_s": comm["forward"], "comm_backward_s": comm["backward"],
        "comm_s": comm["forward"] + comm["backward"], "compute_s": phases.total,
        "step_no_overlap_s": phases.total + comm["forward"] + comm["backward"],
        "step_overlap_s": (max(phases.forward, comm["forward"]) + max(phases.backward, comm["backward"])
                           + phases.optimizer),
    }


def projection(work: Workload, net: Network, workers: Iterable[int] = WORKERS,
               strategies: Iterable[Strategy] = STRATEGIES, bucket: float = BUCKET_BYTES,
               fsdp_compute: str = "measured") -> list[dict[str, Any]]:
    """Every strategy at every N; SDP rows also carry the step times with holders spread."""
    rows = []
    for n in workers:
        for strategy in strategies:
            row = project(strategy, work, n, net, bucket, False, fsdp_compute)
            if strategy.kind == "sdp":
                spread = project(strategy, work, n, net, bucket, True, fsdp_compute)
                row.update({f"spread_{key}": spread[key] for key in ("comm_s", "net_bytes", "step_no_overlap_s",
                                                                     "step_overlap_s")})
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# reading a bench record


def _phases(ranks: list[dict[str, Any]], rank_time: str) -> Phases:
    """The slowest rank's median phases (a synchronous step waits for it), or per-phase medians."""
    if rank_time == "max":
        t = max(ranks, key=lambda r: r["time_s"]["step"])["time_s"]
        return Phases(t["forward"], t["backward"], t["optimizer"])
    return Phases(*(statistics.median(r["time_s"][f] for r in ranks) for f in ("forward", "backward", "optimizer")))


def blocks_of(args: dict[str, Any]) -> int | None:
    """The number of blocks of the bench's model, from its preset (None when unknown)."""
    model = args.get("model")
    if model == "resnet18":
        return 8
    if model == "llama":
        from ..models.llama import PRESETS
        return PRESETS[args["preset"]].n_layers if args.get("preset") in PRESETS else None
    if model == "vit":
        from ..models.vit import PRESETS as VIT_PRESETS
        return VIT_PRESETS[args["preset"]]["depth"] if args.get("preset") in VIT_PRESETS else None
    return None


def load_bench(path: Path, blocks: int | None = None, rank_time: str = "max") -> tuple[Workload, dict[str, Any]]:
    """The workload of a bench.json, and its command / machine / args."""
    record = json.loads(Path(path).read_text())
    results = {r["strategy"]: r["ranks"] for r in record["results"] if not r.get("failed") and r["ranks"]}
    if "ddp" not in results:
        raise ValueError(f"{path}: no ddp result; the projection needs DDP's compute and bytes")
    plans = [ranks[0]["plan"] for name, ranks in results.items() if name.startswith("sdp-block") and "plan" in ranks[0]]
    if not plans:
        raise ValueError(f"{path}: no sdp-block-* result with a plan; the projection needs the shared bytes")
    sdp = {}
    for name, ranks in results.items():
        match = re.fullmatch(r"sdp-block-fwd@([0-9.]+)", name)
        if match:
            sdp[float(match.group(1))] = _phases(ranks, rank_time)
    blocks = blocks or blocks_of(record.get("args", {}))
    if not blocks:
        raise ValueError(f"{path}: cannot tell the model's number of blocks; pass --blocks")
    work = Workload(total_bytes=float(results["ddp"][0]["comm_bytes_per_step"]),
                    shared_bytes=float(plans[0]["shared_bytes"]), blocks=blocks,
                    ddp=_phases(results["ddp"], rank_time),
                    fsdp=_phases(results["fsdp"], rank_time) if "fsdp" in results else None, sdp=sdp)
    meta = {key: record.get(key) for key in ("command", "machine", "args")}
    meta["world_size"] = results["ddp"][0].get("world_size")
    return work, meta


# ---------------------------------------------------------------------------------------------
# report: markdown table, JSON, plot


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def markdown(rows: list[dict[str, Any]], work: Workload, net: Network, meta: dict[str, Any], command: str,
             settings: dict[str, Any]) -> str:
    machine = meta.get("machine") or {}
    lines = [
        "# Projected step time, 8 to 1024 GPUs (alpha-beta model; a projection, not a measurement)", "",
        f"`{command}`", "",
        f"Measured input: `{meta.get('command')}` on {machine.get('device', '?')} "
        f"(torch {machine.get('torch', '?')}), {meta.get('world_size')} ranks. Compute per worker is that "
        f"bench's ({'the slowest rank' if settings['rank_time'] == 'max' else 'per-phase medians over ranks'}, "
        f"median over steps); it does not change with N."
        + (f" **What-if: every compute time multiplied by {settings['compute_scale']:g}.**"
           if settings["compute_scale"] != 1 else ""), "",
        f"Model: P = {work.total_bytes / MiB:.1f} MiB of gradients, S = {work.shared_bytes / MiB:.1f} MiB shared "
        f"({work.shared_bytes / work.total_bytes:.0%}), U = {work.unit_bytes / MiB:.1f} MiB in {work.blocks} blocks; "
        f"buckets of {settings['bucket_mb']:g} MiB.", "",
        "Compute per step (ms, forward + backward + optimizer): "
        + "; ".join([f"DDP {_ms(work.ddp.forward)} + {_ms(work.ddp.backward)} + {_ms(work.ddp.optimizer)}"]
                    + ([f"FSDP2 {_ms(work.fsdp.forward)} + {_ms(work.fsdp.backward)} + {_ms(work.fsdp.optimizer)}"
                        + (" (DDP's used: --fsdp-compute ddp)" if settings["fsdp_compute"] == "ddp" else "")]
                       if work.fsdp else [])
                    + [f"B-SDP C={c:g} {_ms(p.forward)} + {_ms(p.backward)} + {_ms(p.optimizer)}"
                       for c, p in sorted(work.sdp.items(), reverse=True)])
        + ". Other coverages: least-squares line in C through these and DDP at C = 1.", "",
        f"Network: {net.gpus_per_node} GPUs per node; NVLink {net.nvlink_bw / 1e9:g} GB/s per GPU per direction, "
        f"network {net.net_bw / 1e9:g} GB/s per GPU; latency {net.launch_latency * 1e6:g} us per collective + "
        f"{net.nvlink_latency * 1e6:g} us per NVLink step + {net.net_latency * 1e6:g} us per network step; "
        f"all-reduce algorithm: {net.allreduce}.", "",
        "Per worker per step. wire: bytes sent under the ring model; net: those crossing nodes. "
        "overlap: communication perfectly overlapped with backward (FSDP2: also forward); no overlap: added. "
        "SDP holder sets packed into as few nodes as possible; the last column spreads each set's holders "
        "over different nodes (no overlap). `*`: C x blocks < 1, a worker would hold less than one block "
        "(needs finer units, e.g. neuron groups).", "",
        "| N | strategy | k | collectives | wire MiB | net MiB | comm ms | compute ms | step ms, overlap | vs DDP "
        "| step ms, no overlap | vs DDP | no overlap, spread | vs DDP |",
        "|" + "---|" * 14,
    ]
    ddp = {r["n"]: r for r in rows if r["strategy"] == "DDP"}
    for r in rows:
        base = ddp.get(r["n"])
        spread = ((_ms(r["spread_step_no_overlap_s"]),
                   _ratio(r["spread_step_no_overlap_s"], base["step_no_overlap_s"]) if base else "-")
                  if "spread_step_no_overlap_s" in r else ("", ""))
        lines.append(
            f"| {r['n']} | {r['strategy']}{'' if r['feasible'] else '*'} | {r['k']} | {r['collectives']} "
            f"| {r['wire_bytes'] / MiB:.1f} | {r['net_bytes'] / MiB:.1f} | {_ms(r['comm_s'])} | {_ms(r['compute_s'])} "
            f"| {_ms(r['step_overlap_s'])} | {_ratio(r['step_overlap_s'], base['step_overlap_s']) if base else '-'} "
            f"| {_ms(r['step_no_overlap_s'])} "
            f"| {_ratio(r['step_no_overlap_s'], base['step_no_overlap_s']) if base else '-'} "
            f"| {spread[0]} | {spread[1]} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    plt = pyplot("the projection plot is")
    if plt is None:
        return None

    names = list(dict.fromkeys(r["strategy"] for r in rows))
    by = {name: [r for r in rows if r["strategy"] == name] for name in names}
    ddp = {r["n"]: r for r in by.get("DDP", [])}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), dpi=100)
    for i, name in enumerate(names):
        color, ns = f"C{i}", [r["n"] for r in by[name]]
        left.plot(ns, [r["step_overlap_s"] * 1e3 for r in by[name]], "-o", color=color, ms=3, label=name)
        left.plot(ns, [r["step_no_overlap_s"] * 1e3 for r in by[name]], "--", color=color, alpha=0.6)
        if name == "DDP" or not ddp:
            continue
        if any(r["strategy"] == name and "spread_step_no_overlap_s" in r for r in rows):
            right.plot(ns, [r["step_overlap_s"] / ddp[r["n"]]["step_overlap_s"] for r in by[name]], "-o",
                       color=color, ms=3, label=name)
            right.plot(ns, [r["step_no_overlap_s"] / ddp[r["n"]]["step_no_overlap_s"] for r in by[name]], "--",
                       color=color, alpha=0.8)
            right.plot(ns, [r["spread_step_no_overlap_s"] / ddp[r["n"]]["step_no_overlap_s"] for r in by[name]],
                       ":", color=color, alpha=0.8)
            infeasible = [r for r in by[name] if not r["feasible"]]
            if infeasible:
                right.scatter([r["n"] for r in infeasible],
                              [r["step_overlap_s"] / ddp[r["n"]]["step_overlap_s"] for r in infeasible],
                              facecolors="none", edgecolors=color, s=60, zorder=3)
    left.set_title("projected step time per worker")
    left.set_ylabel("ms per step (log scale)")
    left.set_yscale("log")
    left.plot([], [], "k-", label="overlap with backward")
    left.plot([], [], "k--", alpha=0.6, label="no overlap")
    right.set_title("SDP / DDP step time")
    right.axhline(1.0, color="gray", lw=0.8)
    right.plot([], [], "k-", label="overlap")
    right.plot([], [], "k--", label="no overlap, holders packed")
    right.plot([], [], "k:", label="no overlap, holders spread")
    right.scatter([], [], facecolors="none", edgecolors="k", s=60, label="below one block per worker")
    right.set_ylim(bottom=0)
    ticks = sorted({r["n"] for r in rows})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set_xlabel("workers N (GPUs)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# command line


def _title(meta: dict[str, Any], args: argparse.Namespace) -> str:
    bench = meta.get("args") or {}
    size = bench.get("preset") or (f"width {bench['width']}" if bench.get("model") == "resnet18" else None)
    device = (meta.get("machine") or {}).get("device", "?")
    scale = f", x{args.compute_scale:g}" if args.compute_scale != 1 else ""
    return (f"{bench.get('model', '?')}{' ' + str(size) if size else ''}: measured compute ({device}{scale}) + "
            f"alpha-beta network, {args.net_gbs:g} GB/s per GPU between nodes, all-reduce {args.allreduce}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m subnetdp.measure.projection",
        description="Project per-step time of DDP, FSDP2 and B-SDP (C=0.5, C=0.25, k=2) to 8..1024 GPUs: measured "
                    "per-worker compute from a `subnetdp bench` record plus an alpha-beta model of every collective "
                    "on a two-level network (NVLink inside a node, one NIC per GPU between nodes). Writes "
                    "projection.md, projection.json and projection.png into --out. A projection, not a measurement.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bench", type=Path, required=True, help="bench.json written by `subnetdp bench`")
    p.add_argument("--out", type=Path, required=True, help="folder for projection.md/.json/.png")
    p.add_argument("--workers", default=",".join(map(str, WORKERS)), help="worker counts N, comma-separated")
    p.add_argument("--blocks", type=int, default=None,
                   help="blocks of the model (FSDP2's wrapped blocks, B-SDP's units); default: from the bench's preset")
    p.add_argument("--bucket-mb", type=float, default=BUCKET_BYTES / MiB, help="gradient bucket size, MiB")
    p.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE)
    p.add_argument("--nvlink-gbs", type=float, default=NVLINK_BW / 1e9, help="NVLink GB/s per GPU per direction")
    p.add_argument("--net-gbs", type=float, default=NET_BW / 1e9, help="network GB/s per GPU between nodes")
    p.add_argument("--launch-us", type=float, default=LAUNCH_LATENCY * 1e6, help="latency per collective, us")
    p.add_argument("--nvlink-us", type=float, default=NVLINK_LATENCY * 1e6, help="latency per NVLink step, us")
    p.add_argument("--net-us", type=float, default=NET_LATENCY * 1e6, help="latency per network step, us")
    p.add_argument("--allreduce", choices=("auto", "ring", "tree"), default="auto",
                   help="all-reduce latency model: ring, tree, or the faster of the two per collective (NCCL's tuner)")
    p.add_argument("--rank-time", choices=("max", "median"), default="max",
                   help="compute: the slowest rank's median phases, or per-phase medians over ranks")
    p.add_argument("--fsdp-compute", choices=("measured", "ddp"), default="measured",
                   help="FSDP2's compute: as measured, or DDP's (FSDP2's copies on a fake group removed)")
    p.add_argument("--compute-scale", type=float, default=1.0,
                   help="multiply every measured compute time by this (a what-if: faster hardware, smaller batches)")
    p.add_argument("--title", default=None, help="plot title (default: the bench's model)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
        if not workers or min(workers) < 1:
            raise ValueError("--workers needs positive integers")
        work, meta = load_bench(args.bench, args.blocks, args.rank_time)
        if args.compute_scale <= 0:
            raise ValueError("--compute-scale must be positive")
        work = work.scaled(args.compute_scale)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    net = replace(Network(), gpus_per_node=args.gpus_per_node, nvlink_bw=args.nvlink_gbs * 1e9,
                  net_bw=args.net_gbs * 1e9, launch_latency=args.launch_us * 1e-6,
                  nvlink_latency=args.nvlink_us * 1e-6, net_latency=args.net_us * 1e-6, allreduce=args.allreduce)
    bucket = args.bucket_mb * MiB
    rows = projection(work, net, workers, bucket=bucket, fsdp_compute=args.fsdp_compute)
    settings = {"bucket_mb": args.bucket_mb, "rank_time": args.rank_time, "fsdp_compute": args.fsdp_compute,
                "compute_scale": args.compute_scale}
    command = "python -m subnetdp.measure.projection " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, work, net, meta, command, settings)
    (args.out / "projection.md").write_text(text)
    (args.out / "projection.json").write_text(json.dumps(
        {"command": command, "bench": meta, "workload": asdict(work), "network": asdict(net), "settings": settings,
         "rows": rows}, indent=1, default=str))
    title = args.title or _title(meta, args)
    drawn = plot(rows, args.out / "projection.png", title)
    print(text)
    print("written: " + ", ".join(str(args.out / f) for f in ("projection.md", "projection.json"))
          + (f", {drawn}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
