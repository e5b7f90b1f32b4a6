"""Memory figures of one process, each labelled by how it is obtained.

- ``tensor_bytes``: sum of ``numel * element_size`` over live tensors (exact for what they hold).
- ``optimizer_state_bytes``: the same over every tensor in ``optimizer.state``.
- ``peak_rss_bytes``: the kernel's high-water mark of resident memory (VmHWM in /proc/self/status):
  everything the process touched, the Python interpreter and torch's libraries included.
"""

from __future__ import annotations

from typing import Iterable

import torch


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor (FSDP2), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes this rank holds for ``tensors`` (DTensors count their local shard)."""
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors if t is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor))


def peak_rss_bytes() -> int | None:
    """VmHWM of this process in bytes; None where /proc is not available (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident size (Linux ``clear_refs``), so a later reading covers
    only what follows. Returns False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
