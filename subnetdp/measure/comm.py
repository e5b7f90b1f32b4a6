"""Bytes handed to collectives, counted where they are issued, and the bytes each worker puts on
the wire for them under a ring model.

SDP counts its own (``SubnetworkDataParallel.comm_bytes`` / ``wire_bytes``); for torch's DDP this
comm hook does the default averaging all-reduce and adds up the bytes of every bucket it hands over:

    counter = ByteCounter()
    ddp.register_comm_hook(counter, counting_allreduce_hook)

The ring model is ``subnetdp.engine.exchange.ring_wire_bytes``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Iterator

import torch.distributed as dist

from ..engine.exchange import ring_wire_bytes


@dataclass
class ByteCounter:
    bytes: int = 0
    group: object = None  # the process group DDP averages over (None: the world)
    wire: float = 0.0     # bytes this worker sends under the ring model


def counting_allreduce_hook(state, bucket):  # no annotations: DDP inspects them, strings fail
    """DDP comm hook: the default mean all-reduce, counting the bucket's bytes into ``state``."""
    tensor = bucket.buffer()
    size = tensor.numel() * tensor.element_size()
    state.bytes += size
    state.wire += ring_wire_bytes("all_reduce", size, dist.get_world_size(state.group))
    tensor.div_(dist.get_world_size(state.group))
    work = dist.all_reduce(tensor, group=state.group, async_op=True)
    # the all-reduce is in place: the bucket itself is the result (also for backends whose
    # futures carry no value, such as the fake process group)
    return work.get_future().then(lambda fut: tensor)


_SHARDED_COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
                        "reduce_scatter_tensor")


@contextlib.contextmanager
def count_collective_bytes(counter: ByteCounter) -> Iterator[ByteCounter]:
    """Count the input bytes of every all-gather / reduce-scatter issued through ``torch.distributed``
    while active (FSDP2 calls them at run time through the module, so wrapping it sees them)."""
    originals = {name: getattr(dist, name) for name in _SHARDED_COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        kind = "all_gather" if name.startswith("all_gather") else "reduce_scatter"
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(output, input, *args, **kwargs):  # noqa: A002 - torch's parameter name
            size = input.numel() * input.element_size()
            counter.bytes += size
            group = signature.bind(output, input, *args, **kwargs).arguments.get("group")
            counter.wire += ring_wire_bytes(kind, size, dist.get_world_size(group))
            return fn(output, input, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
