"""Plan invariants, over many (N, C, unit sizes)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subnetdp.engine import PlanError, UnitCost, holders_needed, make_plan


def _units(sizes: list[int], flops: list[float] | None = None) -> list[UnitCost]:
    return [UnitCost(f"u{i}", s, 4 * s, None if flops is None else flops[i]) for i, s in enumerate(sizes)]


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 10_000), min_size=1, max_size=24),
       n=st.integers(1, 12), coverage=st.floats(0.01, 1.0), seed=st.integers(0, 3))
@pytest.mark.slow
def test_plan_invariants(sizes: list[int], n: int, coverage: float, seed: int) -> None:
    k = holders_needed(coverage, n)
    assert k == max(1, min(n, math.floor(coverage * n + 0.5)))
    units = _units(sizes)
    if len(units) < (1 if k >= n else math.ceil(n / k)):
        with pytest.raises(PlanError):
            make_plan(units, n, coverage, seed)
        return
    plan = make_plan(units, n, coverage, seed, shared_params=10, shared_bytes=40)
    for unit in units:  # exactly k distinct holders, all valid ranks
        ranks = plan.holders[unit.name]
        assert len(ranks) == k == len(set(ranks)) and all(0 <= r < n for r in ranks)
    for rank in range(n):  # every worker holds at least one unit
        assert plan.held_units(rank)
    assert len(plan.holder_sets) <= n  # one communicator per holder set: about N, not one per unit
    # held figures are the sums they claim to be
    for rank in range(n):
        assert plan.worker_params[rank] == 10 + sum(u.params for u in units if rank in plan.holders[u.name])
    assert plan.algebraic_connectivity >= 0
    if k >= 2 and len(units) >= n:
        assert plan.algebraic_connectivity > 1e-9, plan.table()
    # deterministic from its inputs: every rank computes the same plan without talking
    again = make_plan(units, n, coverage, seed, shared_params=10, shared_bytes=40)
    assert again.holders == plan.holders and again.fingerprint() == plan.fingerprint()


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 8), per_worker=st.integers(1, 4), coverage=st.sampled_from([0.25, 0.5, 0.75, 1.0]))
def test_equal_units_balance_perfectly(n: int, per_worker: int, coverage: float) -> None:
    plan = make_plan(_units([100] * (n * per_worker)), n, coverage, 0)
    assert plan.balance()["params_max_over_min"] == pytest.approx(1.0)


def test_balances_parameters_and_compute_separately() -> None:
    # ResNet-like: parameters grow 4x per stage, FLOPs stay about equal.
    params = [1, 1, 4, 4, 16, 16, 64, 64]
    flops = [10.0] * 8
    plan = make_plan(_units([p * 1000 for p in params], flops), 4, 0.5, 0)
    assert plan.flops_counted
    assert plan.balance()["params_max_over_min"] < 1.2
    assert plan.balance()["flops_max_over_min"] < 1.2


def test_neuron_sites_give_every_worker_a_fraction_c_of_each_site() -> None:
    n, groups = 4, 4
    units = [UnitCost(f"s{s}#{g}", 10, 40, 1.0, site=f"s{s}", group=g, num_groups=groups)
             for s in range(3) for g in range(groups)]
    plan = make_plan(units, n, 0.5, 0, level="neuron")
    for s in range(3):
        for rank in range(n):
            held = [g for g in range(groups) if rank in plan.holders[f"s{s}#{g}"]]
            assert len(held) == 2  # C * groups


def test_seed_changes_the_plan_and_fingerprint() -> None:
    units = _units([5, 6, 7, 8, 9, 10, 11, 12])
    plans = {make_plan(units, 4, 0.5, seed).fingerprint() for seed in range(5)}
    assert len(plans) > 1


def test_too_few_units_is_an_error() -> None:
    with pytest.raises(PlanError, match="cannot give all 8 workers a unit"):
        make_plan(_units([1, 2]), 8, 0.25, 0)


@pytest.mark.parametrize("coverage", [0.0, -0.5, 1.5])
def test_coverage_outside_range_is_an_error(coverage: float) -> None:
    with pytest.raises(PlanError, match="coverage"):
        make_plan(_units([1, 2, 3]), 2, coverage, 0)


def test_table_lists_units_workers_and_connectivity() -> None:
    plan = make_plan(_units([1, 2, 3, 4]), 4, 0.5, 0)
    text = plan.table()
    assert "u3" in text and "algebraic connectivity" in text and "max/min" in text
    assert plan.to_dict()["holders"]["u0"] == list(plan.holders["u0"])


def test_block_plans_balance_saved_activations_counted_on_the_example_input() -> None:
    import torch

    from subnetdp import plan_for
    from subnetdp.models import resnet18
    plan = plan_for(resnet18(num_classes=10, in_channels=1, width=16), 4, blocks="blocks", coverage=0.5,
                    example_input=torch.randn(2, 1, 32, 32))
    acts = plan.unit_activations
    # a stage-1 block saves more for backward than a stage-4 block (same FLOPs, 8x the pixels)
    assert acts["blocks.0"] > 2 * acts["blocks.7"] > 0
    assert plan.balance()["unit_activations_max_over_min"] < 1.2
    assert not any(set(plan.holders["blocks.0"]) == set(plan.holders["blocks.1"]) for _ in [0])
