"""Live tensor memory on CPU, measured: every storage created while tracking is counted until it is
freed, and the live set at the peak is split by kind.

    tracker = LiveTensorTracker(params=model.parameters(), optimizer=opt)
    with tracker:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    tracker.report()   # {"peak_bytes": ..., "parameters": ..., "gradients": ..., ...}

How: a TorchDispatchMode sees the output of every aten op run on this thread (on CPU the autograd
engine runs backward on the calling thread too) and keeps a weak reference to each new storage; a
finalizer drops it when the storage dies (torch keeps one Python object per storage, so it fires
when the memory is released). After every op the live storages' current sizes are summed (sizes
are read then, since FSDP2 frees unsharded parameters by resizing their storage to zero).
Storages that existed before (parameters, buffers, optimizer state, the batch) are the baseline.
Saved-tensor hooks mark what autograd keeps for backward. At the peak, live storages are classed
as parameters, gradients (a parameter's ``.grad``), optimizer state, saved activations, and other
(temporaries, communication buffers, recomputation). On CUDA the backward runs on another thread:
use the allocator's own peak there.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .memory import local_tensor


def _key(t: torch.Tensor) -> int:
    return id(local_tensor(t).untyped_storage())


def _forget(tracker_ref: weakref.ref, key: int) -> None:
    tracker = tracker_ref()
    if tracker is not None:
        tracker.live.pop(key, None)


def _unsave(tracker_ref: weakref.ref, key: int) -> None:
    tracker = tracker_ref()
    if tracker is not None:
        tracker.saved.discard(key)


class LiveTensorTracker(TorchDispatchMode):
    """Peak live tensor bytes of the work done inside ``with tracker:``, split by kind."""

    def __init__(self, params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer | None = None,
                 extra: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.params = [p for p in params]
        self.optimizer = optimizer
        self.baseline: dict[int, tuple[int, str]] = {}
        for p in self.params:
            self._add_baseline(p, "parameters")
            if p.grad is not None:
                self._add_baseline(p.grad, "gradients")
        for t in self._optimizer_tensors():
            self._add_baseline(t, "optimizer_state")
        for t in extra:
            self._add_baseline(t, "other")
        # parameter storages are read at every op: ZeRO-3 (FSDP, shard_shared_weights) frees and
        # re-allocates them by resizing in place, so their size at the start is not their size later
        self.resizable = {id(s): (weakref.ref(s), s.nbytes()) for p in self.params
                          if (s := local_tensor(p).untyped_storage()) is not None}
        self.live: dict[int, weakref.ref] = {}
        self.saved: set[int] = set()
        self.peak = 0
        self.peak_kinds: dict[str, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        return [v for state in self.optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor)]

    def _add_baseline(self, t: torch.Tensor, kind: str) -> None:
        s = local_tensor(t).untyped_storage()
        self.baseline.setdefault(id(s), (s.nbytes(), kind))

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = local_tensor(t).untyped_storage()
        key = id(storage)
        if key not in self.saved:
            self.saved.add(key)
            # forgotten when it dies: a storage created later may get the same id (seen: a tensor
            # allocated after backward counted as a saved activation)
            weakref.finalize(storage, _unsave, weakref.ref(self), key)
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = local_tensor(t).untyped_storage()  # a DTensor (FSDP2) holds its local shard
            key = id(storage)
            if key in self.live or key in self.baseline:
                continue
            self.live[key] = weakref.ref(storage)
            # a weak reference: a storage that outlives the tracker must not keep it (and the
            # model and optimizer it refers to) alive
            weakref.finalize(storage, _forget, weakref.ref(self), key)
        # read sizes now rather than at creation: FSDP2 frees and re-allocates unsharded parameters
        # by resizing their storage in place
        # over a copy: dropping the last reference to a storage while summing runs its finalizer,
        # which removes it from ``live``
        current = sum(s.nbytes() for ref in list(self.live.values()) if (s := ref()) is not None)
        current += sum(s.nbytes() - start for ref, start in self.resizable.values() if (s := ref()) is not None)
        if current > self.peak:
            self.peak = current
            self.peak_kinds = self._classify()
        return out

    def _classify(self) -> dict[str, int]:
        grads = {_key(p.grad) for p in self.params if p.grad is not None}
        optimizer = {_key(t) for t in self._optimizer_tensors()}
        kinds = {"gradients": 0, "optimizer_state": 0, "saved_activations": 0, "other": 0}
        for key, ref in list(self.live.items()):  # a copy: see __torch_dispatch__
            storage = ref()
            nbytes = storage.nbytes() if storage is not None else 0
            kind = ("gradients" if key in grads else "optimizer_state" if key in optimizer
                    else "saved_activations" if key in self.saved else "other")
            kinds[kind] += nbytes
        kinds["parameters"] = sum(s.nbytes() - start for ref, start in self.resizable.values()
                                  if (s := ref()) is not None)  # a change from the baseline
        return kinds

    def __enter__(self) -> "LiveTensorTracker":
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._hooks.__exit__(*exc)

    def report(self) -> dict[str, int]:
        """Bytes at the peak of (baseline + live): the total and each kind."""
        base = {"parameters": 0, "gradients": 0, "optimizer_state": 0, "other": 0}
        for nbytes, kind in self.baseline.values():
            base[kind] += nbytes
        kinds = {k: base.get(k, 0) + self.peak_kinds.get(k, 0)
                 for k in ("parameters", "gradients", "optimizer_state", "saved_activations", "other")}
        return {"peak_bytes": sum(base.values()) + self.peak, **kinds}


class WorkerPeakTracker(TorchDispatchMode):
    """Peak live tensor bytes of each worker when one process plays several workers in turn (the
    simulator), or one (a real rank). Run each worker's forward, backward and optimizer step inside
    ``with tracker.worker(rank):``. A worker's live bytes are its own tensors at the start (its
    ``state``: parameters, buffers, gradients, optimizer state), the storages created while it
    runs, and whatever storage holds its parameters' gradients (the simulator's gradient sync packs
    them into buffers it creates between workers). Storages created outside any worker (the
    simulator's sums over workers) count for none: a real worker has no such buffers."""

    def __init__(self, state: dict[int, list[torch.Tensor]], params: dict[int, list[torch.Tensor]]) -> None:
        super().__init__()
        self.params = params
        self.baseline: dict[int, dict[int, int]] = {}
        for r, tensors in state.items():
            self.baseline[r] = {}
            for t in tensors:
                s = local_tensor(t).untyped_storage()
                self.baseline[r][id(s)] = s.nbytes()
        self.known = {k for b in self.baseline.values() for k in b}
        # parameter storages are read at every op (ZeRO-3 resizes them: see LiveTensorTracker)
        self.resizable = {r: {id(s): weakref.ref(s) for p in ps if (s := local_tensor(p).untyped_storage()) is not None}
                          for r, ps in params.items()}
        self.live: dict[int, tuple[weakref.ref, int | None]] = {}
        self.current: int | None = None
        self.peaks = {r: sum(b.values()) for r, b in self.baseline.items()}

    def worker(self, rank: int) -> "_Attribution":
        return _Attribution(self, rank)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = local_tensor(t).untyped_storage()
            key = id(storage)
            if key in self.live or key in self.known:
                continue
            self.live[key] = (weakref.ref(storage), self.current)
            weakref.finalize(storage, _forget_owned, weakref.ref(self), key)
        r = self.current
        if r is not None:
            grads = {_key(p.grad) for p in self.params.get(r, ()) if p.grad is not None}
            resizable = self.resizable.get(r, {})
            total = sum(n for key, n in self.baseline[r].items() if key not in resizable)
            total += sum(s.nbytes() for key, ref in resizable.items()
                         if key in self.baseline[r] and (s := ref()) is not None)
            for key, (ref, owner) in list(self.live.items()):  # a copy: finalizers may drop entries
                storage = ref()
                if storage is not None and (owner == r or key in grads) and key not in self.baseline[r]:
                    total += storage.nbytes()
            self.peaks[r] = max(self.peaks[r], total)
        return out


class _Attribution:
    def __init__(self, tracker: WorkerPeakTracker, rank: int) -> None:
        self.tracker, self.rank = tracker, rank

    def __enter__(self) -> None:
        self.previous, self.tracker.current = self.tracker.current, self.rank

    def __exit__(self, *exc: Any) -> None:
        self.tracker.current = self.previous


def _forget_owned(tracker_ref: weakref.ref, key: int) -> None:
    tracker = tracker_ref()
    if tracker is not None:
        tracker.live.pop(key, None)
