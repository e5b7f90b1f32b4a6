"""Where every piece of the full model lives on a worker.

The full model's state is cut into *pieces*: a whole tensor of a shared module or of a block unit,
or the slice of a tensor that one neuron group owns. Each piece has a holder set (all workers for
shared pieces). Gradient buckets, weight broadcasts and full-model assembly are all lists of
pieces, so the multi-process wrapper and the single-process simulator move exactly the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .units import NeuronSite, TensorSlice


@dataclass(frozen=True)
class Piece:
    """One piece of the full model's state."""

    key: str                      # full-model state_dict key
    holders: tuple[int, ...]      # workers that hold it (sorted)
    is_param: bool                # a parameter (else a buffer)
    unit: str | None = None       # None for shared pieces
    spec: TensorSlice | None = None  # set for neuron-group slices
    full_ranges: tuple[tuple[int, int], ...] = ()  # along spec.dim, in the full tensor
    site: NeuronSite | None = None
    group: int = -1

    @property
    def owner(self) -> int:
        return self.holders[0]

    def full_shape(self, shape: torch.Size) -> torch.Size:
        if self.spec is None:
            return shape
        size = list(shape)
        size[self.spec.dim] = sum(b - a for a, b in self.full_ranges)
        return torch.Size(size)


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

