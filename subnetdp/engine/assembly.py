"""The full model's state from the workers' pieces, and back.

    full_state_dict(layouts, exchange, N)      # units from their owners, norm statistics averaged
    load_full_state_dict(layout, state)        # a worker takes its pieces of a full state dict
    full_optimizer_state(...) / load_full_optimizer_state(...)   # the same for optimizer state

Together they are "re-plan and move": assemble the model and its optimizer state under one plan,
cut a model under another (a different seed, or a different worker count) and load each worker's
pieces, optimizer state included. ``layouts`` are the local workers' (one rank in the wrapper,
every virtual worker in the simulator); ``exchange`` moves the flat buffers between them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .cut import LocalLayout
from .errors import SDPConfigError
from .exchange import Exchange
from .layout import Piece, dtype_groups, flatten, unflatten_into

OptimizerState = dict[str, Any]  # {"state": {full key: {name: full tensor}}, "scalars": {name: value}}


@torch.no_grad()
def full_state_dict(layouts: Mapping[int, LocalLayout], exchange: Exchange, world_size: int) -> dict[str, torch.Tensor]:
    """The assembled full model on CPU with the original keys (collective): each piece from its
    owner; floating-point buffers (norm running statistics) averaged over the piece's holders."""
    first = next(iter(layouts.values()))
    averaged = averaged_buffers(layouts, exchange)
    out = _empty_full(first)
    for source in range(world_size):
        for dtype, pieces in dtype_groups(first.owned(source)).items():
            numel = sum(p.numel for p in pieces)
            buffers = {r: (_owned_values(layout, pieces, averaged[r]) if r == source
                           else torch.empty(numel, dtype=dtype, device=layout.device)) for r, layout in layouts.items()}
            exchange.broadcast(source, buffers, f"full-model broadcast from worker {source}").wait()
            _write_full(out, pieces, next(iter(buffers.values())).cpu())
    return out


def _owned_values(layout: LocalLayout, pieces: list[Piece], averaged: dict[tuple[str, int], torch.Tensor]
                  ) -> torch.Tensor:
    return flatten([averaged[(p.key, p.group)] if (p.key, p.group) in averaged
                    else flatten(layout.locate(p).views()) for p in pieces])  # type: ignore[union-attr]


def averaged_buffers(layouts: Mapping[int, LocalLayout], exchange: Exchange
                      ) -> dict[int, dict[tuple[str, int], torch.Tensor]]:
    """Per local worker: each held floating-point buffer piece averaged over its holders."""
    first = next(iter(layouts.values()))
    groups: dict[tuple[tuple[int, ...], torch.dtype], list[Piece]] = {}
    for p in first.pieces:
        if not p.is_param and p.dtype.is_floating_point:
            groups.setdefault((p.holders, p.dtype), []).append(p)
    averaged: dict[int, dict[tuple[str, int], torch.Tensor]] = {r: {} for r in layouts}
    for (holders, _), pieces in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        local = {r: layout for r, layout in layouts.items() if r in holders}
        if not local:
            continue
        buffers = {r: layout.pack(pieces) for r, layout in local.items()}
        exchange.all_reduce(holders, buffers, "running-statistics all_reduce").wait()
        for r, flat in buffers.items():
            flat.div_(len(holders))
            offset = 0
            for p in pieces:
                averaged[r][(p.key, p.group)] = flat[offset:offset + p.numel]
                offset += p.numel
    return averaged


@torch.no_grad()
def local_full_state_dict(layout: LocalLayout) -> dict[str, torch.Tensor]:
    """Backward masking: this worker's own copy of the full model (no communication)."""
    if layout.masking != "backward":
        raise SDPConfigError("local_full_state_dict() needs masking='backward': under forward masking a "
                             "worker does not hold the full model; use full_state_dict()")
    out = _empty_full(layout)
    for source in range(layout.plan.world_size):
        for _, pieces in dtype_groups(layout.owned(source)).items():
            _write_full(out, pieces, layout.pack(pieces).cpu())
    return out


