"""Sharding what holders replicate (ZeRO-2 inside each holder set): a bucket held by k > 1
workers is cut into k equal parts, one per holder. Its gradient is reduce-scattered (each holder
receives the average of its part only), the optimizer steps that part only (so each holder keeps
1/k of the bucket's optimizer state and, after backward, of its gradient), and the updated parts
are all-gathered back into every holder's weights. A reduce-scatter plus an all-gather put the
same bytes on the wire as the all-reduce they replace. Shared parameters are held by all N
workers, so their optimizer state is split N ways; single-holder buckets have nothing to shard
and their parameters are stepped as they are.

    sdp = SubnetworkDataParallel(model, blocks="model.layers", coverage=0.5, shard=True)
    opt = torch.optim.AdamW(sdp.parameters(), lr=3e-4)   # the shards (shard_parameters(), the same)
    loss_fn(sdp(x), y).backward(); opt.step(); opt.zero_grad()  # weights gathered after the step

A shard is a flat parameter of ``ceil(n / k)`` entries: holder i steps entries
``[i * size, (i + 1) * size)`` of the bucket (the last one padded with zeros). When the bucket
holds whole parameters (block level, shared parameters) they are re-pointed at one flat buffer
and the shard is a view of its part: the optimizer updates the weights in place and sharding adds
no memory for the weights. Neuron slices are strided, so there the shard is a copy, re-read from
the weights at every gradient sync (loading a state dict needs no extra call either way). The
optimizer must be elementwise (SGD, Adam, AdamW, ...): the shard boundary cuts through
parameters. Move the model to its device before wrapping: ``.to()`` afterwards would re-allocate
the parameters away from the flat buffers.

Deadlock freedom: the reduce-scatters are issued as the all-reduces were (the reducer's fixed
order), and a sharded bucket is finished mid-backward only once its collective has completed,
never by waiting. After the step, weights (and, for assembly, optimizer state) are gathered in one
global order, sorted holder sets then buckets, each rank running the subsequence of the sets it
belongs to: a rank waiting on one collective never waits on a peer that waits for it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence, cast

import torch
from torch import nn

from .exchange import Exchange
from .layout import flatten, unflatten_into
from .reducer import Bucket, HolderSet

Buckets = Mapping[HolderSet, list[Bucket]]


class Shard:
    """This worker's part of one bucket held by k > 1 workers."""

    def __init__(self, bucket: Bucket, rank: int, free_weights: bool = False) -> None:
        self.bucket = bucket
        self.holders = bucket.holders
        k = len(self.holders)
        self.numel = bucket.numel
        self.size = -(-self.numel // k)  # ceil: the last part is padded
        self.padding = self.size * k - self.numel
        self.start = self.holders.index(rank) * self.size
        device = bucket.segments[0].tensor.device
        self.weights: torch.Tensor | None = None  # the bucket's weights as one flat buffer, if they are
        self.frees_weights = False  # ZeRO-3: the buffer's storage is freed between uses
        if all(s.dim is None for s in bucket.segments):
            # whole parameters: they become views of one flat buffer and the shard a view of its
            # part, so the optimizer updates the weights in place and the shard costs no memory
            self.weights = torch.zeros(self.size * k, dtype=bucket.dtype, device=device)
            offset = 0
            with torch.no_grad():
                for s in bucket.segments:
                    n = s.tensor.numel()
                    self.weights[offset:offset + n].copy_(s.tensor.reshape(-1))
                    s.tensor.data = self.weights[offset:offset + n].view_as(s.tensor)
                    offset += n
            if free_weights:  # ZeRO-3 (shared_weights.py): the shard is its own tensor, the buffer is freed
                self.param = nn.Parameter(self.weights[self.start:self.start + self.size].clone())
                self.frees_weights = True
                self.free()
            else:
                self.param = nn.Parameter(self.weights[self.start:self.start + self.size])
        else:  # neuron slices are strided views: the shard is a copy, re-read at every sync
            self.param = nn.Parameter(torch.zeros(self.size, dtype=bucket.dtype, device=device))
            self.read_weights()

    # -- ZeRO-3 (``free_weights``): the flat buffer's storage comes and goes; the views on it stay
    @property
    def weights_storage_id(self) -> int:
        assert self.weights is not None
        return self.weights.untyped_storage()._cdata

    @property
    def gathered(self) -> bool:
        return self.weights is not None and self.weights.untyped_storage().nbytes() > 0

    def allocate(self) -> None:
        assert self.weights is not None
        self.weights.untyped_storage().resize_(self.weights.numel() * self.weights.element_size())

    def free(self) -> None:
        if self.frees_weights and self.weights is not None:
            self.weights.untyped_storage().resize_(0)

    def allocate_zeroed_padding(self) -> None:
        """Allocated for a local write of every entry (a load): the padding, which nothing writes,
        is zeroed so this worker's part never carries stale memory."""
        self.allocate()
        assert self.weights is not None
        with torch.no_grad():
            self.weights[self.numel:].zero_()

    @torch.no_grad()
    def keep_own_part(self) -> None:
        """After the whole buffer was written (a load): this worker's part becomes the shard."""
        assert self.weights is not None
        self.param.copy_(self.weights[self.start:self.start + self.size])

    @torch.no_grad()
    def read_weights(self) -> None:
        """The shard's values from the weights (identical on every holder); padding stays zero."""
        if self.weights is not None:
            return  # the shard is a view of the weights
        self.param.zero_()
        offset, end = 0, self.start + self.size
        for view in self.bucket.weight_views():
            lo, hi = max(offset, self.start), min(offset + view.numel(), end)
            if lo < hi:
                self.param[lo - self.start:hi - self.start].copy_(view.reshape(-1)[lo - offset:hi - offset])
            offset += view.numel()

    def take_gradient(self, averaged: torch.Tensor) -> None:
        """The averaged gradient of this part, from the reduce-scatter; the weights are re-read so
        the optimizer steps what the model holds (a state dict may have been loaded)."""
        self.param.grad = averaged
        self.read_weights()

    def gather_buffers(self) -> torch.Tensor:
        return torch.empty(self.size * len(self.holders), dtype=self.bucket.dtype, device=self.param.device)


def _shard_of(bucket: Bucket) -> Shard:
    """``bucket.shard`` as the ``Shard`` that :func:`make_shards` (its only setter) put there, for a
    bucket of a holder set of k > 1; reducer.py types it as its ``BucketShard`` protocol, optional."""
    return cast(Shard, bucket.shard)


def make_shards(buckets: Buckets, rank: int, freeable: set[int] | None = None) -> list[Shard]:
    """A shard for every bucket of ``rank`` held by more than one worker, in (holder set, bucket)
    order. ``freeable``: ids of whole parameters whose buffers may be freed between uses (ZeRO-3,
    shared_weights.py); a bucket's is freed when all its parameters are."""
    shards = []
    for holders in sorted(buckets):
        for bucket in buckets[holders]:
            if len(holders) > 1:
                free = freeable is not None and all(s.dim is None and id(s.tensor) in freeable
                                                    for s in bucket.segments)
                bucket.shard = Shard(bucket, rank, free_weights=free)
                shards.append(bucket.shard)
    return shards


def shard_parameters(buckets: Buckets, params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """What the optimizer steps: every shard, then the parameters of single-holder buckets (in
    ``params`` order). Every parameter is wholly in sharded buckets or wholly in single-holder ones:
    a tensor's pieces are all units (held by k) or it is shared (held by N)."""
    sharded = sharded_param_ids(buckets)
    shards = [b.shard.param for h in sorted(buckets) for b in buckets[h] if b.shard is not None]
    return shards + [p for p in params if id(p) not in sharded]


def sharded_param_ids(buckets: Buckets) -> set[int]:
    return {id(s.tensor) for bucket_list in buckets.values() for b in bucket_list if b.shard is not None
            for s in b.segments}


@torch.no_grad()
def gather_weights(buckets: Mapping[int, Buckets], exchange: Exchange) -> None:
    """After the optimizer step: every sharded bucket's updated parts, all-gathered into every
    holder's weights, in (holder set, bucket) order. Flat weights are gathered into in place, all
    buckets in flight at once (from a copy of each part: an input must not alias its output);
    neuron slices go through a buffer, one bucket at a time."""
    sets = sorted({h for per_worker in buckets.values() for h in per_worker if len(h) > 1})
    in_place = []
    for holders in sets:
        local = {r: per_worker[holders] for r, per_worker in buckets.items() if holders in per_worker}
        for i in range(len(next(iter(local.values())))):
            shards = {r: _shard_of(lists[i]) for r, lists in local.items()}
            if any(s.frees_weights for s in shards.values()):
                continue  # ZeRO-3: gathered just before its next use (shared_weights.py)
            if all(s.weights is not None for s in shards.values()):
                inputs = {r: s.param.detach().clone() for r, s in shards.items()}
                outputs = {r: cast(torch.Tensor, s.weights) for r, s in shards.items()}  # not None: checked above
                in_place.append(exchange.all_gather(holders, inputs, outputs, "weight all_gather of shards"))
                continue
            inputs = {r: s.param.detach() for r, s in shards.items()}
            outputs = {r: s.gather_buffers() for r, s in shards.items()}
            exchange.all_gather(holders, inputs, outputs, "weight all_gather of shards").wait()
            for r, lists in local.items():
                unflatten_into(outputs[r][:lists[i].numel], lists[i].weight_views())  # padding dropped
    for pending in in_place:
        pending.wait()


class UnshardedState:
    """An optimizer's state as if it had stepped the parameters themselves (what ``assembly``
    reads and writes: ``state`` keyed by parameter, ``param_groups``), for the sharded buckets'
    parameters plus the single-holder parameters the optimizer steps directly."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.param_groups = [{"params": list(params)}]
        self.state: dict[torch.Tensor, dict[str, Any]] = defaultdict(dict)  # keyed as torch.optim.Optimizer.state


@torch.no_grad()
def unsharded_state(buckets: Mapping[int, Buckets], optimizers: Mapping[int, torch.optim.Optimizer],
                    params: Mapping[int, Sequence[nn.Parameter]], exchange: Exchange) -> dict[int, UnshardedState]:
    """Each local worker's optimizer state per parameter (collective within holder sets): every
    shard's tensor states all-gathered and laid back into parameter-shaped tensors."""
    out = {r: UnshardedState(params[r]) for r in buckets}
    for r, optimizer in optimizers.items():
        for p in params[r]:
            if p in optimizer.state:
                out[r].state[p] = dict(optimizer.state[p])
    names, scalars = _shard_state_names(buckets, optimizers)
    sets = sorted({h for per_worker in buckets.values() for h in per_worker if len(h) > 1})
    for holders in sets:
        local = {r: per_worker[holders] for r, per_worker in buckets.items() if holders in per_worker}
        for i in range(len(next(iter(local.values())))):
            for name in names:
                inputs, outputs = {}, {}
                for r, lists in local.items():
                    shard = _shard_of(lists[i])
                    value = optimizers[r].state.get(shard.param, {}).get(name)
                    inputs[r] = value if value is not None else torch.zeros_like(shard.param)
                    outputs[r] = shard.gather_buffers()
                exchange.all_gather(holders, inputs, outputs, f"optimizer-state all_gather ({name})").wait()
                for r, lists in local.items():
                    views = []
                    for segment in lists[i].segments:
                        states = out[r].state.setdefault(segment.tensor, dict(scalars))
                        if name not in states:
                            states[name] = torch.zeros_like(segment.tensor)
                        views += segment.views(states[name])
                    unflatten_into(outputs[r][:lists[i].numel], views)
    return out


@torch.no_grad()
def load_sharded_state(buckets: Buckets, optimizer: torch.optim.Optimizer, unsharded: UnshardedState) -> None:
    """Cut a per-parameter state (``UnshardedState`` filled by ``assembly``) into this worker's
    shards and give it to ``optimizer`` (local, no communication)."""
    for holders in sorted(buckets):
        for bucket in buckets[holders]:
            if bucket.shard is None:
                continue
            shard = _shard_of(bucket)
            first = unsharded.state.get(bucket.segments[0].tensor, {})
            names = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]
            state = optimizer.state[shard.param]
            for name in names:
                views = [v for s in bucket.segments for v in s.views(unsharded.state[s.tensor][name])]
                flat = flatten(views + [torch.zeros(shard.padding, dtype=bucket.dtype, device=shard.param.device)])
                state[name] = flat[shard.start:shard.start + shard.size].clone()
            for name, value in first.items():
                if name not in names:
                    state[name] = value.clone() if torch.is_tensor(value) else value
    for p, value in unsharded.state.items():
        if any(p is q for g in optimizer.param_groups for q in g["params"]):
            optimizer.state[p] = value


def _shard_state_names(buckets: Mapping[int, Buckets], optimizers: Mapping[int, torch.optim.Optimizer]
                       ) -> tuple[list[str], dict[str, Any]]:
    """Tensor states of a shard (e.g. exp_avg) and its scalar states (e.g. step): every holder of
    every shard runs the same optimizer."""
    for r, per_worker in buckets.items():
        for bucket_list in per_worker.values():
            for bucket in bucket_list:
                state = optimizers[r].state.get(bucket.shard.param) if bucket.shard is not None else None
                if state:
                    names = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0)
                    return names, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()
                                   if k not in names}
    return [], {}
