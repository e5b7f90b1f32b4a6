"""Re-plan and move: the model and its optimizer state assembled under one plan and cut under
another (a different seed or worker count) continue training where they left off."""

from __future__ import annotations

import pytest
import torch

from subnetdp import SubnetworkSimulator

from _models import make, train_simulated


def _simulator(n: int, level: str, masking: str, seed: int = 0) -> tuple[SubnetworkSimulator, list]:
    sim = SubnetworkSimulator(make("mlp"), n, coverage=0.5, masking=masking, seed=seed,
                              **{"blocks" if level == "block" else "neurons": "blocks"})
    return sim, [torch.optim.AdamW(w.parameters(), lr=1e-2) for w in sim.workers]


@pytest.mark.parametrize("level,masking", [("block", "forward"), ("neuron", "forward"), ("neuron", "backward")])
@pytest.mark.parametrize("n_to,seed_to", [(4, 1), (2, 0)])
def test_model_and_optimizer_state_move_to_a_new_plan(level: str, masking: str, n_to: int, seed_to: int) -> None:
    old, old_opts = _simulator(4, level, masking)
    train_simulated(old, old_opts, range(3))
    state, opt_state = old.full_state_dict(), old.full_optimizer_state(old_opts)
    assert set(opt_state["state"]) == {n for n, p in make("mlp").named_parameters()}
    assert opt_state["scalars"]["step"] == 3

    new, new_opts = _simulator(n_to, level, masking, seed=seed_to)
    assert new.plan.holders != old.plan.holders
    new.load_full_state_dict(state)
    new.load_full_optimizer_state(new_opts, opt_state)
    for key, value in new.full_state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    moved = new.full_optimizer_state(new_opts)
    for key, names in opt_state["state"].items():
        for name, value in names.items():
            torch.testing.assert_close(moved["state"][key][name], value, rtol=0, atol=0, msg=f"{key} {name}")


def test_moving_onto_the_same_plan_continues_training_exactly() -> None:
    reference, ref_opts = _simulator(4, "block", "forward")
    train_simulated(reference, ref_opts, range(4))

    old, old_opts = _simulator(4, "block", "forward")
    train_simulated(old, old_opts, range(2))
    new, new_opts = _simulator(4, "block", "forward")
    new.load_full_state_dict(old.full_state_dict())
    new.load_full_optimizer_state(new_opts, old.full_optimizer_state(old_opts))
    train_simulated(new, new_opts, range(2, 4))
    expected = reference.full_state_dict()
    for key, value in new.full_state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7, msg=key)