@torch.no_grad()
def load_full_state_dict(layout: LocalLayout, state: Mapping[str, torch.Tensor]) -> None:
    """This worker's pieces of a full-model state dict (original keys); local, no communication."""
    keys = {p.key for p in layout.pieces}
    missing, unexpected = keys - set(state), set(state) - keys
    if missing or unexpected:
        raise SDPConfigError(f"full state dict does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    for piece in layout.pieces:
        location = layout.locate(piece)
        if location is not None:
            unflatten_into(flatten(piece.of_full(state[piece.key].to(layout.device))), location.views())


# ---------------------------------------------------------------------------------------------
# optimizer state: every tensor shaped like its parameter travels as the parameter does


def state_names(layouts: Mapping[int, LocalLayout], optimizers: Mapping[int, torch.optim.Optimizer]
                 ) -> tuple[list[str], dict[str, Any]]:
    """Per-parameter tensor states (e.g. exp_avg, exp_avg_sq) and scalar states (e.g. step), read
    from a trained parameter of the first local worker: every worker runs the same optimizer
    class, and every worker trains the shared parameters or at least one unit."""
    for r, layout in layouts.items():
        for piece in layout.pieces:
            location = layout.trainable(piece)
            if location is None:
                continue
            state = optimizers[r].state.get(location.tensor)
            if state:
                names = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == location.tensor.shape
                         and v.dim() > 0]
                scalars = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items() if k not in names}
                return sorted(names), scalars
    return [], {}


@torch.no_grad()
def full_optimizer_state(layouts: Mapping[int, LocalLayout], optimizers: Mapping[int, torch.optim.Optimizer],
                         exchange: Exchange, world_size: int) -> OptimizerState:
    """The optimizer state of the full model (collective): each per-parameter tensor state in the
    full parameter's shape, keyed by the full model's keys, from each piece's owner."""
    names, scalars = state_names(layouts, optimizers)
    first = next(iter(layouts.values()))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for source in range(world_size):
        for dtype, group in dtype_groups(first.owned(source, params_only=True)).items():
            numel = sum(p.numel for p in group)
            for name in names:
                buffers = {r: (_pack_state(layout, optimizers[r], group, name) if r == source
                               else torch.empty(numel, dtype=dtype, device=layout.device))
                           for r, layout in layouts.items()}
                exchange.broadcast(source, buffers, f"optimizer-state broadcast from worker {source}").wait()
                flat = next(iter(buffers.values())).cpu()
                offset = 0
                for p in group:
                    states = out.setdefault(p.key, {})
                    full = states.setdefault(name, torch.zeros(first.full_shapes[p.key], dtype=dtype))
                    unflatten_into(flat[offset:offset + p.numel], p.of_full(full))
                    offset += p.numel
    return {"state": out, "scalars": scalars}


def _pack_state(layout: LocalLayout, optimizer: torch.optim.Optimizer, pieces: list[Piece], name: str) -> torch.Tensor:
    parts = []
    for p in pieces:
        location = layout.trainable(p)
        state = optimizer.state.get(location.tensor, {}) if location is not None else {}
        value = state.get(name)
        parts += location.views(value if value is not None else torch.zeros_like(location.tensor)) \
            if location is not None else [torch.zeros(p.shape, dtype=p.dtype, device=layout.device)]
    return flatten(parts, dtype=pieces[0].dtype)


@torch.no_grad()
def load_full_optimizer_state(layout: LocalLayout, optimizer: torch.optim.Optimizer, full: OptimizerState) -> None:
    """Give this worker's optimizer the state of the pieces it trains (local, no communication)."""
    trained: dict[int, nn.Parameter] = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    for piece in layout.pieces:
        location = layout.trainable(piece)
        if location is None or id(location.tensor) not in trained or piece.key not in full["state"]:
            continue
        state = optimizer.state[location.tensor]
        for name, value in full["state"][piece.key].items():
            if name not in state:
                state[name] = torch.zeros_like(location.tensor)
            unflatten_into(flatten(piece.of_full(value.to(layout.device))), location.views(state[name]))
        for name, value in full["scalars"].items():
            state[name] = value.clone() if torch.is_tensor(value) else value


def _empty_full(layout: LocalLayout) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in layout.pieces:
        if p.key not in out:
            out[p.key] = torch.empty(layout.full_shapes[p.key], dtype=p.dtype)
    return out


def _write_full(out: dict[str, torch.Tensor], pieces: list[Piece], flat: torch.Tensor) -> None:
    """Pieces travel as their ranges flattened one after another: write each into the full tensor."""
    offset = 0
    for p in pieces:
        unflatten_into(flat[offset:offset + p.numel], p.of_full(out[p.key]))
        offset += p.numel
