"""Gradient sync: each gradient averaged over the holders of its unit, in buckets that overlap
backward, as DDP's Reducer does for the whole model.

A worker's trained gradients are grouped by (holder set, dtype) and cut, in reverse model order
(the order backward produces them), into buckets of about ``bucket_cap_mb``. Every member of a
holder set builds the same buckets in the same order. During backward a bucket's all-reduce is
issued once its gradients and those of the buckets before it are ready, so the issue order is the
same on every member whatever order gradients arrive in; the end-of-backward callback issues the
rest, waits, and divides by the holder count.

In place where possible: a whole parameter's ``.grad`` becomes a view of its bucket when the bucket
is packed, so the averaged bucket is the averaged gradient (no copy back, no second copy alive);
a neuron slice's gradient is copied back into its part of the parameter's ``.grad``.

Sharded (``sharding.py``): a bucket with a shard is reduce-scattered instead, straight into the
shard's gradient, and the parameters' own gradients are dropped once every bucket is done.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol

import torch
from torch import nn

from .cut import LocalLayout
from .exchange import Exchange, Pending
from .layout import Location, flatten


class BucketShard(Protocol):
    """This worker's part of a bucket under ``shard=True`` (``sharding.Shard``)."""

    padding: int
    size: int
    param: nn.Parameter

    def take_gradient(self, averaged: torch.Tensor) -> None: ...

HolderSet = tuple[int, ...]


class Bucket:
    """One bucket of a holder set on one worker: the gradient parts it carries and, during
    backward, which of its parameters have yet to produce a gradient."""

    def __init__(self, holders: HolderSet, dtype: torch.dtype, segments: list[Location]) -> None:
        self.holders, self.dtype, self.segments = holders, dtype, segments
        self.params = {id(s.tensor) for s in segments}
        self.pending: set[int] = set()
        self.sync: BucketSync | None = None
        self.shard: BucketShard | None = None  # set when sharding: this worker's part of the bucket
        self.reduce_dtype: torch.dtype | None = None  # set to send gradients in a narrower dtype

    @property
    def numel(self) -> int:
        return sum(v.numel() for s in self.segments for v in s.views())

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def weight_views(self) -> list[torch.Tensor]:
        """The parameter entries this bucket carries, in bucket order."""
        return [v for s in self.segments for v in s.views()]

    def grad_views(self) -> list[torch.Tensor]:
        """This worker's gradient entries, in bucket order (a missing gradient counts as zeros)."""
        return [v for s in self.segments for v in s.views(_grad_or_zeros(s.tensor))]

    def pack(self, padding: int = 0) -> torch.Tensor:
        """The gradient entries in one flat buffer (followed by ``padding`` zeros)."""
        views = self.grad_views()
        single = views[0] if len(views) == 1 and self.segments[0].dim is None else None
        if single is not None and not padding and single.is_contiguous() and single.dtype == self.dtype:
            flat = single.view(-1)  # one whole gradient (an embedding's): sent as it is, not copied first
        else:
            if padding:
                views.append(torch.zeros(padding, dtype=self.dtype, device=views[0].device))
            flat = flatten(views, dtype=self.dtype)
        offset = 0
        for s in self.segments:
            n = sum(v.numel() for v in s.views())
            if s.dim is None:  # the whole gradient: from now on it lives in the bucket
                s.tensor.grad = flat[offset:offset + n].view_as(s.tensor)
            offset += n
        return flat

    def release_whole_grads(self) -> None:
        """Sharded: drop the gradients that are whole in this bucket (views of its flat buffer)."""
        for s in self.segments:
            if s.dim is None:
                s.tensor.grad = None

    def unpack(self, flat: torch.Tensor) -> None:
        """Write the averaged bucket into the gradients (whole ones already are views of it)."""
        offset = 0
        for s in self.segments:
            n = sum(v.numel() for v in s.views())
            if s.dim is not None:
                part = flat[offset:offset + n]
                inner = 0
                for view in s.views(_grad_or_zeros(s.tensor)):
                    view.copy_(part[inner:inner + view.numel()].view_as(view))
                    inner += view.numel()
            offset += n


