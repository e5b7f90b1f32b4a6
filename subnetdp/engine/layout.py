"""The full model's state cut into pieces, and the flat buffers pieces travel in.

A *piece* is a whole tensor of a shared module or of a block unit, or the slice of a tensor that
one neuron group owns. Each piece has a holder set (all workers for shared pieces); its first
holder is its *owner*, whose copy is taken when the full model is assembled. The list of pieces is
a pure function of the model and the plan, the same on every rank; where a piece lives on one
worker after the cut is a :class:`Location` (see ``cut.py``). Every exchange packs the local
values of a list of pieces into one flat buffer, moves it, and unpacks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .plan import Plan
from .units import BlockInfo, NeuronSite, TensorSlice

Shapes = Mapping[str, tuple[torch.Size, torch.dtype]]  # full-model state_dict key -> shape, dtype


@dataclass(frozen=True)
class Piece:
    """One piece of the full model's state."""

    key: str                      # full-model state_dict key
    holders: tuple[int, ...]      # workers that hold it (sorted)
    is_param: bool                # a parameter (else a buffer)
    shape: torch.Size             # of the piece (a slice's ranges laid one after another)
    dtype: torch.dtype
    unit: str | None = None       # None for shared pieces
    spec: TensorSlice | None = None                # neuron-group slices: how the tensor is cut
    full_ranges: tuple[tuple[int, int], ...] = ()  # along spec.dim, in the full tensor
    group: int = -1                                # neuron-group slices: the group index

    @property
    def owner(self) -> int:
        return self.holders[0]

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def of_full(self, full: torch.Tensor) -> list[torch.Tensor]:
        """Views of this piece in a full-model tensor."""
        return [full] if self.spec is None else narrow_ranges(full, self.spec.dim, self.full_ranges)


@dataclass(frozen=True)
class Location:
    """Where a piece lives in one worker's tensors: ``tensor`` whole, or ``ranges`` along ``dim``."""

    tensor: torch.Tensor
    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()

    def views(self, tensor: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Views of the piece in ``tensor`` (default: the storage itself; pass a gradient or an
        optimizer state of the same shape to address the same entries there)."""
        t = self.tensor if tensor is None else tensor
        return [t] if self.dim is None else narrow_ranges(t, self.dim, self.ranges)


def make_pieces(shapes: Shapes, param_keys: set[str], plan: Plan, blocks: Mapping[str, BlockInfo],
                sites: Iterable[NeuronSite]) -> list[Piece]:
    """Every piece of the full model's state, in state_dict order (identical on all ranks)."""
    world = tuple(range(plan.world_size))
    sliced = {(s.module, s.tensor): (site, s) for site in sites for s in site.slices}
    pieces: list[Piece] = []
    for key, (shape, dtype) in shapes.items():
        is_param = key in param_keys
        module, _, name = key.rpartition(".")
        block = next((p for p in blocks if key.startswith(p + ".")), None)
        if block is not None and not blocks[block].is_shortcut_key(key[len(block) + 1:]):
            pieces.append(Piece(key, plan.holders[block], is_param, shape, dtype, unit=block))
        elif (module, name) in sliced:
            site, spec = sliced[(module, name)]
            for g, (a, b) in enumerate(site.groups):
                ranges = tuple(spec.full_ranges(shape[spec.dim], a, b))
                size = list(shape)
                size[spec.dim] = sum(hi - lo for lo, hi in ranges)
                pieces.append(Piece(key, plan.holders[site.unit_name(g)], is_param, torch.Size(size), dtype,
                                    unit=site.unit_name(g), spec=spec, full_ranges=ranges, group=g))
        else:
            pieces.append(Piece(key, world, is_param, shape, dtype))
    return pieces


def narrow_ranges(tensor: torch.Tensor, dim: int, ranges: Iterable[tuple[int, int]]) -> list[torch.Tensor]:
    """Views of ``tensor`` over several ranges of one dim."""
    return [tensor.narrow(dim, a, b - a) for a, b in ranges]


def flatten(tensors: list[torch.Tensor], device: torch.device | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """One contiguous 1-D buffer holding all ``tensors`` (zero-length if none)."""
    if not tensors:
        return torch.empty(0, device=device, dtype=dtype or torch.float32)
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, targets: list[torch.Tensor]) -> None:
    """Copy consecutive parts of ``flat`` into each target view."""
    offset = 0
    for t in targets:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"unflatten_into: {flat.numel()} values for targets of {offset}")


def dtype_groups(pieces: Iterable[Piece]) -> dict[torch.dtype, list[Piece]]:
    """Pieces by dtype, dtypes in first-seen order: a flat buffer holds one dtype."""
    groups: dict[torch.dtype, list[Piece]] = {}
    for p in pieces:
        groups.setdefault(p.dtype, []).append(p)
    return groups
