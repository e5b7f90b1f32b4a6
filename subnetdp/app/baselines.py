"""Baselines that SDP is compared with, applied to an unmodified model (keys unchanged):
stochastic depth and activation checkpointing (also used by SDP's full-model phase).

    sd = StochasticDepth(model, ["blocks.0", "blocks.1"], drop=0.5, seed=0)
    sd.draw(step, rank)            # before each worker's forward: fixes which blocks it drops
    loss_fn(model(x), y).backward()

Stochastic depth (block-level drop-path): in a training step each block is dropped with
probability ``drop``, independently per worker, leaving its shortcut (the same dropped form B-SDP
uses). With drop = 1 - C each worker runs, in expectation, the depth of a B-SDP subnetwork at
coverage C, but the blocks change every step instead of staying fixed: the study's "is SDP just
regularisation?" comparison. At evaluation the branches are scaled by the survival probability.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..engine.units import analyse_block, get_module


class StochasticDepth:
    """Replaces each block's ``forward`` (an instance attribute: no module is added, so the state
    dict keys stay those of the plain model) by one that skips the branch when the block is drawn
    as dropped. Draws are a pure function of (seed, step, rank), so a resumed or simulated run
    drops the same blocks as the uninterrupted multi-process one."""

    def __init__(self, model: nn.Module, paths: Sequence[str], drop: float, seed: int = 0) -> None:
        if not 0 <= drop < 1:
            raise ValueError(f"stochastic depth: drop probability must be in [0, 1), got {drop}")
        self.drop, self.seed = drop, seed
        self.dropped_now = [False] * len(paths)
        for index, path in enumerate(paths):
            block = get_module(model, path)
            dropped = analyse_block(block, path).dropped_module(block)
            kept = {id(p) for p in dropped.parameters()}
            branch = [p for p in block.parameters() if id(p) not in kept]
            block.forward = self._make_forward(index, block, dropped, branch)

    def _make_forward(self, index: int, block: nn.Module, dropped: nn.Module, branch: list[nn.Parameter]) -> Any:
        full = block.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not (block.training and self.dropped_now[index]):
                return full(*args, **kwargs)
            out = dropped(*args, **kwargs)
            # the skipped branch gets zero gradients, which DDP averages like any other (no
            # find_unused_parameters, which would search the graph every step)
            return out + 0.0 * torch.stack([p.reshape(-1)[0] for p in branch]).sum().to(out.dtype)
        return forward

    def draw(self, step: int, rank: int) -> None:
        """Fix which blocks the next forward of worker ``rank`` at ``step`` drops."""
        generator = torch.Generator().manual_seed(hash((self.seed, step, rank)) & 0x7FFF_FFFF_FFFF)
        draws = torch.rand(len(self.dropped_now), generator=generator)
        self.dropped_now = [bool(u < self.drop) for u in draws]


def checkpoint_blocks(model: nn.Module, paths: Sequence[str]) -> None:
    """Recompute each block's activations in backward instead of keeping them (keys unchanged)."""
    for path in paths:
        block = get_module(model, path)
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