def _grad_or_zeros(param: torch.Tensor) -> torch.Tensor:
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def make_buckets(layout: LocalLayout, cap_mb: float, split_shared: bool = False) -> dict[HolderSet, list[Bucket]]:
    """This worker's buckets: per holder set, its dtypes in a fixed order, each cut in reverse model
    order into buckets of about ``cap_mb`` (a parameter is never split across buckets).
    ``split_shared``: the shared parameters' buckets are also cut where the owning module changes,
    so a module gathers only its own weights (ZeRO-3, shared_weights.py)."""
    segments: dict[tuple[HolderSet, torch.dtype], list[tuple[Location, str]]] = {}
    seen: set[tuple[int, tuple]] = set()
    world = tuple(range(layout.plan.world_size))
    for piece in layout.pieces:
        location = layout.trainable(piece)
        if location is None or (id(location.tensor), location.ranges) in seen:
            continue  # not trained here, or a tied weight already listed under another key
        seen.add((id(location.tensor), location.ranges))
        module = piece.key.rpartition(".")[0] if split_shared and piece.holders == world else ""
        segments.setdefault((piece.holders, location.tensor.dtype), []).append((location, module))
    cap = cap_mb * 2 ** 20
    buckets: dict[HolderSet, list[Bucket]] = {}
    for (holders, dtype), segs in sorted(segments.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        current: list[Location] = []
        size, module = 0, segs[-1][1]
        for seg, seg_module in reversed(segs):
            if current and seg_module != module:
                buckets.setdefault(holders, []).append(Bucket(holders, dtype, current))
                current, size = [], 0
            module = seg_module
            current.append(seg)
            size += sum(v.numel() for v in seg.views()) * dtype.itemsize
            if size >= cap:
                buckets.setdefault(holders, []).append(Bucket(holders, dtype, current))
                current, size = [], 0
        if current:
            buckets.setdefault(holders, []).append(Bucket(holders, dtype, current))
    return buckets


class BucketSync:
    """One bucket's sync across the local workers that hold it: pack, all-reduce, unpack the mean
    (sharded: pack, reduce-scatter into each holder's shard gradient, divide). With a
    ``reduce_dtype`` the packed gradient is divided by k first (so fp16 cannot overflow), cast,
    sent, and cast back, as DDP's bf16/fp16 compression hooks do."""

    def __init__(self, buckets: Mapping[int, Bucket], exchange: Exchange) -> None:
        self.buckets = buckets
        first = next(iter(buckets.values()))
        self.holders, self.reduce_dtype = first.holders, first.reduce_dtype
        self.flats: dict[int, torch.Tensor] = {}
        if first.shard is not None:
            self.flats = {r: b.pack(b.shard.padding) for r, b in buckets.items()}  # type: ignore[union-attr]
            self.sent = self._to_wire(self.flats)
            self.parts = {r: torch.empty(b.shard.size, dtype=self.sent[r].dtype,  # type: ignore[union-attr]
                                         device=self.sent[r].device) for r, b in buckets.items()}
            self.pending: Pending = exchange.reduce_scatter(self.holders, self.sent, self.parts,
                                                            "gradient reduce_scatter")
            return
        if len(self.holders) == 1:
            return  # one holder: its gradient is already the average, nothing is sent
        self.flats = {r: b.pack() for r, b in buckets.items()}
        self.sent = self._to_wire(self.flats)
        self.pending = exchange.all_reduce(self.holders, self.sent, "gradient all_reduce")

    def _to_wire(self, flats: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if self.reduce_dtype is None:
            return flats
        return {r: (f / len(self.holders)).to(self.reduce_dtype) for r, f in flats.items()}

    def _mean(self, sent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The average from what came back: divided already when sent in ``reduce_dtype``."""
        return sent.to(dtype) if self.reduce_dtype is not None else sent.div_(len(self.holders))

    def done(self) -> bool:
        """Finished, or its collective has completed (finish() will not wait)."""
        return not self.flats or self.pending.done()

    def finish(self) -> None:
        if not self.flats:
            return
        self.pending.wait()
        for r, bucket in self.buckets.items():
            if bucket.shard is not None:
                bucket.shard.take_gradient(self._mean(self.parts[r], bucket.dtype))
                bucket.release_whole_grads()
            else:
                mean = self._mean(self.sent[r], bucket.dtype)
                if mean is not self.flats[r]:
                    self.flats[r].copy_(mean)  # whole gradients are views of the packed buffer
                bucket.unpack(self.flats[r])
        self.flats, self.sent = {}, {}


def sync_all(buckets: Mapping[int, Mapping[HolderSet, list[Bucket]]], exchange: Exchange) -> None:
    """Average every bucket of the local workers, all in flight at once (the simulator's path, and
    the wrapper's when gradients were produced outside its hooks)."""
    sets = sorted({h for per_worker in buckets.values() for h in per_worker})
    syncs = []
    for holders in sets:
        local = {r: per_worker[holders] for r, per_worker in buckets.items() if holders in per_worker}
        count = len(next(iter(local.values())))
        syncs += [BucketSync({r: lists[i] for r, lists in local.items()}, exchange) for i in range(count)]
    for sync in syncs:
        sync.finish()
    for per_worker in buckets.values():
        release_sharded_grads(per_worker)


def release_sharded_grads(buckets: Mapping[HolderSet, list[Bucket]]) -> None:
    """Drop the parameters' gradients of sharded buckets: their averages live in the shards."""
    for bucket_list in buckets.values():
        for bucket in bucket_list:
            if bucket.shard is not None:
                for segment in bucket.segments:
                    segment.tensor.grad = None


class GradientReducer:
    """The wrapper's bucket scheduler: called as each parameter's gradient is accumulated, it
    issues each bucket's all-reduce in the fixed order, and finishes them at the end of backward."""

    def __init__(self, rank: int, buckets: dict[HolderSet, list[Bucket]], exchange: Exchange) -> None:
        self.rank, self.buckets, self.exchange = rank, buckets, exchange
        self.enabled = True       # False inside no_sync()
        self.backwards = 0        # synced backwards finished: the weight sync follows the step after one
        self.queued = False       # the end-of-backward callback is queued for this backward
        self.sets_of_param: dict[int, list[HolderSet]] = {}
        for holders, bucket_list in buckets.items():
            for bucket in bucket_list:
                for pid in bucket.params:
                    if holders not in self.sets_of_param.setdefault(pid, []):
                        self.sets_of_param[pid].append(holders)
        self.issued: list[tuple[HolderSet, int]] = []  # (holder set, bucket index), in issue order
        self.sharded_in_flight: list[Bucket] = []

    def grad_ready(self, param: torch.Tensor) -> None:
        if not self.enabled:
            return
        if not self.queued:
            self.queued = True
            self.issued = []
            for bucket_list in self.buckets.values():
                for bucket in bucket_list:
                    bucket.pending, bucket.sync = set(bucket.params), None
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        for holders in self.sets_of_param.get(id(param), ()):
            for bucket in self.buckets[holders]:
                bucket.pending.discard(id(param))
            self._issue_ready(holders)

    def _issue_ready(self, holders: HolderSet, everything: bool = False) -> None:
        for i, bucket in enumerate(self.buckets[holders]):
            if bucket.sync is not None:
                continue
            if bucket.pending and not everything:
                return  # a bucket waits for the ones before it: same issue order on every member
            bucket.sync = BucketSync({self.rank: bucket}, self.exchange)
            self.issued.append((holders, i))
            if bucket.shard is not None:
                self.sharded_in_flight.append(bucket)
            self._finish_completed()

    def _finish_completed(self) -> None:
        """ZeRO-2: a sharded bucket's gradients are freed as soon as its reduce-scatter has
        completed, not at the end of backward. Never waits: a rank blocked on one holder set's
        collective while a peer waits for it to issue another's could deadlock."""
        still = []
        for bucket in self.sharded_in_flight:
            if bucket.sync.done():  # type: ignore[union-attr]
                bucket.sync.finish()  # type: ignore[union-attr]
            else:
                still.append(bucket)
        self.sharded_in_flight = still

    @torch.no_grad()
    def finish(self) -> None:
        """End of backward: issue what is left, wait for every bucket, write the averages."""
        self.queued = False
        self.sharded_in_flight = []
        for holders in self.buckets:
            self._issue_ready(holders, everything=True)
        for bucket_list in self.buckets.values():
            for bucket in bucket_list:
                bucket.sync.finish()  # type: ignore[union-attr]
                bucket.sync = None
        release_sharded_grads(self.buckets)
        self.backwards += 1

    def reset(self) -> None:
        """Forget a backward that raised before its end-of-backward callback ran."""
        self.queued = False


def clip_grad_norm_(buckets: Mapping[int, Mapping[HolderSet, list[Bucket]]],
                    params: Mapping[int, Iterable[nn.Parameter]], exchange: Exchange, world_size: int,
                    max_norm: float, device: torch.device) -> torch.Tensor:
    """Clip every local worker's gradients by the norm of the full model's averaged gradient
    (collective, after the sync). Each holder set's bucket is counted by its lowest rank only, or
    shard by shard when sharded, so the norm is that of the full model, and every worker scales
    what its optimizer steps (``params``) by the same factor. Returns the norm before clipping."""
    totals = {r: _squared_norm([b for bucket_list in per_worker.values() for b in bucket_list], r, device)
              for r, per_worker in buckets.items()}
    exchange.all_reduce(tuple(range(world_size)), totals, "gradient-norm all_reduce").wait()
    norm = next(iter(totals.values())).sqrt()
    for worker_params in params.values():
        torch.nn.utils.clip_grads_with_norm_(list(worker_params), max_norm, norm)
    return norm


def _squared_norm(buckets: Iterable[Bucket], rank: int, device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for bucket in buckets:
        if bucket.shard is not None:
            if bucket.shard.param.grad is not None:  # each holder counts its own part
                total += bucket.shard.param.grad.double().pow(2).sum()
        elif bucket.holders[0] == rank:
            for view in bucket.grad_views():
                total += view.double().pow(2).sum()
    return total
