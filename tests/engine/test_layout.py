"""Pieces of the full model's state: they tile every tensor, and flat buffers round-trip."""

from __future__ import annotations

import pytest
import torch

from subnetdp import SubnetworkDataParallel, SubnetworkSimulator
from subnetdp.engine.layout import Piece, flatten, narrow_ranges, unflatten_into

from _dist import run_distributed
from _models import batch_for, make


@pytest.mark.parametrize("kind,level", [("mlp", "block"), ("mlp", "neuron"), ("resnet", "block"),
                                        ("resnet", "neuron"), ("llama", "neuron")])
def test_pieces_tile_every_tensor_of_the_full_model_exactly_once(kind: str, level: str) -> None:
    model = make(kind)
    container = "model.layers" if kind == "llama" else "blocks"
    sim = SubnetworkSimulator(model, 4, coverage=0.5, **{"blocks" if level == "block" else "neurons": container})
    pieces: list[Piece] = sim.workers[0].layout.pieces
    state = model.state_dict()
    assert {p.key for p in pieces} == set(state)
    for key, tensor in state.items():
        count = torch.zeros(tensor.shape, dtype=torch.int64)
        for piece in (p for p in pieces if p.key == key):
            views = piece.of_full(count)
            assert sum(v.numel() for v in views) == piece.numel
            for v in views:
                v += 1
        assert (count == 1).all(), f"{key}: covered {count.unique().tolist()} times"
    for piece in pieces:
        assert piece.owner == piece.holders[0] and list(piece.holders) == sorted(piece.holders)
        assert len(piece.holders) == (4 if piece.unit is None else sim.plan.k)


def _listed(pieces: list[Piece]) -> list[tuple]:
    return [(p.key, p.holders, p.is_param, tuple(p.shape), p.dtype, p.unit, p.full_ranges, p.group) for p in pieces]


def _pieces_of_a_real_rank(rank: int, world: int) -> dict[str, list[tuple]]:
    torch.manual_seed(rank)  # each rank its own model, initialised its own way, planned on its own
    return {level: _listed(SubnetworkDataParallel(make("resnet"), **{level: "blocks"}, coverage=0.5,
                                                  example_input=batch_for("resnet", 0)[0]).layout.pieces)
            for level in ("blocks", "neurons")}


def test_every_worker_lists_the_same_pieces() -> None:
    """Each rank cuts the model by its own list of pieces, made in its own process (its own
    hash seed, model and plan); the collectives and the assembly pair them by position. (The
    simulator's workers share one plan, so comparing them with each other proves nothing.)"""
    ranks = run_distributed(_pieces_of_a_real_rank, 4)
    for level in ("blocks", "neurons"):
        sim = SubnetworkSimulator(make("resnet"), 4, **{level: "blocks"}, coverage=0.5,
                                  example_input=batch_for("resnet", 0)[0])
        expected = _listed(sim.workers[0].layout.pieces)
        assert len({p[1] for p in expected}) > 2 and any(p[6] for p in expected) == (level == "neurons")
        for rank, listed in enumerate(ranks):
            assert listed[level] == expected, (level, rank)


def test_a_held_slice_is_located_in_the_local_tensor() -> None:
    """Forward masking: a neuron group's local storage holds exactly the full model's entries."""
    model = make("mlp")
    full = {k: v.clone() for k, v in model.state_dict().items()}
    sim = SubnetworkSimulator(model, 4, neurons="blocks", coverage=0.5)
    checked = 0
    for worker in sim.workers:
        for piece in worker.layout.pieces:
            location = worker.layout.locate(piece)
            if worker.rank not in piece.holders:
                assert location is None
                continue
            torch.testing.assert_close(flatten(location.views()), flatten(piece.of_full(full[piece.key])),
                                       rtol=0, atol=0)
            checked += piece.spec is not None
    assert checked > 0


def test_flatten_and_unflatten_round_trip_and_check_sizes() -> None:
    t = torch.arange(24.0).reshape(4, 6)
    views = narrow_ranges(t, 1, [(0, 2), (4, 6)])
    flat = flatten(views)
    assert flat.tolist() == [0, 1, 6, 7, 12, 13, 18, 19, 4, 5, 10, 11, 16, 17, 22, 23]
    target = torch.zeros(4, 6)
    unflatten_into(flat, narrow_ranges(target, 1, [(0, 2), (4, 6)]))
    assert torch.equal(target[:, [0, 1, 4, 5]], t[:, [0, 1, 4, 5]]) and target[:, 2:4].abs().sum() == 0
    with pytest.raises(ValueError, match="16 values for targets of 8"):
        unflatten_into(flat, [torch.zeros(8)])
    assert flatten([]).numel() == 0
