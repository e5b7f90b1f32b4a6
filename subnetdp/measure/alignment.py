"""Gradient alignment: how closely the update SDP applies follows the full model's (DDP) gradient.

The paper explains why block-level SDP works by gradient alignment. At one model state and one
batch per worker this module measures the cosine similarity between

- ``g_DDP``: the full model's gradient averaged over the N workers' batches (what DDP applies);
  each worker's gradient is computed on its own batch alone (BatchNorm uses that batch's
  statistics, as DDP does), then the N are averaged;
- ``g_SDP``: what SDP applies: each worker computes the gradient of its subnetwork on its own batch
  (forward masking: the cut model; backward masking: the full forward, gradients for held units
  only), each parameter's gradient is averaged over the workers that hold it (shared parameters
  over all N), and the result is placed back into the full parameter space (zero where nobody
  holds an entry; with k >= 1 holders per unit that does not happen).

    from subnetdp.measure.alignment import gradient_alignment
    batches = [next_batch(rank) for rank in range(4)]          # worker i's (x, y)
    gradient_alignment(model, batches, F.cross_entropy, level="block", masking="forward",
                       coverage=0.5, blocks="blocks")
    # {'cosine': 0.93, 'cosine_shared': 0.99, 'cosine_units': 0.88, 'norm_ratio': 0.91, ...}

How ``g_SDP`` is computed: with the engine's own code path, so the averaging is exactly that of
training. A :class:`~subnetdp.engine.SubnetworkSimulator` with N virtual workers runs one backward
per worker and ``sync_gradients()``; then every held parameter's averaged gradient is written into
its value (zero where it has none) and ``full_state_dict()`` assembles the full model from each
unit's first holder: that assembly *is* the averaged gradient in the full model's keys and shapes.
Under neuron-level backward masking a sliced weight is a trainable held slice plus a frozen rest
(a buffer); the assembly reads each neuron group from its holder's trainable slice only, so the
frozen weights never enter the "gradient" (tests/measure/test_alignment.py checks all four
variants against gradients computed by hand, without the engine's masking).

Shared versus unit parameters: from the engine's layout pieces (``worker.layout.pieces``), each entry of
the full parameter space belongs to a piece that is either shared (``piece.unit is None``: stem,
embeddings, shortcuts, norms outside the neuron sites, head; averaged over all N workers) or part
of a unit (a block's parameters, or a neuron group's rows/columns). The split is structural, so at
C = 1 (every unit held by all N) units are still counted as units. A parameter tensor can be split
between the two (none of the recognised neuron patterns does it, but it is handled entry-wise).

Several micro-batches per worker: ``batches[i]`` may be a *list* of (x, y) tuples; each worker then
accumulates the gradient of the mean loss over its micro-batches (gradient accumulation), for
``g_DDP`` and ``g_SDP`` alike. That measures the alignment of a larger batch's gradient, with less
sampling noise, at the same BatchNorm batch size.

Dropout: every worker's forward runs under the same seeded RNG state in both computations, so at
C = 1 the two match even with dropout; at C < 1 forward-masked subnetworks draw different masks.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..engine import SubnetworkSimulator

Batch = tuple[Any, Tensor]
LossFn = Callable[[Any, Tensor], Tensor]


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _micro_batches(batch: Any) -> list[Batch]:
    """A worker's batch: one (x, y) tuple, or a list of them (accumulated)."""
    if isinstance(batch, list):
        if not batch:
            raise ValueError("a worker's list of micro-batches is empty")
        return [tuple(b) for b in batch]  # type: ignore[misc]
    return [tuple(batch)]  # type: ignore[list-item]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _seeded(seed: int, worker: int, micro: int, device: torch.device) -> Iterator[None]:
    """The same RNG state for worker ``worker``'s micro-batch in both computations (dropout)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + worker * 10_007 + micro) % (2 ** 63))
        yield


def _forward(module: nn.Module, x: Any) -> Any:
    if isinstance(x, Mapping):
        return module(**x)
    return module(x)


def _backward_worker(module: nn.Module, batch: Any, loss_fn: LossFn, scale: float, seed: int, worker: int,
                     device: torch.device) -> float:
    """Accumulate ``scale`` x (mean loss over the worker's micro-batches) into ``module``'s grads."""
    micro = _micro_batches(batch)
    total = 0.0
    for j, (x, y) in enumerate(micro):
        with _seeded(seed, worker, j, device):
            loss = loss_fn(_forward(module, _to(x, device)), _to(y, device))
        (loss * (scale / len(micro))).backward()
        total += loss.item()
    return total / len(micro)


def ddp_gradient(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn, seed: int = 0
                 ) -> tuple[dict[str, Tensor], float]:
    """``g_DDP``: the mean over workers of the full model's gradient on each worker's batch (each
    batch forwarded on its own, in train mode), by parameter name; and the mean loss.
    ``model`` is not changed (a deep copy is used)."""
    ref = copy.deepcopy(model).train()
    ref.zero_grad(set_to_none=True)
    device, n = _device(ref), len(batches)
    losses = [_backward_worker(ref, b, loss_fn, 1.0 / n, seed, i, device) for i, b in enumerate(batches)]
    grads = {name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for name, p in ref.named_parameters() if p.requires_grad}
    return grads, sum(losses) / n


def _simulator(model: nn.Module, workers: int, *, level: str, masking: str, coverage: float, blocks: Any,
               seed: int, neuron_groups: int | None, example_input: Any, scale: str) -> SubnetworkSimulator:
    if level not in ("block", "neuron"):
        raise ValueError(f"level must be 'block' or 'neuron', got {level!r}")
    where = {"blocks" if level == "block" else "neurons": blocks}
    return SubnetworkSimulator(model, workers, **where, coverage=coverage, masking=masking, seed=seed,
                               scale=scale, neuron_groups=neuron_groups, example_input=example_input)


def sdp_gradient(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn, *, level: str, masking: str,
                 coverage: float, blocks: Any, seed: int = 0, neuron_groups: int | None = None,
                 example_input: Any = None, scale: str = "none") -> dict[str, Any]:
    """``g_SDP`` in the full model's parameter names (see the module docstring), with masks.

    Returns a dict: ``grad`` (name -> tensor), ``held`` (name -> bool tensor: entries some worker
    holds), ``unit`` (name -> bool tensor: entries that belong to a unit, not shared), ``loss``
    (mean subnetwork loss over the workers) and ``k`` (holders per unit).
    ``model`` is not changed (the simulator cuts deep copies)."""
    n = len(batches)
    sim = _simulator(model, n, level=level, masking=masking, coverage=coverage, blocks=blocks, seed=seed,
                     neuron_groups=neuron_groups, example_input=example_input, scale=scale)
    device = _device(model)
    losses = []
    for i, (worker, batch) in enumerate(zip(sim.workers, batches)):
        worker.train()
        worker.zero_grad(set_to_none=True)
        losses.append(_backward_worker(worker, batch, loss_fn, 1.0, seed, i, device))
    sim.sync_gradients()
    with torch.no_grad():
        for worker in sim.workers:
            for p in worker.module.parameters():  # frozen copies too: they are never assembled
                if p.grad is None:
                    p.zero_()
                else:
                    p.copy_(p.grad)
    assembled = sim.full_state_dict()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    held = {name: torch.zeros(assembled[name].shape, dtype=torch.bool) for name in names}
    unit = {name: torch.zeros(assembled[name].shape, dtype=torch.bool) for name in names}
    for piece in sim.workers[0].layout.pieces:
        if piece.key not in held or not piece.holders:
            continue
        # a whole tensor, or a neuron group's rows/columns of it
        for h_part, u_part in zip(piece.of_full(held[piece.key]), piece.of_full(unit[piece.key])):
            h_part.fill_(True)
            if piece.unit is not None:
                u_part.fill_(True)
    grad = {name: torch.where(held[name], assembled[name], torch.zeros((), dtype=assembled[name].dtype))
            for name in names}
    return {"grad": grad, "held": held, "unit": unit, "loss": sum(losses) / n, "k": sim.plan.k}


def _flat(tensors: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.cat([tensors[name].detach().reshape(-1).double().cpu() for name in names]) if names \
        else torch.zeros(0, dtype=torch.float64)


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 or nb == 0:
        return math.nan
    return (a @ b).item() / (na * nb)


def _ratio(a: Tensor, b: Tensor) -> float:
    nb = b.norm().item()
    return a.norm().item() / nb if nb > 0 else math.nan


def compare(g_ddp: Mapping[str, Tensor], g_sdp: Mapping[str, Tensor], unit: Mapping[str, Tensor]
            ) -> dict[str, float]:
    """Cosine similarities and norm ratios of two gradients over all, shared and unit entries
    (NaN where a part is empty or has a zero gradient)."""
    names = [name for name in g_ddp if name in g_sdp]
    d, s = _flat(g_ddp, names), _flat(g_sdp, names)
    mask = torch.cat([unit[name].reshape(-1).cpu() for name in names]) if names else torch.zeros(0, dtype=torch.bool)
    return {
        "cosine": _cosine(s, d), "cosine_shared": _cosine(s[~mask], d[~mask]),
        "cosine_units": _cosine(s[mask], d[mask]),
        "norm_ratio": _ratio(s, d), "norm_ratio_shared": _ratio(s[~mask], d[~mask]),
        "norm_ratio_units": _ratio(s[mask], d[mask]),
        "norm_ddp": d.norm().item(), "norm_sdp": s.norm().item(),
        "unit_fraction": mask.double().mean().item() if mask.numel() else math.nan,
    }


def gradient_alignment(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn, *, level: str, masking: str,
                       coverage: float, blocks: Any, seed: int = 0, neuron_groups: int | None = None,
                       example_input: Any = None, scale: str = "none",
                       reference: tuple[dict[str, Tensor], float] | None = None) -> dict[str, float]:
    """Cosine similarity between ``g_SDP`` and ``g_DDP`` at ``model``'s current state.

    Args:
        model: the full model (not changed; BatchNorm-free or not, it runs in train mode).
        batches: ``batches[i]`` is worker i's batch, an (x, y) tuple (x may be a dict of keyword
            inputs), or a list of such tuples accumulated as micro-batches; N = len(batches).
        loss_fn: ``loss_fn(model(x), y)``, a scalar mean loss.
        level, masking, coverage, blocks, seed, neuron_groups, example_input, scale: the SDP
            variant, as :class:`~subnetdp.engine.SubnetworkDataParallel` takes them (``blocks`` is the
            block container, for either level; ``seed`` is the plan seed, and seeds dropout).
        reference: ``ddp_gradient(model, batches, loss_fn, seed)``'s result, when several variants
            are measured at the same state and batches (saves recomputing it).

    Returns: ``cosine``, ``cosine_shared``, ``cosine_units``, ``norm_ratio`` (|g_SDP| / |g_DDP|),
    the same ratio for shared and unit entries, both norms, ``unit_fraction`` (unit entries / all),
    ``loss_ddp``, ``loss_sdp`` (mean loss of the full model / of the subnetworks), ``workers``,
    ``coverage``, ``k`` (holders per unit) and ``effective_coverage`` (k / N).
    """
    g_ddp, loss_ddp = reference if reference is not None else ddp_gradient(model, batches, loss_fn, seed)
    sdp = sdp_gradient(model, batches, loss_fn, level=level, masking=masking, coverage=coverage, blocks=blocks,
                       seed=seed, neuron_groups=neuron_groups, example_input=example_input, scale=scale)
    n = len(batches)
    return {**compare(g_ddp, sdp["grad"], sdp["unit"]), "loss_ddp": loss_ddp, "loss_sdp": sdp["loss"],
            "workers": n, "coverage": float(coverage), "k": sdp["k"], "effective_coverage": sdp["k"] / n}
