"""The cut: turn the full model into one worker's subnetwork, in place, and say where each piece
of the full model's state now lives on that worker.

    layout = cut_model(model, units, plan, rank=2, masking="forward", scale="none")
    layout.locate(piece)          # Location of the piece in this worker's tensors, or None

- forward masking: a dropped block is replaced by its shortcut; neuron groups are sliced out of
  the weight tensors (the worker never allocates what it does not hold).
- backward masking: the full model stays; a dropped block's parameters are frozen; a sliced
  parameter becomes a trainable held slice plus a frozen full copy, which a pre-forward hook
  assembles (so no gradient or optimizer state exists for what the worker does not hold).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from .layout import Location, Piece, flatten, make_pieces, unflatten_into
from .plan import Plan
from .planning import Units
from .units import NeuronSite, TensorSlice, get_module, refresh_shape_attributes

HELD, FULL = "_sdp_held", "_sdp_full"  # suffixes of a backward-masked sliced parameter's two parts


@dataclass(frozen=True)
class HeldSlice:
    """How one neuron-sliced tensor is stored on this worker."""

    spec: TensorSlice
    spans: dict[int, tuple[int, int]]  # held group -> (offset, width) among the held hidden units
    index: torch.Tensor                # full-tensor indices, along spec.dim, of the held entries


class LocalLayout:
    """Where every piece of the full model's state lives on one worker after the cut."""

    def __init__(self, model: nn.Module, plan: Plan, rank: int, masking: str, pieces: list[Piece],
                 full_shapes: dict[str, torch.Size], sliced: dict[tuple[str, str], HeldSlice],
                 device: torch.device) -> None:
        self.model, self.plan, self.rank, self.masking = model, plan, rank, masking
        self.pieces, self.full_shapes, self.sliced, self.device = pieces, full_shapes, sliced, device

    def _tensor(self, key: str, trainable: bool) -> torch.Tensor:
        module_path, _, name = key.rpartition(".")
        module = get_module(self.model, module_path)
        if self.masking == "backward" and (module_path, name) in self.sliced:
            return getattr(module, name + (HELD if trainable else FULL))
        return getattr(module, name)

    def locate(self, piece: Piece) -> Location | None:
        """The piece's storage on this worker: the trained copy where it holds the piece, the frozen
        copy that backward masking keeps otherwise, None where forward masking dropped it."""
        holds = self.rank in piece.holders
        if not holds and self.masking == "forward":
            return None
        if piece.spec is None:
            return Location(self._tensor(piece.key, trainable=True))
        held = self.sliced.get(_split(piece.key))
        if not holds or held is None:  # not held (backward), or a buffer backward masking keeps whole
            return Location(self._tensor(piece.key, trainable=False), piece.spec.dim, piece.full_ranges)
        tensor = self._tensor(piece.key, trainable=True)
        offset, width = held.spans[piece.group]
        dim = piece.spec.dim
        return Location(tensor, dim, tuple(piece.spec.local_ranges(tensor.shape[dim], offset, width)))

    def views(self, pieces: Iterable[Piece]) -> list[torch.Tensor]:
        return [v for p in pieces for v in self.locate(p).views()]  # type: ignore[union-attr]

    def pack(self, pieces: list[Piece]) -> torch.Tensor:
        """The local values of ``pieces`` (all held here, one dtype) as one flat buffer."""
        return flatten(self.views(pieces), dtype=pieces[0].dtype if pieces else None)

    def unpack(self, pieces: list[Piece], flat: torch.Tensor) -> None:
        """Overwrite this worker's copies of ``pieces`` from a flat buffer. (Under backward masking
        a holder's frozen copy of its own slices is stale but never read: the forward overwrites
        those entries with the held slice.)"""
        unflatten_into(flat, self.views(pieces))

    def owned(self, source: int, params_only: bool = False, units_only: bool = False) -> list[Piece]:
        """The pieces whose first holder is ``source``."""
        return [p for p in self.pieces if p.owner == source and (p.is_param or not params_only)
                and (p.unit is not None or not units_only)]

    def trainable(self, piece: Piece) -> Location | None:
        """Where this worker trains the piece: a held parameter that requires grad, else None."""
        if not piece.is_param or self.rank not in piece.holders:
            return None
        location = self.locate(piece)
        tensor = location.tensor if location is not None else None
        return location if isinstance(tensor, nn.Parameter) and tensor.requires_grad else None


def cut_model(model: nn.Module, units: Units, plan: Plan, rank: int, masking: str, scale: str) -> LocalLayout:
    """Cut ``model`` in place into worker ``rank``'s subnetwork; returns where everything lives."""
    state = model.state_dict(keep_vars=True)
    shapes = {k: (v.shape, v.dtype) for k, v in state.items()}
    param_keys = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    pieces = make_pieces(shapes, param_keys, plan, units.blocks, units.sites)
    held_units = set(plan.held_units(rank))
    if units.level == "block":
        _cut_blocks(model, units, plan, held_units, masking, scale)
        sliced: dict[tuple[str, str], HeldSlice] = {}
    else:
        sliced = {}
        for site in units.sites:
            sliced.update(_cut_site(model, site, held_units, masking, scale))
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    return LocalLayout(model, plan, rank, masking, pieces, {k: shape for k, (shape, _) in shapes.items()},
                       sliced, device)


