"""Re-drawn plans (the paper's "stochastic block dropping"): a new plan during training, with
each unit's parameters, buffers and optimizer state moved from an old holder to its new holders.

    sdp.redraw(seed=7, optimizer=opt)        # collective; SubnetworkSimulator.redraw(seed, optimizers)

Only what changes hands moves, one unit at a time: for a unit that gains holders, its first old
holder broadcasts the unit's tensors and their optimizer state; the gainers keep them, the other
workers drop the buffer. No worker ever holds more than its subnetwork and one unit in flight, so
a re-draw stays inside SDP's memory (the full model is never assembled). A gained block is built
from a meta-device copy of the block, taken when the block left the worker (or at the cut), with
its shortcut modules (shared parameters) the very modules the worker already trains.

Supported: block level, forward masking, unsharded, ``scale="none"``, one optimizer parameter
group per worker (every other case raises ``SDPConfigError`` before anything moves).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from .cut import LocalLayout, meta_copy
from .errors import SDPConfigError
from .exchange import Exchange
from .layout import Piece, flatten, unflatten_into
from .plan import Plan, UnitCost, make_plan
from .reducer import make_buckets
from .units import get_module

if TYPE_CHECKING:
    from .subnetwork import Subnetwork


REDRAW_TOLERANCE = 0.1  # how far from the most balanced placement a re-drawn unit may go


def replan(plan: Plan, seed: int, tolerance: float | None = REDRAW_TOLERANCE) -> Plan:
    """A plan for the same units, N and coverage drawn with another seed (the units' costs are
    read from ``plan``, so no model is needed). With ``tolerance`` (the default) a random plan
    whose per-unit choices stay within that fraction of the most balanced one: the most balanced
    plan is nearly unique for units of unequal sizes (a ResNet's), so re-drawing it would only
    rename the workers; ``tolerance=None`` gives exactly ``make_plan``'s plan for ``seed``.
    A heterogeneous plan (per-rank coverage or memory budgets) is refused: its re-draw would be a
    uniform plan, silently dropping the workers' targets or budgets."""
    if plan.heterogeneous:
        raise SDPConfigError(_HETEROGENEOUS)
    counted = any(plan.unit_activations.values())
    units = [UnitCost(u, plan.unit_params[u], plan.unit_bytes[u], plan.unit_flops[u] if plan.flops_counted else None,
                      activations=plan.unit_activations.get(u, 0.0) if counted else None) for u in plan.holders]
    return make_plan(units, plan.world_size, plan.coverage, seed, level=plan.level, shared_params=plan.shared_params,
                     shared_bytes=plan.shared_bytes, shared_flops=plan.shared_flops if plan.flops_counted else None,
                     tolerance=tolerance)


_HETEROGENEOUS = ("redraw() draws uniform plans: this plan has per-rank coverage or memory budgets (a heterogeneous "
                  "plan), which a re-draw would silently drop; keep the plan fixed")


def check_redrawable(worker: "Subnetwork", optimizers: Mapping[int, torch.optim.Optimizer]) -> None:
    if worker.plan.heterogeneous:
        raise SDPConfigError(_HETEROGENEOUS)
    why = []
    if worker.level != "block":
        why.append("neuron level (the held slices would change shape)")
    if worker.masking != "forward":
        why.append("backward masking")
    if worker.sharded:
        why.append("shard=True")
    if worker.scale != "none":
        why.append(f"scale={worker.scale!r}")
    if any(len(o.param_groups) != 1 for o in optimizers.values()):
        why.append("an optimizer with several parameter groups (a gained block's group would be ambiguous)")
    if why:
        raise SDPConfigError("redraw() supports block level, forward masking, shard=False, scale='none' and one "
                             "optimizer parameter group; this run has " + ", ".join(why))


def _state_spec(optimizers: Mapping[int, torch.optim.Optimizer]) -> dict[str, tuple[str, torch.Size, torch.dtype]]:
    """The tensors an optimizer keeps per parameter: name -> ("param", ...) for parameter-shaped
    ones (moments), or ("fixed", shape, dtype) for the others (Adam's step), read from a local
    parameter with state (one with more than one entry, so that a moment and a step counter cannot
    share a shape). Every worker has stepped the same number of times, so every worker reads the
    same spec."""
    for optimizer in optimizers.values():
        for p, state in optimizer.state.items():
            if p.numel() < 2:
                continue
            spec = {}
            for name in sorted(state):
                v = state[name]
                if isinstance(v, torch.Tensor):
                    spec[name] = ("param", v.shape, v.dtype) if v.shape == p.shape else ("fixed", v.shape, v.dtype)
            return spec
    return {}


def _tensor(model: nn.Module, key: str) -> torch.Tensor:
    module_path, _, name = key.rpartition(".")
    return getattr(get_module(model, module_path), name)


@torch.no_grad()
def redraw(workers: Mapping[int, "Subnetwork"], optimizers: Mapping[int, torch.optim.Optimizer], new_plan: Plan,
           exchange: Exchange) -> int:
    """Move the local ``workers`` (and their optimizers, one each, over ``parameters()``) from
    their plan to ``new_plan`` (collective). Returns the bytes broadcast, the same on every worker:
    each moved unit's tensors and optimizer state, counted once."""
    first = next(iter(workers.values()))
    check_redrawable(first, optimizers)
    old_plan = first.plan
    if set(new_plan.holders) != set(old_plan.holders) or new_plan.world_size != old_plan.world_size:
        raise SDPConfigError("redraw(): the new plan must place the same units on the same workers")
    spec = _state_spec(optimizers)
    moved = 0
    for unit, new in new_plan.holders.items():
        old = old_plan.holders[unit]
        gainers = [r for r in new if r not in old]
        if not gainers:
            continue
        source = old[0]
        pieces = [p for p in first.layout.pieces if p.unit == unit]
        for r, worker in workers.items():
            if r in gainers:
                _gain_block(worker, unit)
        moved += _broadcast_unit(workers, optimizers, pieces, spec, source, set(gainers), exchange)
    for r, worker in workers.items():
        for unit, old in old_plan.holders.items():
            if r in old and r not in new_plan.holders[unit]:
                _drop_block(worker, unit, optimizers[r])
        _relayout(worker, new_plan)
        optimizers[r].param_groups[0]["params"] = list(worker.parameters())  # model order, as a fresh build
    return moved


def _gain_block(worker: "Subnetwork", path: str) -> None:
    """Materialise block ``path`` from its meta copy (values arrive by broadcast), sharing the
    shortcut modules of the dropped module it replaces."""
    dropped = get_module(worker.module, path)
    block = worker.templates.pop(path)
    _materialise(block, worker.device)
    block.train(dropped.training)
    for name in worker.units.blocks[path].shortcut_modules:
        try:
            block.set_submodule(name, dropped.get_submodule(name))
        except AttributeError:
            continue  # a parameter-free op of the shortcut that the dropped module does not keep
    worker.module.set_submodule(path, block)


def _materialise(block: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) the meta tensors of ``block`` on ``device``; the real ones, its
    non-persistent buffers, are moved there (``to_empty`` would wipe them)."""
    for module in block.modules():
        for name, p in module._parameters.items():
            if p is not None:
                data = torch.empty_like(p, device=device) if p.is_meta else p.data.to(device)
                module._parameters[name] = nn.Parameter(data, requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty_like(b, device=device) if b.is_meta else b.to(device)


def _drop_block(worker: "Subnetwork", path: str, optimizer: torch.optim.Optimizer) -> None:
    """Replace held block ``path`` by its shortcut; its parameters leave the optimizer."""
    block = get_module(worker.module, path)
    info = worker.units.blocks[path]
    for name, p in block.named_parameters():
        if not info.is_shortcut_key(name):
            optimizer.state.pop(p, None)
    worker.templates[path] = meta_copy(block)
    worker.module.set_submodule(path, info.dropped_module(block))


def _broadcast_unit(workers: Mapping[int, "Subnetwork"], optimizers: Mapping[int, torch.optim.Optimizer],
                    pieces: list[Piece], spec: dict[str, tuple[str, torch.Size, torch.dtype]], source: int,
                    gainers: set[int], exchange: Exchange) -> int:
    """The unit's tensors and each parameter's optimizer state, from ``source`` to every worker
    (one broadcast per dtype); the gainers keep them. Returns the bytes broadcast."""
    # (numel, dtype) of every tensor, in the same order on every worker
    shapes: list[tuple[torch.Size, torch.dtype]] = []
    for p in pieces:
        shapes.append((p.shape, p.dtype))
        if p.is_param:
            shapes += [(p.shape if kind == "param" else shape, p.dtype if kind == "param" else dtype)
                       for kind, shape, dtype in spec.values()]
    local: dict[int, list[torch.Tensor]] = {}
    for r, worker in workers.items():
        if r == source or r in gainers:
            local[r] = _unit_tensors(worker, optimizers[r], pieces, spec, create=r in gainers)
    total = 0
    for dtype in dict.fromkeys(d for _, d in shapes):
        index = [i for i, (_, d) in enumerate(shapes) if d == dtype]
        numel = sum(shapes[i][0].numel() for i in index)
        buffers = {r: flatten([local[r][i] for i in index]) if r == source
                   else torch.empty(numel, dtype=dtype, device=w.device) for r, w in workers.items()}
        exchange.broadcast(source, buffers, f"re-draw: a unit from worker {source}").wait()
        for r in gainers & set(workers):
            unflatten_into(buffers[r], [local[r][i] for i in index])
        total += numel * dtype.itemsize
    return total


def _unit_tensors(worker: "Subnetwork", optimizer: torch.optim.Optimizer, pieces: list[Piece],
                  spec: dict[str, tuple[str, torch.Size, torch.dtype]], create: bool) -> list[torch.Tensor]:
    """The unit's tensors on this worker, in broadcast order: each piece, then (parameters) its
    optimizer state. ``create``: a gainer, whose state entries are allocated here to be filled."""
    out = []
    for p in pieces:
        t = _tensor(worker.module, p.key)
        out.append(t)
        if not p.is_param:
            continue
        if create:
            state = optimizer.state[t]
            for name, (kind, shape, dtype) in spec.items():
                state[name] = torch.empty_like(t) if kind == "param" else torch.empty(shape, dtype=dtype,
                                                                                       device=t.device)
        out += [optimizer.state[t][name] for name in spec]
    return out


def _relayout(worker: "Subnetwork", plan: Plan) -> None:
    """The worker's layout and buckets under ``plan`` (pieces keep their keys, shapes, dtypes)."""
    pieces = [replace(p, holders=plan.holders[p.unit]) if p.unit is not None else p for p in worker.layout.pieces]
    worker.plan = plan
    worker.layout = LocalLayout(worker.module, plan, worker.rank, worker.masking, pieces, worker.layout.full_shapes,
                                {}, worker.device)
    worker.buckets = make_buckets(worker.layout, worker.bucket_cap_mb)
    for bucket_list in worker.buckets.values():
        for bucket in bucket_list:
            bucket.reduce_dtype = worker.reduce_dtype if worker.reduce_dtype != bucket.dtype else None
