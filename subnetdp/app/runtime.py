"""What every command of the application needs from the machine it runs on, written once: the
device a process computes on, autocast, a description of the machine, peak memory over a window of
work, percentiles of step times. Starting worker processes is in launch.py.

Used by `subnetdp train`, `bench` and the CLI; nothing here knows SDP.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
from typing import Any, Sequence

import numpy as np
import torch

from ..measure import peak_rss_bytes, reset_peak_rss

# ---------------------------------------------------------------------------------------------
# the device


def choose_device(requested: str, local_rank: int | None = None) -> torch.device:
    """The device for ``requested`` ("auto", "cuda" or "cpu"; "auto" is CUDA when torch sees it).

    On CUDA, a worker process of a torchrun job (``local_rank`` given) takes GPU ``local_rank``
    modulo the GPUs it sees and makes it current, so ranks beyond the GPU count share GPUs; one
    process that plays every worker (``local_rank`` None) computes on the current GPU.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
    if not (requested == "cuda" or (requested == "auto" and torch.cuda.is_available())):
        return torch.device("cpu")
    if local_rank is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for forward (and the backward it records) in ``dtype`` ("bfloat16",
    "float16"); "none" computes in the parameters' own precision."""
    if dtype == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def machine_info(device: torch.device, **extra: Any) -> dict[str, Any]:
    """Host, platform, CPU count, the device's name and the torch version; ``extra`` entries
    (e.g. the process-group backend) come before the torch version."""
    name = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    return {"host": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "device": name, **extra, "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------
# measurement


class PeakMemory:
    """Peak memory over windows of work (``start`` .. ``stop``, repeatable; the largest is kept):
    the process's resident high-water mark, and on CUDA the allocator's peaks. Work outside the
    windows (evaluation, checkpoints) is not counted."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.rss, self.cuda_allocated, self.cuda_reserved = device, 0, 0, 0
        self.cuda_allocated_since_mark = 0  # the allocator's peak since mark(): one phase of a run

    def mark(self) -> None:
        self.cuda_allocated_since_mark = 0

    def start(self) -> None:
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> None:
        self.rss = max(self.rss, peak_rss_bytes() or 0)  # 0 where /proc cannot tell
        if self.device.type == "cuda":
            allocated = torch.cuda.max_memory_allocated(self.device)
            self.cuda_allocated = max(self.cuda_allocated, allocated)
            self.cuda_allocated_since_mark = max(self.cuda_allocated_since_mark, allocated)
            self.cuda_reserved = max(self.cuda_reserved, torch.cuda.max_memory_reserved(self.device))

    def cuda_figures(self) -> dict[str, int]:
        """The CUDA allocator's peaks under their record keys; empty on CPU."""
        if self.device.type != "cuda":
            return {}
        return {"cuda_max_allocated_bytes": self.cuda_allocated, "cuda_max_reserved_bytes": self.cuda_reserved}


def percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float] | None:
    """The ``qs`` percentiles (0..100) of ``values``, interpolated linearly between the nearest
    ranks (numpy's default); None when there are no values."""
    if not values:
        return None
    return [float(v) for v in np.percentile(values, list(qs))]

