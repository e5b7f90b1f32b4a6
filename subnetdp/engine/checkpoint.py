"""Checkpoints through ``torch.distributed.checkpoint`` (DCP): each worker writes the pieces it
holds as chunks of the full model's tensors; a load under any plan, worker count or coverage reads
only the chunks each worker holds. No process ever holds the whole model unless it asks for it.

    from subnetdp.engine import checkpoint as sdp_checkpoint
    sdp_checkpoint.save("ckpt/step-400", sdp, optimizer)        # collective, every rank
    sdp_checkpoint.load("ckpt/step-400", sdp, optimizer)        # any N, coverage or plan

With your own DCP code (torchtitan-style), as with ``torch.distributed.checkpoint.state_dict``:

    state = {"model": get_model_state_dict(sdp), "optim": get_optimizer_state_dict(sdp, optimizer)}
    dcp.save(state, checkpoint_id=path, planner=SavePlanner())
    state = {"model": get_model_state_dict(sdp), "optim": get_optimizer_state_dict(sdp, optimizer)}
    dcp.load(state, checkpoint_id=path, planner=LoadPlanner())
    set_model_state_dict(sdp, state["model"]); set_optimizer_state_dict(sdp, optimizer, state["optim"])

A piece (``layout.py``) is a whole tensor or a set of ranges of one dim of a tensor; each range is
one DCP chunk (:class:`ChunkedTensor`) of the full tensor, keyed by the plain model's state_dict
key. Several holders offer the same chunk; DCP writes it once. Norm running statistics are saved
averaged over their holders (as ``full_state_dict`` assembles them), and each worker's own copy
beside them under its plan's fingerprint, so a resume under the same plan is exact. Optimizer
states shaped like their parameter are chunked the same way (``optim.state.KEY.NAME``); scalar
states (Adam's ``step``) are saved once. With ``shard=True`` the flat shards' state is gathered
within each holder set into the parameters' shapes first (the worker's own subnetwork only).
Learning rates and other hyperparameters are not saved: restore your schedule's state.
The plain full model (``subnetdp export``) loads from the same files with DCP's own planner.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from . import assembly, sharding
from .errors import CollectiveError, SDPConfigError
from .layout import Piece
from .simulator import SubnetworkSimulator
from .subnetwork import Subnetwork
from .wrapper import SubnetworkDataParallel

Model = SubnetworkDataParallel | SubnetworkSimulator
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]
OWN_BUFFERS = "sdp_own_buffers"  # the prefix of each worker's own running statistics


@dataclasses.dataclass
class ChunkedTensor:
    """What this process holds of one full-model tensor: chunks at offsets of the full tensor."""

    full_size: torch.Size
    chunks: list[tuple[torch.Size, torch.Tensor]]  # (offsets in the full tensor, local tensor)
    # chunks this process loads but does not save: copies that are not its own (backward
    # masking keeps whole copies of units it does not hold; their holders save them)
    load_only: set[torch.Size] = dataclasses.field(default_factory=set)

    def size(self) -> torch.Size:  # DCP compares it with the saved tensor's size
        return self.full_size

    def chunk(self, index: MetadataIndex) -> torch.Tensor:
        if index.index is not None and index.index < len(self.chunks) and self.chunks[index.index][0] == index.offset:
            return self.chunks[index.index][1]
        for offsets, tensor in self.chunks:
            if offsets == index.offset:
                return tensor
        raise ValueError(f"{index.fqn}: no local chunk at offsets {tuple(index.offset or ())}")

    def storage_chunks(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=o, sizes=t.size()) for o, t in self.chunks]


class SavePlanner(DefaultSavePlanner):
    """DCP's default save planner, plus :class:`ChunkedTensor` values: one shard per chunk."""

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = [i for i in plan.items if not isinstance(self.state_dict.get(i.index.fqn), ChunkedTensor)]
        for fqn, value in self.state_dict.items():
            if isinstance(value, ChunkedTensor):
                items += [WriteItem(index=MetadataIndex(fqn, offsets, n), type=WriteItemType.SHARD,
                                    tensor_data=TensorWriteData(
                                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=tensor.size()),
                                        properties=TensorProperties.create_from_tensor(tensor), size=value.full_size))
                          for n, (offsets, tensor) in enumerate(value.chunks) if offsets not in value.load_only]
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        value = self.state_dict.get(index.fqn)
        if isinstance(value, ChunkedTensor):
            return value.chunk(index).detach()
        return super().lookup_object(index)


class LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, plus :class:`ChunkedTensor` values (each chunk reads only the
    saved chunks it overlaps), and per-worker running statistics that are loaded only where the
    checkpoint was written under the same plan (they are dropped from the state dict otherwise)."""

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False) -> None:
        # DCP's set-up maps every value it does not know to None: hide ours from it
        hidden = _take_chunked(state_dict, ())
        super().set_up_planner(state_dict, metadata, is_coordinator)
        fqns = {tuple(path): fqn for fqn, path in self.mappings.items()} if self.flatten_state_dict else {}
        for path, value in hidden:
            _set_path(state_dict, path, value)
            self.state_dict[fqns.get(path, ".".join(map(str, path)))] = value

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        saved = self.metadata.state_dict_metadata
        for fqn in [k for k in self.state_dict if OWN_BUFFERS in k and k not in saved]:
            del self.state_dict[fqn]
            _pop_path(self.original_state_dict, self.mappings[fqn] if self.flatten_state_dict else (fqn,))
        chunked = {k: v for k, v in self.state_dict.items() if isinstance(v, ChunkedTensor)}
        plan = create_default_local_load_plan({k: v for k, v in self.state_dict.items() if k not in chunked},
                                              self.metadata, not self.allow_partial_load)
        items: list[ReadItem] = list(plan.items)
        for fqn, value in chunked.items():
            md = saved.get(fqn)
            if not isinstance(md, TensorStorageMetadata):
                raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")
            if md.size != value.full_size:
                raise ValueError(f"Size mismatch between saved {md.size} and current: {value.full_size} for {fqn}")
            items += create_read_items_for_chunk_list(fqn, md, value.storage_chunks())
        return dataclasses.replace(plan, items=items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        value = self.state_dict.get(index.fqn)
        if isinstance(value, ChunkedTensor):
            return value.chunk(index)
        return super().lookup_tensor(index)


def _take_chunked(tree: dict[str, Any], prefix: tuple[str, ...]) -> list[tuple[tuple[str, ...], ChunkedTensor]]:
    """Every ChunkedTensor in a nested dict as (path, value), each replaced by None meanwhile."""
    found: list[tuple[tuple[str, ...], ChunkedTensor]] = []
    for key, value in tree.items():
        if isinstance(value, ChunkedTensor):
            found.append(((*prefix, key), value))
            tree[key] = None
        elif isinstance(value, dict):
            found += _take_chunked(value, (*prefix, key))
    return found


def _set_path(tree: dict[str, Any], path: Sequence[Any], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _pop_path(tree: dict[str, Any], path: Sequence[Any]) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree.pop(path[-1], None)


# ---------------------------------------------------------------------------------------------
# the state dicts


def _workers(model: Model) -> list[Subnetwork]:
    if isinstance(model, SubnetworkSimulator):
        return list(model.workers)
    if isinstance(model, SubnetworkDataParallel):
        return [model]
    raise SDPConfigError(f"expected a SubnetworkDataParallel or a SubnetworkSimulator, got {type(model).__name__}")


def _optimizers(model: Model, optimizers: Optimizers) -> dict[int, torch.optim.Optimizer]:
    workers = _workers(model)
    given = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    if len(given) != len(workers):
        raise SDPConfigError(f"{len(given)} optimizer(s) for {len(workers)} local worker(s): pass one per worker")
    return {w.rank: o for w, o in zip(workers, given)}


def _chunks(piece: Piece, views: list[torch.Tensor], full: torch.Size) -> list[tuple[torch.Size, torch.Tensor]]:
    """The piece's local views as (offsets in the full tensor, view), one per range; detached, so
    that DCP may write into them outside ``no_grad``."""
    views = [v.detach() for v in views]
    if piece.spec is None:
        return [(torch.Size([0] * len(full)), views[0])]
    out = []
    for (start, _), view in zip(piece.full_ranges, views):
        offsets = [0] * len(full)
        offsets[piece.spec.dim] = start
        out.append((torch.Size(offsets), view))
    return out


def _add(out: dict[str, Any], key: str, full: torch.Size, chunks: list[tuple[torch.Size, torch.Tensor]],
         own: bool = True) -> None:
    """Add chunks to ``out[key]``, once per offset (several local workers may hold the same piece);
    not ``own``: a copy this worker loads but leaves to the piece's holders to save."""
    if not full:  # a 0-dim tensor (a BatchNorm's num_batches_tracked) is one plain tensor
        if own or key not in out:
            out[key] = chunks[0][1]
        return
    entry = out.setdefault(key, ChunkedTensor(full, []))
    index = {offsets: n for n, (offsets, _) in enumerate(entry.chunks)}
    for offsets, tensor in chunks:
        if offsets not in index:
            entry.chunks.append((offsets, tensor))
            if not own:
                entry.load_only.add(offsets)
        elif own and offsets in entry.load_only:
            entry.chunks[index[offsets]] = (offsets, tensor)
            entry.load_only.discard(offsets)


