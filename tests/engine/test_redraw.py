"""Re-drawn plans (redraw.py): the units that change hands move with their optimizer state, one
at a time; training continues as if the model had been assembled and cut under the new plan; real
ranks equal the simulator; what is not supported is refused before anything moves."""

from __future__ import annotations

import copy

import pytest
import torch

from subnetdp import SDPConfigError, SubnetworkDataParallel, SubnetworkSimulator, plan_for
from subnetdp.engine.evaluation import fold_residual_scale, scale_residual_branches
from subnetdp.engine.redraw import replan
from subnetdp.measure.live import LiveTensorTracker

from _dist import run_distributed
from _models import batch_for, family_hf_llama, family_llama, family_resnet18, family_vit, loss_of, make

KWARGS = {"mlp": dict(blocks="blocks", coverage=0.5), "resnet": dict(blocks="blocks", coverage=0.5)}


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _step(sim: SubnetworkSimulator, opts: list, kind: str, step: int) -> None:
    for rank, worker in enumerate(sim.workers):
        x, y = batch_for(kind, 100 * step + rank)
        loss_of(kind, worker, x, y).backward()
    sim.sync_gradients()
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _simulator(kind: str, seed: int = 3) -> tuple[SubnetworkSimulator, list]:
    sim = SubnetworkSimulator(make(kind), 4, seed=seed, **KWARGS[kind])
    return sim, [_adamw(w.parameters()) for w in sim.workers]


def test_replan_without_tolerance_is_make_plan_and_with_it_mixes_the_units() -> None:
    plan = plan_for(make("resnet"), 4, seed=3, **KWARGS["resnet"])
    assert replan(plan, 3, tolerance=None).fingerprint() == plan.fingerprint()
    groupings = set()
    for seed in range(20):
        drawn = replan(plan, seed)
        assert drawn.fingerprint() == replan(plan, seed).fingerprint()  # a pure function of the seed
        assert max(drawn.worker_bytes) <= 1.1 * max(plan.worker_bytes) + 1  # near the balanced plan's worst
        assert all(len(h) == plan.k for h in drawn.holders.values()) and drawn.algebraic_connectivity > 0
        groupings.add(frozenset(frozenset(drawn.held_units(r)) for r in range(4)))
    assert len(groupings) > 3  # the balanced plan alone is nearly unique: only the workers' names would change


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_a_redraw_moves_every_unit_with_its_optimizer_state(kind: str) -> None:
    sim, opts = _simulator(kind)
    for step in range(2):
        _step(sim, opts, kind, step)
    model, state = sim.full_state_dict(), sim.full_optimizer_state(opts)
    old = sim.plan
    moved = sim.redraw(11, opts)
    assert sim.plan.holders != old.holders and moved > 0
    after, after_state = sim.full_state_dict(), sim.full_optimizer_state(opts)
    params = {k for k, _ in make(kind).named_parameters()}
    for key in params:  # norm statistics are the new owner's, not re-averaged: parameters only
        torch.testing.assert_close(after[key], model[key], rtol=0, atol=0, msg=key)
        for name, value in state["state"][key].items():
            torch.testing.assert_close(after_state["state"][key][name], value, rtol=0, atol=0, msg=f"{key} {name}")
    for rank, worker in enumerate(sim.workers):
        assert sorted(worker.held_units) == sorted(sim.plan.held_units(rank))
        assert len(opts[rank].param_groups[0]["params"]) == len(list(worker.parameters()))


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_training_after_a_redraw_equals_assembling_and_cutting_under_the_new_plan(kind: str) -> None:
    sim, opts = _simulator(kind)
    for step in range(2):
        _step(sim, opts, kind, step)
    reference, ref_opts = _simulator(kind)
    reference.redraw(11, ref_opts)  # the same new plan, drawn before any state exists
    reference.load_full_state_dict(sim.full_state_dict())
    _step(reference, ref_opts, kind, 99)  # creates the optimizer state that the load then overwrites
    reference.load_full_state_dict(sim.full_state_dict())
    reference.load_full_optimizer_state(ref_opts, sim.full_optimizer_state(opts))
    sim.redraw(11, opts)
    assert sim.plan.fingerprint() == reference.plan.fingerprint()
    for step in range(2, 4):
        _step(sim, opts, kind, step)
        _step(reference, ref_opts, kind, step)
    ours, theirs = sim.full_state_dict(), reference.full_state_dict()
    for key, _ in make(kind).named_parameters():
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_block_with_non_persistent_buffers_is_rebuilt_with_them() -> None:
    """Rotary tables are non-persistent buffers of each block: a state dict cannot carry them."""
    model, batch, loss = family_llama()
    x, y = batch(0)
    sim = SubnetworkSimulator(model.train(), 4, blocks="layers", coverage=0.5, seed=0)
    opts = [_adamw(w.parameters()) for w in sim.workers]
    for _ in range(2):
        for worker in sim.workers:
            loss(worker, (x, y)).backward()
        sim.sync_gradients()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sim.redraw(5 + _, opts)
    for worker in sim.workers:
        assert torch.isfinite(loss(worker, (x, y))), "a gained block computes with uninitialised tables"


