"""One worker's subnetwork as a standalone plain model: a fresh instance of the model's own class,
built from constructor arguments (or a Hugging Face config), with the worker's weights loaded
strictly. Nothing of SDP remains in it.

    sub = standalone_subnetwork(sim.workers[2], example_input=x)    # or the wrapper on rank 2
    sub.model          # e.g. a subnetdp.models.ResNet with 5 blocks, or a LlamaForCausalLM with 6 layers
    sub.config         # what rebuilds it: the class and its arguments (families.py)

How the worker's cut model becomes a plain one (forward masking; under backward masking a
worker's forward runs the whole model, so its subnetwork is the whole model with its own norm
statistics):
- a block the worker does not hold is removed when its dropped form has no parameters (a plain
  residual block without them is the identity, or ``relu`` of a non-negative input), and the
  blocks after it move up; a dropped block with a projection shortcut keeps that shortcut;
- neuron groups are already sliced out of the worker's tensors. A class whose constructor takes
  one width for every layer (heads, MLP neurons) gets the widest layer's width, the other layers
  zero-padded: a zero unit adds exactly zero to its layer's output, but it is counted in the
  parameters and FLOPs (``padded_units`` says how many);
- train-time scaling (``scale="inverse-coverage"``) is folded into the weights.
With ``example_input`` the plain model's output is compared with the worker's own on it, and a
difference is an error: the export computes what the worker computed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.errors import SDPConfigError
from ..engine.evaluation import fold_residual_scale
from ..engine.subnetwork import Subnetwork
from ..engine.units import get_module
from .families import Family, family_of


@dataclass(frozen=True)
class BlockEntry:
    """A block of the full model as the standalone model has it."""

    source: str   # its path in the full model
    target: str   # its path in the standalone model
    kind: str     # "block": held, whole | "shortcut": not held, only its projection shortcut kept


@dataclass
class Standalone:
    """A plain model and what it is: ``config`` rebuilds it (families.py)."""

    model: nn.Module
    family: Family
    config: dict[str, Any]
    rank: int | None = None
    blocks: list[BlockEntry] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)        # blocks of the full model not in it
    padded_units: dict[str, int] = field(default_factory=dict)  # neuron site -> zero units added
    max_abs_difference: float | None = None                 # against the worker's output (example_input)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _state(worker: Subnetwork) -> dict[str, torch.Tensor]:
    """The worker's own tensors under the full model's keys (its norm statistics included)."""
    if worker.masking == "backward":
        return {k: v.detach().clone() for k, v in worker.local_full_state_dict().items()}
    with worker.gathered():
        return {k: v.detach().clone() for k, v in worker.module.state_dict().items()}


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def block_entries(worker: Subnetwork) -> tuple[list[BlockEntry], list[str]]:
    """Which blocks the standalone model keeps (renumbered within their container) and which it drops."""
    units = worker.units
    if units.level != "block" or worker.masking == "backward":
        return [], []
    held = set(worker.held_units)
    kept: list[tuple[str, str]] = []
    removed: list[str] = []
    for path in units.blocks:
        if path in held:
            kept.append((path, "block"))
        elif _has_state(get_module(worker.module, path)):
            kept.append((path, "shortcut"))
        else:
            removed.append(path)
    counters: dict[str, int] = defaultdict(int)
    entries = []
    for path, kind in kept:
        parent, _, name = path.rpartition(".")
        if not name.isdigit():  # a block that is an attribute, not an element of a list: keeps its name
            entries.append(BlockEntry(path, path, kind))
            continue
        entries.append(BlockEntry(path, f"{parent}.{counters[parent]}" if parent else str(counters[parent]), kind))
        counters[parent] += 1
    for path in removed:
        if not path.rpartition(".")[2].isdigit():
            raise SDPConfigError(f"block {path!r} is an attribute of its parent, not an element of a list: it cannot "
                                 "be removed from a standalone model")
    return entries, removed


def _renamed(state: dict[str, torch.Tensor], entries: list[BlockEntry], removed: list[str]) -> dict[str, torch.Tensor]:
    moves = {e.source + ".": e.target + "." for e in entries}
    gone = tuple(p + "." for p in removed)
    out = {}
    for key, value in state.items():
        if key.startswith(gone):
            continue
        for source, target in moves.items():
            if key.startswith(source):
                key = target + key[len(source):]
                break
        out[key] = value
    return out


def _held_width(state: dict[str, torch.Tensor], site: Any) -> int:
    spec = site.slices[0]
    return state[f"{spec.module}.{spec.tensor}"].shape[spec.dim] // spec.segments // spec.unit_width


def site_widths(state: dict[str, torch.Tensor], sites: list[Any]) -> dict[str, tuple[str, int, int]]:
    """Each place's (pattern, held hidden units, heads per unit) where the sites there hold fewer
    hidden units than the full model (the widest site's, after ``pad_sites``)."""
    out: dict[str, tuple[str, int, int]] = {}
    for site in sites:
        width = _held_width(state, site)
        place = site.path[len(site.block) + 1:]
        if width < site.hidden and width >= out.get(place, ("", 0, 0))[1]:
            out[place] = (site.pattern, width, site.heads_per_unit)
    return out


def pad_sites(state: dict[str, torch.Tensor], sites: list[Any]) -> dict[str, int]:
    """Zero-pad every neuron site to the widest of the sites at the same place in their blocks
    ("attn", "mlp"), in place; returns the zero units added per site. A zero unit's output
    projection entries are zero, so it adds exactly zero to the layer's output."""
    by_place: dict[str, list[Any]] = defaultdict(list)
    for site in sites:
        by_place[site.path[len(site.block) + 1:]].append(site)
    padded = {}
    for group in by_place.values():
        widths = {site.path: _held_width(state, site) for site in group}
        target = max(1, max(widths.values()))  # a site no worker layer holds anything of keeps one zero unit
        for site in group:
            missing = target - widths[site.path]
            if not missing:
                continue
            padded[site.path] = missing
            for spec in site.slices:
                key = f"{spec.module}.{spec.tensor}"
                tensor = state[key]
                parts = tensor.split(tensor.shape[spec.dim] // spec.segments, dim=spec.dim) if tensor.numel() else \
                    [tensor.narrow(spec.dim, 0, 0)] * spec.segments
                shape = list(tensor.shape)
                shape[spec.dim] = missing * spec.unit_width
                zeros = tensor.new_zeros(shape)
                state[key] = torch.cat([t for part in parts for t in (part, zeros)], dim=spec.dim)
    return padded


def _fold_train_scale(worker: Subnetwork, model: nn.Module, entries: list[BlockEntry]) -> None:
    """``scale="inverse-coverage"``: the worker's forward multiplies held blocks' branches by N/k
    (block level) or each sliced layer's output by hidden/held (neuron level); fold it in."""
    if worker.scale != "inverse-coverage" or worker.masking != "forward":
        return
    if worker.units.level == "block":
        factor = worker.world_size / worker.plan.k
        held = [e.target for e in entries if e.kind == "block"]
        if held and factor != 1:
            fold_residual_scale(model, held, factor)
        return
    with torch.no_grad():
        for site in worker.units.sites:
            spec = site.slices[0]
            width = worker.layout.sliced[(spec.module, spec.tensor)].index.numel() // spec.segments // spec.unit_width
            if 0 < width < site.hidden:
                weight = get_module(model, site.output).weight
                assert isinstance(weight, torch.Tensor)
                weight.mul_(site.hidden / width)  # scaling a Linear's input is scaling its weight


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def standalone_subnetwork(worker: Subnetwork, example_input: Any = None, atol: float = 1e-4) -> Standalone:
    """Worker ``worker.rank``'s subnetwork as a fresh plain model of its class (``worker`` is a
    ``Subnetwork``: ``SubnetworkDataParallel`` on its rank, or ``simulator.workers[r]``). With
    ``example_input``, both compute it in eval mode and a maximum difference over ``atol`` (relative
    to the output's scale) raises SDPConfigError."""
    family = family_of(worker.module)
    entries, removed = block_entries(worker)
    if removed and not any(e.kind == "block" for e in entries):
        raise SDPConfigError(f"worker {worker.rank} holds no blocks (a plan of per-worker coverage or memory budgets "
                             "can give one none): its subnetwork would be the shared layers alone")
    state = _renamed(_state(worker), entries, removed)
    forward = worker.masking == "forward"
    padded = pad_sites(state, worker.units.sites) if family.uniform_widths and forward else {}
    model, config = family.build(worker, state, entries, site_widths(state, worker.units.sites) if forward else {})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SDPConfigError(f"the standalone {type(model).__name__} does not match the subnetwork's tensors: "
                             f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    _fold_train_scale(worker, model, entries)
    model.to(worker.device).eval()
    result = Standalone(model, family, config, worker.rank, entries, removed, padded)
    if example_input is not None:
        result.max_abs_difference = compare(worker, model, example_input, atol)
    return result


@torch.no_grad()
def compare(worker: Subnetwork, model: nn.Module, example_input: Any, atol: float = 1e-4) -> float:
    """The largest difference between the worker's and ``model``'s outputs on ``example_input``
    (eval mode); SDPConfigError above ``atol`` times the output's largest magnitude (at least 1)."""
    was_training = worker.module.training
    worker.module.eval()
    try:
        with worker.gathered():
            expected = _logits(worker.module(example_input)).float()
    finally:
        worker.module.train(was_training)
    got = _logits(model(example_input)).float()
    if got.shape != expected.shape:
        raise SDPConfigError(f"the standalone model's output has shape {tuple(got.shape)}, the subnetwork's "
                             f"{tuple(expected.shape)}")
    difference = (got - expected).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    if not difference <= atol * scale:
        raise SDPConfigError(f"the standalone {type(model).__name__} of worker {worker.rank} computes something else "
                             f"than the subnetwork: largest difference {difference:.3g} on the example input")
    return difference
