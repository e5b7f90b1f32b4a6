"""Backward masking keeps the full model on every worker but updates only held units: after each
optimizer step every unit's first holder (its owner) broadcasts the new values, so every worker
holds bitwise-identical full weights for the next forward."""

from __future__ import annotations

from typing import Mapping

import torch

from .cut import LocalLayout
from .exchange import Exchange
from .layout import dtype_groups


@torch.no_grad()
def sync_weights(layouts: Mapping[int, LocalLayout], exchange: Exchange, world_size: int) -> None:
    """Each owner's unit parameters, packed by dtype, broadcast to all workers and unpacked into
    their copies (held or frozen); the local workers are ``layouts`` (one rank, or all virtual)."""
    first = next(iter(layouts.values()))
    in_flight = []
    for source in range(world_size):
        for dtype, pieces in dtype_groups(first.owned(source, params_only=True, units_only=True)).items():
            numel = sum(p.numel for p in pieces)
            buffers = {r: layout.pack(pieces) if r == source else
                       torch.empty(numel, dtype=dtype, device=layout.device) for r, layout in layouts.items()}
            in_flight.append((source, pieces, buffers,
                              exchange.broadcast(source, buffers, f"weight broadcast from worker {source}")))
    for source, pieces, buffers, pending in in_flight:
        pending.wait()
        for r, layout in layouts.items():
            if r != source:
                layout.unpack(pieces, buffers[r])
