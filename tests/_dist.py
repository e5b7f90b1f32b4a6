"""Run a function on N real torch.distributed (gloo, CPU) worker processes and collect results.

    results = run_distributed(fn, 4, arg)   # fn(rank, world_size, arg) -> picklable result

By default the function runs on a pool of N processes that the whole test session shares: they
start (spawn, import torch, join a gloo group) once per world size, and each call sends them the
function by name. ``fresh=True`` starts N processes of its own instead, for tests that kill, stop
or desynchronise ranks on purpose, or need a process that has never run anything. A call that fails
or outlives its timeout takes the pool down with it (the next call starts a new one), so a hung
collective never leaks into the next test.
"""

from __future__ import annotations

import atexit
import importlib
import io
import os
import queue
import socket
import sys
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


def _join(rank: int, world_size: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def _entry(fn: Callable, rank: int, world_size: int, port: int, out: str, args: tuple) -> None:
    code = 0
    try:
        _join(rank, world_size, port)
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out, f"{rank}.pt"))
    except BaseException:  # noqa: BLE001 - reported to the parent as text
        with open(os.path.join(out, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    os._exit(code)  # skip process-group teardown, which can block when a peer is gone


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _serve(rank: int, world_size: int, port: int, jobs: Any, results: Any) -> None:
    """A pool process: join the group once, then run each job sent to it, in order."""
    try:
        _join(rank, world_size, port)
    except BaseException:  # noqa: BLE001
        results.put((rank, False, traceback.format_exc().encode()))
        os._exit(1)
    while True:
        job = jobs.get()
        if job is None:
            os._exit(0)
        path, module, name, payload = job
        try:
            # test modules import as top-level modules from their own folders: follow the parent's path
            sys.path[:0] = [p for p in path if p not in sys.path]
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, True, _dumps(fn(rank, world_size, *_loads(payload)))))
        except BaseException:  # noqa: BLE001 - reported to the parent as text
            results.put((rank, False, traceback.format_exc().encode()))


class _Pool:
    """N processes in one gloo group, running one job at a time."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size, port = world_size, _free_port()
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(r, world_size, port, self.jobs[r], self.results), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, args: tuple, timeout: float) -> list[Any]:
        payload = _dumps(args)
        for q in self.jobs:
            q.put((list(sys.path), fn.__module__, fn.__qualname__, payload))
        got: dict[int, tuple[bool, bytes]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.world_size:
            if any(not ok for ok, _ in got.values()):  # a rank failed: its peers get a moment, then the pool goes
                deadline = min(deadline, time.monotonic() + 10)
            try:
                rank, ok, data = self.results.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                got[rank] = (ok, data)
            except queue.Empty:
                if time.monotonic() >= deadline or any(not p.is_alive() for p in self.procs):
                    break
        errors = {r: data.decode() for r, (ok, data) in got.items() if not ok}
        missing = [r for r in range(self.world_size) if r not in got]
        if errors or missing:
            self.close()
            if errors:
                raise AssertionError("\n".join(f"--- rank {r} failed:\n{tb}" for r, tb in sorted(errors.items())))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout}s")
        return [_loads(got[r][1]) for r in range(self.world_size)]

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()


_POOLS: dict[int, _Pool] = {}


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        for q in pool.jobs:
            q.put(None)
        for p in pool.procs:
            p.join(5)
        pool.close()
    _POOLS.clear()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0, fresh: bool = False
                    ) -> list[Any]:
    """Results of ``fn(rank, world_size, *args)`` from each rank; raises with the rank's traceback
    if any rank failed, and kills everything if the run outlives ``timeout``. ``fresh``: on new
    processes of its own (see the module docstring); a rank that ended itself on purpose then
    leaves no result: None."""
    if not fresh:
        pool = _POOLS.get(world_size)
        if pool is None or any(not p.is_alive() for p in pool.procs):
            pool = _POOLS[world_size] = _Pool(world_size)
        try:
            return pool.run(fn, args, timeout)
        except BaseException:
            _POOLS.pop(world_size, None)
            raise
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
        return [torch.load(p, weights_only=False) if os.path.exists(p) else None for p in paths]