def _split(flat: torch.Tensor, piece: Piece) -> list[torch.Tensor]:
    """A piece's flat values (its ranges one after another) as one tensor per range."""
    whole = flat.view(piece.shape)
    if piece.spec is None:
        return [whole]
    return list(whole.split([b - a for a, b in piece.full_ranges], piece.spec.dim))


@torch.no_grad()
def get_model_state_dict(model: Model) -> dict[str, Any]:
    """This process's part of the full model, for ``dcp.save`` or ``dcp.load`` with
    :class:`SavePlanner` / :class:`LoadPlanner` (collective: norm statistics are averaged over
    their holders). Parameters are views of the live tensors (copies of the shared weights under
    ``shard_shared_weights``, which are freed again): a DCP load writes straight into them;
    call :func:`set_model_state_dict` after it for the rest."""
    workers = _workers(model)
    if isinstance(model, SubnetworkDataParallel):
        model.sync_weights_if_stepped()  # the weights as the last step left them, on every holder
    for worker in workers:  # shard_shared_weights: gathered, copied below, freed again
        if worker.shared_weights is not None:
            worker.shared_weights.gather_all()
    freed = {id(s.tensor) for w in workers for shard in w.freed_shards for s in shard.bucket.segments}
    layouts = {w.rank: w.layout for w in workers}
    averaged = assembly.averaged_buffers(layouts, _exchange(model))
    out: dict[str, Any] = {}
    for worker in workers:
        layout = worker.layout
        own: list[torch.Tensor] = []
        for piece in layout.pieces:
            location = layout.locate(piece)
            if location is None:
                continue
            views = location.views()
            if id(location.tensor) in freed:  # copies: the buffer is freed before the state is used
                views = [v.clone() for v in views]
            if (piece.key, piece.group) in averaged[worker.rank]:
                own += views
                views = _split(averaged[worker.rank][(piece.key, piece.group)].clone(), piece)
            full = layout.full_shapes[piece.key]
            _add(out, piece.key, full, _chunks(piece, views, full), own=worker.rank in piece.holders)
        if own:
            out[f"{OWN_BUFFERS}.{worker.plan.fingerprint()[:16]}.{worker.rank}"] = \
                torch.cat([v.reshape(-1) for v in own]).clone()
    for worker in workers:
        if worker.shared_weights is not None:
            worker.shared_weights.free_all()
    return out


