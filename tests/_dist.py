"""Run a function on N real torch.distributed (gloo, CPU) worker processes and collect results.

    results = run_distributed(fn, 4, arg)   # fn(rank, world_size, arg) -> picklable result
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world_size: int, port: int, out: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out, f"{rank}.pt"))
    except BaseException:  # noqa: BLE001 - reported to the parent as text
        with open(os.path.join(out, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    os._exit(code)  # skip process-group teardown, which can block when a peer is gone


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """Results of ``fn(rank, world_size, *args)`` from each rank; raises with the rank's traceback
    if any rank failed, and kills everything if the run outlives ``timeout``."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, out, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = {r: open(os.path.join(out, f"{r}.err")).read()
                  for r in range(world_size) if os.path.exists(os.path.join(out, f"{r}.err"))}
        if errors:
            raise AssertionError("\n".join(f"--- rank {r} failed:\n{tb}" for r, tb in errors.items()))
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout}s")
        paths = [os.path.join(out, f"{r}.pt") for r in range(world_size)]
        # a rank that ended itself on purpose (a test of dead peers) leaves no result: None
        return [torch.load(p, weights_only=False) if os.path.exists(p) else None for p in paths]