def _cut_blocks(model: nn.Module, units: Units, plan: Plan, held: set[str], masking: str, scale: str) -> None:
    factor = plan.world_size / plan.k
    for path, info in units.blocks.items():
        block = get_module(model, path)
        if path not in held:
            if masking == "forward":
                model.set_submodule(path, info.dropped_module(block))
            else:
                for name, p in block.named_parameters():
                    if not info.is_shortcut_key(name):
                        p.requires_grad_(False)
        elif masking == "forward" and scale == "inverse-coverage" and factor != 1:
            model.set_submodule(path, info.scaled_module(block, factor))


def _cut_site(model: nn.Module, site: NeuronSite, held_units: set[str], masking: str,
              scale: str) -> dict[tuple[str, str], HeldSlice]:
    held = [g for g in range(len(site.groups)) if site.unit_name(g) in held_units]
    spans, offset = {}, 0
    for g in held:
        a, b = site.groups[g]
        spans[g] = (offset, b - a)
        offset += b - a
    held_hidden = offset
    out: dict[tuple[str, str], HeldSlice] = {}
    for spec in site.slices:
        module = get_module(model, spec.module)
        tensor = getattr(module, spec.tensor)
        is_param = isinstance(tensor, nn.Parameter)
        if masking == "backward" and not is_param:
            continue  # buffers stay whole: the full forward updates them all
        # segment-major (a fused q/k/v keeps its held q heads, then k, then v), as local_ranges reads it
        ranges = [spec.full_ranges(tensor.shape[spec.dim], *site.groups[g]) for g in held]
        index = torch.cat([torch.arange(*r[s]) for s in range(spec.segments) for r in ranges]
                          or [torch.empty(0, dtype=torch.long)]).to(tensor.device)
        local = tensor.detach().index_select(spec.dim, index).clone()
        out[(spec.module, spec.tensor)] = HeldSlice(spec, spans, index)
        if masking == "forward":
            if is_param:
                tensor.data, tensor.grad = local, None  # the same Parameter object: an optimizer built
                # before wrapping still trains it
            else:
                module._buffers[spec.tensor] = local
            refresh_shape_attributes(module)
        else:
            _split_for_backward(module, spec.tensor, tensor, local, spec.dim, index)
    if masking == "forward":
        for attr, value in site.head_attrs.items():  # "num_heads", or "self.all_head_size" (BERT)
            owner, _, name = attr.rpartition(".")
            setattr(get_module(model, f"{site.path}.{owner}" if owner else site.path), name,
                    value // site.hidden * held_hidden)
        if scale == "inverse-coverage" and 0 < held_hidden < site.hidden:
            factor = site.hidden / held_hidden
            get_module(model, site.output).register_forward_pre_hook(lambda m, args, f=factor: (args[0] * f, *args[1:]))
    return out


def _split_for_backward(module: nn.Module, name: str, param: nn.Parameter, held: torch.Tensor,
                        dim: int, index: torch.Tensor) -> None:
    """Backward masking of a neuron-sliced parameter: a trainable held slice (the same Parameter
    object, so an optimizer built before wrapping trains it) plus a frozen full copy, persistent so
    that a checkpoint of the subnetwork resumes exactly; a pre-forward hook assembles the tensor the
    forward uses (gradient reaches the held slice only). Hooks rather than
    torch.nn.utils.parametrize: parametrize renames the state-dict key of the original tensor and
    recomputes it on every attribute access."""
    del module._parameters[name]
    module.register_buffer(name + FULL, param.detach().clone())
    param.data = held
    module.register_parameter(name + HELD, param)
    object.__setattr__(module, name, getattr(module, name + FULL))

    def assemble(m: nn.Module, args: tuple) -> None:
        object.__setattr__(m, name, getattr(m, name + FULL).index_copy(dim, index, getattr(m, name + HELD)))

    def release(m: nn.Module, args: tuple, out: Any) -> None:
        object.__setattr__(m, name, getattr(m, name + FULL))

    module.register_forward_pre_hook(assemble)
    module.register_forward_hook(release)


def _split(key: str) -> tuple[str, str]:
    module, _, name = key.rpartition(".")
    return module, name


def meta_copy(block: nn.Module) -> nn.Module:
    """A copy of ``block`` whose parameters and persistent buffers are on the meta device (nothing
    allocated); non-persistent buffers (rotary tables, masks) are real copies, since a state dict
    cannot restore them."""
    memo: dict[int, object] = {}
    for module in block.modules():
        for name, p in module._parameters.items():
            if p is not None:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(block, memo)