@torch.no_grad()
def set_model_state_dict(model: Model, state: Mapping[str, Any]) -> None:
    """After a DCP load into :func:`get_model_state_dict`'s dict: every local copy of each piece
    takes the loaded values (local, no communication); where the checkpoint was written under this
    plan, each worker's own running statistics are restored too."""
    for worker in _workers(model):
        worker.allocate_freed_weights()  # shard_shared_weights: written below, then this worker's part kept
    for worker in _workers(model):
        layout = worker.layout
        own = state.get(f"{OWN_BUFFERS}.{worker.plan.fingerprint()[:16]}.{worker.rank}")
        own_views: list[torch.Tensor] = []
        for piece in layout.pieces:
            location = layout.locate(piece)
            if location is None:
                continue
            full = layout.full_shapes[piece.key]
            if piece.key not in state:
                raise SDPConfigError(f"the state dict has no {piece.key!r}: it was not made by get_model_state_dict")
            value = state[piece.key]
            for offsets, view in _chunks(piece, location.views(), full):
                source = value.chunk(MetadataIndex(piece.key, offsets)) if isinstance(value, ChunkedTensor) else value
                if source.data_ptr() != view.data_ptr() or source.device != view.device:
                    view.copy_(source)
            if not piece.is_param and piece.dtype.is_floating_point and worker.rank in piece.holders:
                own_views += location.views()
        if own is not None:
            assembly.unflatten_into(own.to(layout.device), own_views)
    for worker in _workers(model):  # after every copy: a loaded value may live in another worker's tensor
        worker.weights_loaded()


def _exchange(model: Model) -> Any:
    return model.exchange


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create an optimizer's per-parameter state where it has none (it never stepped), by a step
    that changes nothing: zero gradients at learning rate 0, as torch.distributed.checkpoint does."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [p for p in params if not optimizer.state.get(p)]
    if not missing:
        return
    grads = {p: p.grad for p in params}
    rates = [g["lr"] for g in optimizer.param_groups]
    for p in params:  # only the parameters without state step (a None gradient is skipped), so the
        p.grad = torch.zeros_like(p) if not optimizer.state.get(p) else None  # others keep theirs
    for g in optimizer.param_groups:
        g["lr"] = 0.0 if not torch.is_tensor(g["lr"]) else torch.zeros_like(g["lr"])
    try:
        with torch.no_grad():
            optimizer.step()
    finally:
        for g, rate in zip(optimizer.param_groups, rates):
            g["lr"] = rate
        for p, grad in grads.items():
            p.grad = grad


@torch.no_grad()
def get_optimizer_state_dict(model: Model, optimizers: Optimizers) -> dict[str, Any]:
    """This process's part of the full model's optimizer state (``optimizers``: one per local
    worker, over ``parameters()``), for ``dcp.save``/``dcp.load`` with our planners; then
    :func:`set_optimizer_state_dict`. Collective (sharded state is gathered within holder sets)."""
    workers, by_rank = _workers(model), _optimizers(model, optimizers)
    if isinstance(model, SubnetworkSimulator):  # every virtual worker steps once, together
        for optimizer in by_rank.values():
            _init_optimizer_state(optimizer)
    else:
        _init_optimizer_state(by_rank[model.rank])
    # the state per parameter: the optimizers' own, or (sharded) gathered within each holder set
    holders: Mapping[int, Any] = by_rank if not workers[0].sharded else sharding.unsharded_state(
        {w.rank: w.buckets for w in workers}, by_rank, {w.rank: list(w.trained_parameters()) for w in workers},
        _exchange(model))
    layouts = {w.rank: w.layout for w in workers}
    names, scalars = assembly.state_names(layouts, holders)
    state: dict[str, dict[str, Any]] = {}
    for worker in workers:
        layout, holder = worker.layout, holders[worker.rank]
        for piece in layout.pieces:
            location = layout.trainable(piece)
            if location is None or location.tensor not in holder.state:
                continue
            full = layout.full_shapes[piece.key]
            for name in names:
                values = holder.state[location.tensor][name]
                _add(state.setdefault(piece.key, {}), name, full, _chunks(piece, location.views(values), full))
    return {"state": state, "scalars": scalars}


