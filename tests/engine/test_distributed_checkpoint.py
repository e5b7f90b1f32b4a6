"""DCP checkpoints (engine/checkpoint.py): each worker saves the chunks it holds; a load under
another plan, worker count, coverage or masking reads only its own chunks and gives the same full
model and optimizer state as the in-memory re-plan (assembly); a load under the same plan continues
training exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import subnetdp.checkpoint as sdp_checkpoint
from subnetdp import SubnetworkDataParallel, SubnetworkSimulator

from _dist import run_distributed
from _models import make, train_simulated


def _simulator(n: int, level: str = "neuron", masking: str = "forward", seed: int = 0, coverage: float = 0.5,
               shard: bool = False, kind: str = "mlp") -> tuple[SubnetworkSimulator, list]:
    sim = SubnetworkSimulator(make(kind), n, coverage=coverage, masking=masking, seed=seed, shard=shard,
                              **{"blocks" if level == "block" else "neurons": "blocks"})
    return sim, [torch.optim.AdamW(w.shard_parameters(), lr=1e-2) for w in sim.workers]


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert set(a["state"]) == set(b["state"])
    for key, names in a["state"].items():
        _assert_same(names, b["state"][key])
    assert {k: float(v) for k, v in a["scalars"].items()} == {k: float(v) for k, v in b["scalars"].items()}


@pytest.mark.parametrize("level,masking,shard", [("block", "forward", False), ("neuron", "forward", False),
                                                  ("neuron", "backward", False), ("block", "forward", True)])
@pytest.mark.parametrize("n_to,coverage_to,seed_to", [(4, 0.5, 0), (3, 0.5, 1), (2, 1.0, 0)])
def test_a_checkpoint_loads_under_another_plan(tmp_path: Path, level: str, masking: str, shard: bool, n_to: int,
                                               coverage_to: float, seed_to: int) -> None:
    old, old_opts = _simulator(4, level, masking, shard=shard)
    train_simulated(old, old_opts, range(3))
    sdp_checkpoint.save(tmp_path / "ckpt", old, old_opts)

    new, new_opts = _simulator(n_to, level, masking, seed=seed_to, coverage=coverage_to, shard=shard)
    sdp_checkpoint.load(tmp_path / "ckpt", new, new_opts)
    _assert_same(new.full_state_dict(), old.full_state_dict())
    _assert_same_optimizer(new.full_optimizer_state(new_opts), old.full_optimizer_state(old_opts))


def test_a_checkpoint_under_the_same_plan_continues_training_exactly(tmp_path: Path) -> None:
    reference, ref_opts = _simulator(4, "block", kind="resnet")  # BatchNorm: each worker's own statistics
    train_simulated(reference, ref_opts, range(4), kind="resnet")

    old, old_opts = _simulator(4, "block", kind="resnet")
    train_simulated(old, old_opts, range(2), kind="resnet")
    sdp_checkpoint.save(tmp_path / "ckpt", old, old_opts)
    new, new_opts = _simulator(4, "block", kind="resnet")
    sdp_checkpoint.load(tmp_path / "ckpt", new, new_opts)
    for w_new, w_old in zip(new.workers, old.workers):
        _assert_same(w_new.state_dict(), w_old.state_dict())
    train_simulated(new, new_opts, range(2, 4), kind="resnet")
    for w_new, w_ref in zip(new.workers, reference.workers):
        for key, value in w_new.state_dict().items():
            torch.testing.assert_close(value, w_ref.state_dict()[key], rtol=1e-6, atol=1e-7, msg=key)


def test_the_plain_full_model_loads_from_the_checkpoint(tmp_path: Path) -> None:
    sim, opts = _simulator(4, "neuron")
    train_simulated(sim, opts, range(2))
    sdp_checkpoint.save(tmp_path / "ckpt", sim, opts)
    plain = make("mlp")
    sdp_checkpoint.load_full_state_dict(tmp_path / "ckpt", plain)
    _assert_same(plain.state_dict(), sim.full_state_dict())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_an_optimizer_that_never_stepped_takes_the_state_and_keeps_its_weights(tmp_path: Path) -> None:
    old, old_opts = _simulator(4, "block")
    train_simulated(old, old_opts, range(2))
    sdp_checkpoint.save(tmp_path / "ckpt", old, old_opts)
    new, new_opts = _simulator(4, "block", seed=3)
    before = new.full_state_dict()
    state = {"optim": sdp_checkpoint.get_optimizer_state_dict(new, new_opts)}
    _assert_same(new.full_state_dict(), before)  # creating the state changed no weight
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"), planner=sdp_checkpoint.LoadPlanner(), no_dist=True)
    sdp_checkpoint.set_optimizer_state_dict(new, new_opts, state["optim"])
    _assert_same_optimizer(new.full_optimizer_state(new_opts), old.full_optimizer_state(old_opts))


def _save_on_ranks(rank: int, world: int, folder: str, shard: bool) -> dict:
    torch.manual_seed(0)
    sdp = SubnetworkDataParallel(make("mlp"), neurons="blocks", coverage=0.5, shard=shard)
    opt = torch.optim.AdamW(sdp.shard_parameters(), lr=1e-2)
    for step in range(2):
        x, y = torch.randn(4, 5, generator=torch.Generator().manual_seed(10 * step + rank)), torch.tensor([0, 1, 2, 0])
        torch.nn.functional.cross_entropy(sdp(x), y).backward()
        opt.step()
        opt.zero_grad()
    sdp_checkpoint.save(folder, sdp, opt)
    return {"model": sdp.full_state_dict(), "optim": sdp.full_optimizer_state(opt)}


def _load_on_ranks(rank: int, world: int, folder: str, shard: bool) -> dict:
    sdp = SubnetworkDataParallel(make("mlp"), neurons="blocks", coverage=0.5, seed=1, shard=shard)
    opt = torch.optim.AdamW(sdp.shard_parameters(), lr=1e-2)
    sdp_checkpoint.load(folder, sdp, opt)
    files = sorted(p.name for p in Path(folder).iterdir())
    return {"model": sdp.full_state_dict(), "optim": sdp.full_optimizer_state(opt), "files": files}


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True])
def test_four_ranks_save_and_two_ranks_load(tmp_path: Path, shard: bool) -> None:
    saved = run_distributed(_save_on_ranks, 4, str(tmp_path / "ckpt"), shard)[0]
    loaded = run_distributed(_load_on_ranks, 2, str(tmp_path / "ckpt"), shard)  # the pools other tests use
    assert loaded[0]["files"] == [".metadata"] + [f"__{r}_0.distcp" for r in range(4)]  # one file per saving rank
    for result in loaded:
        _assert_same(result["model"], saved["model"])
        _assert_same_optimizer(result["optim"], saved["optim"])


def test_getting_the_optimizer_state_creates_only_the_missing_state_and_moves_nothing_else() -> None:
    sim, opts = _simulator(4, "block")
    train_simulated(sim, opts, range(2))
    opt = opts[0]
    params = [p for g in opt.param_groups for p in g["params"]]
    del opt.state[params[0]]  # a parameter without state (as after a re-drawn plan gave it a unit)
    kept = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if i > 0}
    weights = [p.detach().clone() for p in params]
    sdp_checkpoint.get_optimizer_state_dict(sim, opts)
    assert set(opt.state[params[0]]) == set(kept[1])  # created
    for i, state in kept.items():
        for name, value in state.items():
            assert torch.equal(opt.state[params[i]][name], value), (i, name)  # untouched
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