def _real(rank: int, world: int, kind: str) -> dict:
    sdp = SubnetworkDataParallel(make(kind), seed=3, **KWARGS[kind])
    opt = _adamw(sdp.parameters())
    moved = []
    for step in range(4):
        if step in (1, 3):
            moved.append(sdp.redraw(10 + step, opt))
        x, y = batch_for(kind, 100 * step + rank)
        loss_of(kind, sdp, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"full": sdp.full_state_dict(), "moved": moved}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_real_ranks_redraw_as_the_simulator_does(kind: str) -> None:
    results = run_distributed(_real, 4, kind, timeout=300)
    sim, opts = _simulator(kind)
    moved = []
    for step in range(4):
        if step in (1, 3):
            moved.append(sim.redraw(10 + step, opts))
        _step(sim, opts, kind, step)
    simulated = sim.full_state_dict()
    for result in results:
        assert result["moved"] == moved and all(moved)  # the same bytes, counted the same way everywhere
        for key, _ in make(kind).named_parameters():
            torch.testing.assert_close(result["full"][key], simulated[key], rtol=1e-4, atol=1e-5, msg=key)


def _in_flight(rank: int, world: int) -> dict:
    from _models import ResidualMLP
    torch.manual_seed(0)
    sdp = SubnetworkDataParallel(ResidualMLP(dim=16, hidden=64, depth=8), blocks="blocks", coverage=0.5, seed=0)
    opt = _adamw(sdp.parameters())
    x, y = batch_for("mlp", rank)
    loss_of("mlp", sdp, x, y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = set(sdp.held_units)
    tracker = LiveTensorTracker(sdp.parameters(), opt)
    with tracker:
        sdp.redraw(1, opt)
    unit_bytes = sdp.plan.unit_bytes
    return {"growth": tracker.peak, "gained": sum(unit_bytes[u] for u in sdp.held_units if u not in before),
            "largest": max(unit_bytes.values()), "all_units": sum(unit_bytes.values())}


@pytest.mark.slow
def test_a_redraw_never_holds_more_than_one_unit_in_flight() -> None:
    """Memory of a re-draw, live tensors on each real rank: on top of the subnetwork it had, what
    it gains (parameters and two Adam moments each) and one unit's flat buffers (tensor and
    moments; sent or received) at a time. Assembling the model and its optimizer state would need
    every unit's three copies."""
    for r in run_distributed(_in_flight, 4, timeout=120):
        bound = 3 * r["gained"] + 2 * 3 * r["largest"] + 4096
        assert bound < 3 * r["all_units"]  # else the check could not tell
        assert 0 < r["growth"] <= bound, r


@pytest.mark.parametrize("kwargs,why", [
    (dict(neurons="blocks"), "neuron level"), (dict(blocks="blocks", masking="backward"), "backward masking"),
    (dict(blocks="blocks", shard=True), "shard=True"), (dict(blocks="blocks", scale="inverse-coverage"), "scale"),
])
def test_a_redraw_refuses_what_it_does_not_support(kwargs: dict, why: str) -> None:
    sim = SubnetworkSimulator(make("mlp"), 2, coverage=0.5, **kwargs)
    opts = [_adamw(w.shard_parameters()) for w in sim.workers]
    before = sim.full_state_dict()
    with pytest.raises(SDPConfigError, match=why):
        sim.redraw(1, opts)
    after = sim.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_redraw_refuses_several_parameter_groups() -> None:
    sim, _ = _simulator("mlp")
    opts = [torch.optim.AdamW([{"params": list(w.parameters())[:1]}, {"params": list(w.parameters())[1:]}])
            for w in sim.workers]
    with pytest.raises(SDPConfigError, match="several parameter groups"):
        sim.redraw(1, opts)


@pytest.mark.parametrize("family,blocks", [(family_resnet18, "blocks"), (family_vit, "blocks"),
                                           (family_llama, "layers")])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_folding_the_residual_scale_equals_scaling_the_branches(family, blocks: str, mode: str) -> None:
    model, batch, _ = family()
    x, _ = batch(0)
    folded, scaled = copy.deepcopy(model), copy.deepcopy(model)
    fold_residual_scale(folded, blocks, 0.5)
    scale_residual_branches(scaled, blocks, 0.5)
    getattr(folded, mode)(), getattr(scaled, mode)()
    torch.testing.assert_close(folded(x), scaled(x), rtol=1e-5, atol=1e-6)
    assert folded.state_dict().keys() == model.state_dict().keys()
    assert type(folded) is type(model)  # the plain model: any copy of the class loads the weights


def test_folding_needs_a_block_fx_can_trace() -> None:
    model, _, _ = family_hf_llama()
    with pytest.raises(SDPConfigError, match="cannot fold"):
        fold_residual_scale(model, "model.layers", 0.5)
