"""Evaluating the assembled full model.

Each block's norm running statistics were gathered inside its holders' subnetworks, where its input
came through a different set of blocks than in the full model; averaging them over holders (what
``full_state_dict`` does) does not fix that. Re-estimating them with a few forward passes of the
full model (as slimmable networks and HeteroFL's static BN do) does.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .units import analyse_block, get_module, resolve_block_paths


@torch.no_grad()
def recalibrate_norm_statistics(model: nn.Module, batches: Iterable[Any]) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain average over
    ``batches`` (inputs only: tensors, tuples of positional args, or dicts of keyword args) in one
    forward pass each. Returns the number of batches used; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    count = 0
    try:
        for batch in batches:
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, tuple):
                model(*batch)
            else:
                model(batch)
            count += 1
    finally:
        for m, momentum in saved.items():
            m.momentum = momentum
        model.eval()
    return count


def scale_residual_branches(model: nn.Module, blocks: str | Sequence[str], factor: float) -> nn.Module:
    """Multiply every block's residual branch by ``factor`` in place: ``post(shortcut(x) + factor *
    f(x))``, as stochastic depth evaluates a network whose blocks were each trained with survival
    probability ``factor``. For a B-SDP model trained unscaled, ``factor = k / N`` (each block was
    in k of the N workers' subnetworks). State-dict keys do not change."""
    for path in resolve_block_paths(model, blocks):
        parent_path, _, name = path.rpartition(".")
        parent = get_module(model, parent_path)
        block = get_module(model, path)
        scaled = analyse_block(block, path).scaled_module(block, factor)
        if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
            parent[int(name)] = scaled
        else:
            setattr(parent, name, scaled)
    return model
