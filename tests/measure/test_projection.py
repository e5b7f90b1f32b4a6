"""The alpha-beta projection (subnetdp.measure.projection): formulas on hand-computed cases, how DDP's and
SDP's traffic scale with N, agreement with a bench's measured wire bytes, and the command end to end."""

from __future__ import annotations

import json
import math
from dataclasses import astuple
from pathlib import Path

import pytest

from subnetdp.measure.projection import (
    STRATEGIES,
    Network,
    Phases,
    Strategy,
    Workload,
    bandwidth_time,
    collective_time,
    collectives,
    load_bench,
    main,
    placement,
    project,
    ring_latency,
    tree_latency,
)

from _runs import assert_chart

ROOT = Path(__file__).resolve().parents[2]
H200_BENCH = ROOT / "benchmarks" / "h200-llama134m" / "bench.json"
CPU_BENCH = ROOT / "benchmarks" / "scaling-cpu" / "n4" / "bench.json"

# round numbers, so every case below can be checked by hand
NET = Network(gpus_per_node=4, nvlink_bw=100.0, net_bw=10.0, launch_latency=1.0, nvlink_latency=2.0,
              net_latency=5.0, allreduce="ring")
DDP_ONLY = Strategy("DDP", "ddp")
K2 = Strategy("k=2", "sdp", holders=2)
HALF = Strategy("C=0.5", "sdp", coverage=0.5)


