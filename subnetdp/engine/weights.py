"""Backward masking keeps the full model on every worker but updates only held units: after each
optimizer step every unit's first holder (its owner) sends the new values to all workers, so every
worker holds bitwise-identical full weights for the next forward.

One all-gather per dtype and step: each worker contributes the units it owns (padded to the
largest owner's size), and takes everyone else's. A worker hands its own units to the collective,
about 1/N of the units' bytes, where N broadcasts (one per owner) hand every unit to every worker.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from .cut import LocalLayout
from .exchange import Exchange
from .layout import Piece


@torch.no_grad()
def sync_weights(layouts: Mapping[int, LocalLayout], exchange: Exchange, world_size: int) -> None:
    """Each owner's unit parameters, gathered by every worker and unpacked into its copies (held or
    frozen); the local workers are ``layouts`` (one rank, or all virtual ones)."""
    first = next(iter(layouts.values()))
    owned = [first.owned(source, params_only=True, units_only=True) for source in range(world_size)]
    dtypes = list(dict.fromkeys(p.dtype for pieces in owned for p in pieces))
    for dtype in dtypes:
        by_source: list[list[Piece]] = [[p for p in pieces if p.dtype == dtype] for pieces in owned]
        sizes = [sum(p.numel for p in pieces) for pieces in by_source]
        width = max(sizes)
        inputs = {r: F.pad(layout.pack(by_source[r]) if by_source[r] else
                           torch.empty(0, dtype=dtype, device=layout.device), (0, width - sizes[r]))
                  for r, layout in layouts.items()}
        outputs = {r: torch.empty(width * world_size, dtype=dtype, device=layout.device)
                   for r, layout in layouts.items()}
        exchange.all_gather(tuple(range(world_size)), inputs, outputs, f"weight all_gather ({dtype})").wait()
        for r, layout in layouts.items():
            for source, pieces in enumerate(by_source):
                if source != r and pieces:
                    layout.unpack(pieces, outputs[r][source * width:source * width + sizes[source]])
