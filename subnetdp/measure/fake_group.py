"""A fake process group: every collective returns at once and moves nothing, so one process can
play any rank of N (exact per-rank memory and compute, no communication). `subnetdp bench
--backend fake` and tests use it.

torch (2.6 to 2.13) registers its "fake" c10d backend only in a module of ``torch.testing._internal``
and offers no public way to do it; this is the one place that imports it.
"""

from __future__ import annotations

import torch.distributed as dist


def init_fake_process_group(rank: int, world_size: int) -> None:
    """``dist.init_process_group`` on the fake backend, as ``rank`` of ``world_size``."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 - registers the "fake" backend

    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