def workload(**overrides) -> Workload:
    base = dict(total_bytes=1000.0, shared_bytes=200.0, blocks=8, ddp=Phases(10.0, 20.0, 4.0),
                fsdp=Phases(12.0, 22.0, 2.0), sdp={0.5: Phases(5.0, 10.0, 2.0)})
    return Workload(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------
# the formulas


def test_placement_packs_or_spreads_a_group() -> None:
    assert placement(3, 64, NET) == (3, 1)                  # fits in one node
    assert placement(10, 64, NET) == (4, 3)                 # 4 + 4 + 2
    assert placement(3, 64, NET, spread=True) == (1, 3)     # one holder per node
    assert placement(40, 64, NET, spread=True) == (3, 16)   # 16 nodes only: ceil(40 / 16) per node
    assert placement(2, 4, NET, spread=True) == (2, 1)      # one node: nowhere to spread to


def test_ring_latency_counts_nccl_steps() -> None:
    # all-reduce over 4 in one node: launch + 2 (g-1) = 6 NVLink steps
    assert ring_latency("all_reduce", 4, 1, NET) == 1 + 6 * 2
    # over 8 on 2 nodes: 14 steps, 2 m = 4 of them across nodes
    assert ring_latency("all_reduce", 8, 2, NET) == 1 + 10 * 2 + 4 * 5
    # all-gather over 8 on 2 nodes: g-1 = 7 steps, m-1 = 1 across
    assert ring_latency("all_gather", 8, 2, NET) == 1 + 6 * 2 + 1 * 5
    # a pair on two nodes: 2 steps, both across (never more crossing steps than steps)
    assert ring_latency("all_reduce", 2, 2, NET) == 1 + 2 * 5
    assert ring_latency("all_reduce", 1, 1, NET) == 0.0


def test_tree_latency_is_logarithmic_in_nodes() -> None:
    # 4 per node on 8 nodes: up and down a chain of 3 NVLink hops and log2(8) = 3 network hops
    assert tree_latency(32, 4, 8, NET) == 1 + 2 * (3 * 2 + 3 * 5)
    assert tree_latency(32, 4, 8, NET) < ring_latency("all_reduce", 32, 8, NET)
    auto = Network(**{**NET.__dict__, "allreduce": "auto"})
    assert collective_time("all_reduce", 0.0, 32, 32, auto) == tree_latency(32, 4, 8, NET)
    assert collective_time("all_reduce", 0.0, 32, 32, NET) == ring_latency("all_reduce", 32, 8, NET)


def test_bandwidth_term_inside_and_across_nodes() -> None:
    # one node: 2 (g-1)/g s over NVLink
    assert bandwidth_time("all_reduce", 400.0, 4, 4, 1, NET) == pytest.approx(2 * 3 / 4 * 400 / 100)
    # two nodes of 4: w = 2 * 7/8 * 800 = 1400 bytes; w/4 = 350 cross at 10 B/s, 1050 go over NVLink at 100
    assert bandwidth_time("all_reduce", 800.0, 8, 4, 2, NET) == pytest.approx(max(1050 / 100, 350 / 10))
    # all-gather of a 100-byte input over 4 in a node: (g-1) * 100 bytes
    assert bandwidth_time("all_gather", 100.0, 4, 4, 1, NET) == pytest.approx(300 / 100)
    # spread over 8 nodes, one member each: every byte crosses
    assert bandwidth_time("reduce_scatter", 800.0, 8, 1, 8, NET) == pytest.approx(7 / 8 * 800 / 10)


def test_collective_time_is_latency_plus_bandwidth() -> None:
    t = collective_time("all_reduce", 800.0, 8, 16, NET)
    assert t == pytest.approx(ring_latency("all_reduce", 8, 2, NET) + 35.0)
    assert collective_time("all_reduce", 800.0, 1, 16, NET) == 0.0   # a single holder sends nothing


def test_step_time_with_and_without_overlap() -> None:
    net = Network(gpus_per_node=8, nvlink_bw=1.0, net_bw=1.0, launch_latency=0.0, nvlink_latency=0.0,
                  net_latency=0.0, allreduce="ring")
    work = workload()
    row = project(DDP_ONLY, work, 8, net, bucket=1e9)
    comm = 2 * 7 / 8 * 1000                                      # bytes / (1 B/s)
    assert row["comm_s"] == pytest.approx(comm)
    assert row["step_no_overlap_s"] == pytest.approx(34.0 + comm)
    assert row["step_overlap_s"] == pytest.approx(10.0 + max(20.0, comm) + 4.0)
    small = Workload(**{**work.__dict__, "total_bytes": 8.0, "shared_bytes": 2.0})
    assert project(DDP_ONLY, small, 8, net, bucket=1e9)["step_overlap_s"] == pytest.approx(34.0)  # hidden
    # FSDP2: two all-gathers and a reduce-scatter of P, the forward one hidden behind forward
    fsdp = project(Strategy("FSDP2", "fsdp"), small, 8, net, bucket=1e9)
    gather = 7 / 8 * 8
    assert fsdp["comm_forward_s"] == pytest.approx(gather)
    assert fsdp["comm_backward_s"] == pytest.approx(2 * gather)
    assert fsdp["step_overlap_s"] == pytest.approx(12.0 + 22.0 + 2.0)


def test_sdp_compute_measured_or_on_a_line_in_coverage() -> None:
    work = workload()
    assert work.sdp_compute(0.5) == Phases(5.0, 10.0, 2.0)                       # measured
    # DDP (C=1) and C=0.5 lie on lines through the origin: C=0.25 is half of C=0.5
    assert astuple(work.sdp_compute(0.25)) == pytest.approx((2.5, 5.0, 1.0))
    # least squares through (1, 10), (0.5, 6), (0.25, 4): slope 8, intercept 2 -> 3 at C = 1/8
    three = workload(sdp={0.5: Phases(6.0, 11.0, 2.0), 0.25: Phases(4.0, 6.0, 1.5)})
    assert astuple(three.sdp_compute(0.125)) == pytest.approx((3.0, 1.5 + 0.125 * 130 / 7, 0.5 + 0.125 * 24 / 7))
    # never below zero
    assert workload(sdp={0.5: Phases(1.0, 1.0, 1.0)}).sdp_compute(0.01).forward >= 0


# ---------------------------------------------------------------------------------------------
# how the traffic scales with N


def test_ddp_comm_tends_to_twice_the_bytes_over_the_bandwidth() -> None:
    """With every worker on its own node and no latency, DDP's all-reduce takes 2 (N-1)/N P / B:
    rising with N toward 2 P / B, never past it."""
    net = Network(gpus_per_node=1, nvlink_bw=1e12, net_bw=50e9, launch_latency=0.0, nvlink_latency=0.0,
                  net_latency=0.0)
    work = workload(total_bytes=500e6, shared_bytes=100e6)
    limit = 2 * work.total_bytes / net.net_bw
    fractions = [project(DDP_ONLY, work, n, net)["comm_s"] / limit for n in (2, 8, 64, 1024)]
    assert fractions == pytest.approx([1 - 1 / n for n in (2, 8, 64, 1024)])
    assert fractions == sorted(fractions) and fractions[-1] < 1
    # on nodes of 8 with one NIC per GPU the network carries 1/8 of it: toward 2 P / (8 B)
    nodes = Network(nvlink_bw=1e15, net_bw=50e9, launch_latency=0.0, nvlink_latency=0.0, net_latency=0.0)
    assert project(DDP_ONLY, work, 1024, nodes)["comm_s"] == pytest.approx(limit / 8 * 1023 / 1024)


def test_sdp_with_two_holders_sends_its_unit_bytes_once_whatever_n() -> None:
    work = workload(total_bytes=12e8, shared_bytes=2e8, blocks=1024)
    per_worker, together = [], []
    for n in (8, 16, 64, 256, 1024):
        shared, units = collectives(K2, work, n)
        assert units.group == 2
        held = 2 / n * work.unit_bytes
        wire = units.count * 2 * (2 - 1) / 2 * units.size          # ring all-reduce over a pair
        assert wire == pytest.approx(held)                         # one pass of the held bytes
        per_worker.append(wire / held)
        together.append(n * wire)
        assert shared.group == n
    assert per_worker == pytest.approx([1.0] * 5)
    assert together == pytest.approx([2 * work.unit_bytes] * 5)    # over all workers: 2 U, whatever N
    # at a fixed coverage the holder sets grow with N and so does each worker's unit traffic
    fixed = [project(HALF, work, n, Network())["wire_bytes"] for n in (8, 64, 1024)]
    assert fixed == sorted(fixed)


def test_k2_unit_time_does_not_depend_on_n_when_the_held_bytes_do_not() -> None:
    net = Network()
    times = {n: collective_time("all_reduce", 64e6, 2, n, net) for n in (8, 64, 1024)}
    assert len(set(times.values())) == 1                           # a pair in one node, whatever N
    spread = {n: collective_time("all_reduce", 64e6, 2, n, net, spread=True) for n in (16, 64, 1024)}
    assert len(set(spread.values())) == 1
    assert spread[16] > times[8]                                   # across nodes it is slower


def test_infeasible_block_plans_are_flagged() -> None:
    work = workload(blocks=12)
    assert project(K2, work, 16, Network())["feasible"]            # C = 1/8 >= 1/12
    assert not project(K2, work, 32, Network())["feasible"]        # C = 1/16: less than a block each


# ---------------------------------------------------------------------------------------------
# against measured bytes, and the command


@pytest.mark.skipif(not CPU_BENCH.exists(), reason="no committed CPU scaling bench")
def test_projected_wire_bytes_match_the_bench_at_its_own_n() -> None:
    """At the bench's N the ring model's bytes per worker equal what the bench counted (mean over ranks:
    the projection uses the average held bytes C * U; FSDP2's root is gathered only once in reality)."""
    work, meta = load_bench(CPU_BENCH)
    n = meta["world_size"]
    record = json.loads(CPU_BENCH.read_text())
    measured = {r["strategy"]: sum(x["wire_bytes_per_step"] for x in r["ranks"]) / len(r["ranks"])
                for r in record["results"]}
    by = {s.name: project(s, work, n, Network()) for s in STRATEGIES[:3]}
    assert by["DDP"]["wire_bytes"] == pytest.approx(measured["ddp"], rel=1e-9)
    assert by["B-SDP C=0.5"]["wire_bytes"] == pytest.approx(measured["sdp-block-fwd@0.5"], rel=1e-9)
    assert by["FSDP2"]["wire_bytes"] == pytest.approx(measured["fsdp"], rel=0.01)


def fake_bench(path: Path, with_plan: bool = True) -> Path:
    def ranks(step: float, comm: float, plan: dict | None = None) -> list[dict]:
        out = []
        for rank in range(4):
            t = step * (1 + 0.01 * rank)
            record = {"rank": rank, "world_size": 4, "comm_bytes_per_step": comm,
                      "time_s": {"forward": t / 3, "backward": t / 2, "optimizer": t / 6, "step": t}}
            if plan:
                record["plan"] = plan
            out.append(record)
        return out

    plan = {"k": 2, "shared_bytes": 40e6, "total_bytes": 200e6} if with_plan else None
    results = [{"strategy": "ddp", "failed": False, "ranks": ranks(0.030, 200e6)},
               {"strategy": "fsdp", "failed": False, "ranks": ranks(0.033, 300e6)},
               {"strategy": "sdp-block-fwd@0.5", "failed": False, "ranks": ranks(0.017, 120e6, plan)},
               {"strategy": "sdp-block-fwd@0.25", "failed": False, "ranks": ranks(0.011, 80e6, plan)},
               {"strategy": "sdp-block-bwd@0.5", "failed": True, "ranks": []}]
    path.write_text(json.dumps({"command": "subnetdp bench (fake)", "args": {"model": "toy"},
                                "machine": {"device": "test", "torch": "x"}, "results": results}))
    return path


def check_outputs(out: Path, workers: list[int]) -> dict:
    text = (out / "projection.md").read_text()
    assert "a projection, not a measurement" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(workers) * len(STRATEGIES)
    assert_chart(out / "projection.png", 1300, 500)  # 13 x 5 in at 100 dpi
    data = json.loads((out / "projection.json").read_text())
    assert sorted({r["n"] for r in data["rows"]}) == sorted(workers)
    return data


def test_command_end_to_end_on_a_generated_bench(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench = fake_bench(tmp_path / "bench.json")
    assert main(["--bench", str(bench), "--out", str(tmp_path / "out"), "--blocks", "10",
                 "--workers", "8,64,1024", "--net-gbs", "25"]) == 0
    data = check_outputs(tmp_path / "out", [8, 64, 1024])
    assert data["network"]["net_bw"] == 25e9
    by = {(r["n"], r["strategy"]): r for r in data["rows"]}
    assert by[(8, "B-SDP C=0.25")]["compute_s"] == pytest.approx(0.011 * 1.03)   # the slowest rank
    assert by[(1024, "B-SDP k=2 (C=2/N)")]["k"] == 2
    assert not by[(1024, "B-SDP k=2 (C=2/N)")]["feasible"]
    assert by[(64, "DDP")]["comm_s"] > by[(64, "B-SDP C=0.5")]["comm_s"] > by[(64, "B-SDP k=2 (C=2/N)")]["comm_s"]
    assert "written:" in capsys.readouterr().out
    # what it cannot work from: a clear error, exit code 2
    assert main(["--bench", str(bench), "--out", str(tmp_path / "x")]) == 2        # blocks unknown
    no_plan = fake_bench(tmp_path / "no_plan.json", with_plan=False)
    assert main(["--bench", str(no_plan), "--out", str(tmp_path / "x"), "--blocks", "4"]) == 2
    assert "shared bytes" in capsys.readouterr().err


@pytest.mark.skipif(not H200_BENCH.exists(), reason="no committed H200 bench")
def test_command_on_the_committed_llama134m_bench(tmp_path: Path) -> None:
    assert main(["--bench", str(H200_BENCH), "--out", str(tmp_path)]) == 0
    data = check_outputs(tmp_path, [2 ** i for i in range(3, 11)])
    assert data["workload"]["blocks"] == 12                                    # from the 134m preset
    by = {(r["n"], r["strategy"]): r for r in data["rows"]}
    for n in (8, 1024):
        ddp, half = by[(n, "DDP")], by[(n, "B-SDP C=0.5")]
        assert half["wire_bytes"] < ddp["wire_bytes"]
        assert half["step_no_overlap_s"] < ddp["step_no_overlap_s"]
    # DDP's bytes on the wire per worker: 2 (N-1)/N of its gradient bytes
    p = data["workload"]["total_bytes"]
    assert by[(1024, "DDP")]["wire_bytes"] == pytest.approx(2 * 1023 / 1024 * p)
    assert math.isclose(by[(8, "B-SDP C=0.25")]["compute_s"], by[(8, "B-SDP k=2 (C=2/N)")]["compute_s"])
