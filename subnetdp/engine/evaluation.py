"""Evaluating the assembled full model, and the ensemble of the subnetworks.

Each block's norm running statistics were gathered inside its holders' subnetworks, where its input
came through a different set of blocks than in the full model; averaging them over holders (what
``full_state_dict`` does) does not fix that. Re-estimating them with a few forward passes of the
full model (as slimmable networks and HeteroFL's static BN do) does.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence, cast

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from .errors import SDPConfigError
from .exchange import Exchange
from .units import analyse_block, get_module, resolve_block_paths, trace_residual


def recalibrate_norm_statistics(model: nn.Module, batches: Iterable[Any]) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain average over
    ``batches`` (model inputs: tensors, or lists/tuples whose first element is the input) with
    ``torch.optim.swa_utils.update_bn``. Returns the number of batches used; the model is left in
    eval mode."""
    count = 0

    def counted() -> Iterator[Any]:
        nonlocal count
        for batch in batches:
            count += 1
            yield batch

    update_bn(counted(), model)
    model.eval()
    return count


@torch.no_grad()
def ensemble_log_probs(logits: Mapping[int, torch.Tensor], exchange: Exchange, world_size: int) -> torch.Tensor:
    """The log of the mean over the N workers of their predicted probabilities (softmax over the
    last dimension), from the local workers' ``logits`` on the same batch (collective)."""
    probs = {r: torch.softmax(x.float(), dim=-1) for r, x in logits.items()}
    exchange.all_reduce(tuple(range(world_size)), probs, "all_reduce of ensemble probabilities").wait()
    mean = next(iter(probs.values())) / world_size
    # a probability that underflowed to 0 on every worker must not become -inf
    return mean.clamp_min_(torch.finfo(mean.dtype).tiny).log_()


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


_LINEAR_IN_WEIGHT = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
                     nn.GroupNorm)


def _scalable(module: nn.Module) -> bool:
    """Whether multiplying the module's weight (and bias) by s multiplies its output by s."""
    names = {n for n, _ in module.named_parameters(recurse=False)}
    if isinstance(module, _LINEAR_IN_WEIGHT):
        return "weight" in names
    return type(module).__name__.endswith("RMSNorm") and names == {"weight"}


@torch.no_grad()
def fold_residual_scale(model: nn.Module, blocks: str | Sequence[str], factor: float) -> nn.Module:
    """Multiply every block's residual branch by ``factor`` by scaling the last layer of the branch
    (its weight and bias), so the model stays the plain model with the same keys: what
    :func:`scale_residual_branches` evaluates, as weights that any copy of the model class loads.
    Raises SDPConfigError for a block whose branch does not end in a layer linear in its weight
    (Linear, Conv, BatchNorm, LayerNorm, GroupNorm, RMSNorm)."""
    for path in resolve_block_paths(model, blocks):
        block = get_module(model, path)
        res = trace_residual(block, path)
        if res is None:
            raise SDPConfigError(f"block {path!r}: cannot fold a residual scale into a block fx cannot trace")
        modules = dict(res.graph_module.named_modules())
        def is_layer(node: Any) -> bool:
            return isinstance(node, torch.fx.Node) and node.op == "call_module" and _scalable(modules[node.target])

        def parameter_free(node: torch.fx.Node) -> bool:
            return node.op != "call_module" or not any(True for _ in modules[node.target].parameters())

        for _, branch in res.branches:
            node = branch
            # through parameter-free single-input ops after the layer (dropout, views, casts)
            while isinstance(node, torch.fx.Node) and not is_layer(node) and len(node.all_input_nodes) == 1 \
                    and parameter_free(node):
                node = node.all_input_nodes[0]
            if not is_layer(node):
                raise SDPConfigError(f"block {path!r}: its residual branch does not end in a layer linear in its "
                                     "weight (Linear, Conv, BatchNorm, LayerNorm, GroupNorm, RMSNorm), so k/N cannot "
                                     "be folded into it")
            # a call_module node (is_layer): its target is the module's qualified name
            for p in block.get_submodule(cast(str, node.target)).parameters(recurse=False):
                p.mul_(factor)
    return model