@torch.no_grad()
def set_optimizer_state_dict(model: Model, optimizers: Optimizers, state: Mapping[str, Any]) -> None:
    """After a DCP load into :func:`get_optimizer_state_dict`'s dict: each local optimizer takes
    the state of the pieces its worker trains (sharded: cut into its shards). Local."""
    workers, by_rank = _workers(model), _optimizers(model, optimizers)
    for worker in workers:
        optimizer = by_rank[worker.rank]
        holder = sharding.UnshardedState(list(worker.trained_parameters())) if worker.sharded else optimizer
        layout = worker.layout
        for piece in layout.pieces:
            location = layout.trainable(piece)
            if location is None or piece.key not in state["state"]:
                continue
            full = layout.full_shapes[piece.key]
            per_param = holder.state[location.tensor]
            for name, value in state["state"][piece.key].items():
                if name not in per_param:
                    per_param[name] = torch.zeros_like(location.tensor)
                for offsets, view in _chunks(piece, location.views(per_param[name]), full):
                    source = value.chunk(MetadataIndex(f"{piece.key}.{name}", offsets))
                    if source.data_ptr() != view.data_ptr():
                        view.copy_(source)
            for name, value in state["scalars"].items():
                per_param[name] = value.clone() if torch.is_tensor(value) else value
        if worker.sharded:
            sharding.load_sharded_state(worker.buckets, optimizer, holder)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# save and load in one call


def _dcp(call: Any, state: dict[str, Any], path: str | Path, planner: Any, model: Model) -> None:
    if isinstance(model, SubnetworkSimulator):  # one process: no process group, on purpose
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            call(state, checkpoint_id=str(path), planner=planner, no_dist=True)
        return
    ex = model.exchange
    # every peer is there (within the wrapper's timeout, CollectiveError naming it otherwise):
    # DCP's own collectives wait for the process group's timeout, and raise the backend's error
    ex.all_reduce(ex.world, {ex.rank: torch.zeros(1, device=model.device)}, f"checkpoint {call.__name__}").wait()
    try:
        call(state, checkpoint_id=str(path), planner=planner, process_group=ex.parent)
    except Exception as exc:  # noqa: BLE001 - a peer lost inside DCP is the same error as anywhere else
        text = str(exc)
        if not any(s in text for s in ("Connection closed", "Connection reset", "Timed out", "timed out")):
            raise
        raise CollectiveError(f"rank {ex.rank}: checkpoint {call.__name__} (torch.distributed.checkpoint) over "
                              f"workers {list(ex.world)} failed or did not complete within "
                              f"{ex.timeout.total_seconds():g}s; a peer has probably died or is stuck. Backend said: "
                              f"{text.strip().splitlines()[-1]}") from exc


def save(path: str | Path, model: Model, optimizers: Optimizers | None = None,
         extra: Mapping[str, Any] | None = None) -> None:
    """Write the model (and optimizer state) into the folder ``path`` with DCP (collective).
    ``extra``: more entries (tensors or picklable objects) for the same checkpoint."""
    state: dict[str, Any] = {"model": get_model_state_dict(model), **(extra or {})}
    if optimizers is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizers)
    _dcp(dcp.save, state, path, SavePlanner(), model)


def load(path: str | Path, model: Model, optimizers: Optimizers | None = None) -> None:
    """Load a checkpoint written by :func:`save`, under any plan, worker count or coverage: each
    process reads only the chunks its workers hold (collective)."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizers is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizers)
    _dcp(dcp.load, state, path, LoadPlanner(), model)
    set_model_state_dict(model, state["model"])
    if optimizers is not None:
        set_optimizer_state_dict(model, optimizers, state["optim"])


def load_full_state_dict(path: str | Path, model: nn.Module) -> None:
    """Load a checkpoint's full model into a plain ``model`` in this process alone (``subnetdp
    export``): every chunk of every tensor is read."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(flatten_state_dict=False), no_dist=True)
