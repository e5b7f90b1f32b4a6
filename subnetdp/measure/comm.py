"""Bytes handed to collectives, counted where they are issued.

SDP counts its own (``SubnetworkDataParallel.comm_bytes``); for torch's DDP this comm hook does the
default averaging all-reduce and adds up the bytes of every bucket it hands over:

    counter = ByteCounter()
    ddp.register_comm_hook(counter, counting_allreduce_hook)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class ByteCounter:
    bytes: int = 0
    group: object = None  # the process group DDP averages over (None: the world)


def counting_allreduce_hook(state, bucket):  # no annotations: DDP inspects them, strings fail
    """DDP comm hook: the default mean all-reduce, counting the bucket's bytes into ``state``."""
    tensor = bucket.buffer()
    state.bytes += tensor.numel() * tensor.element_size()
    tensor.div_(dist.get_world_size(state.group))
    work = dist.all_reduce(tensor, group=state.group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
