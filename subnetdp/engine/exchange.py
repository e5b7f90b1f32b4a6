"""How workers combine flat buffers: the one thing the multi-process wrapper and the simulator do
differently. Every sync in the engine (gradients, gradient norm, weights, norm statistics, the
full model, the ensemble) is "pack by holder set, exchange, unpack", written once over the local
workers' buffers ``{rank: tensor}`` with the exchange injected (all-reduce, broadcast, all-gather):

- ``ProcessGroupExchange``: this rank's buffer only; torch.distributed collectives over one
  process group per holder set, with a timeout that names a dead or stuck peer.
- ``LocalExchange``: every virtual worker's buffer; a sum (or copy) in this process.
"""

from __future__ import annotations

import datetime
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.distributed as dist

from .errors import CollectiveError, PlanMismatchError
from .plan import Plan

# torch 2.13 renamed these (the old names warn); earlier versions only have the old ones
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

Buffers = Mapping[int, torch.Tensor]  # worker rank -> its flat buffer (only the local workers')


class Pending(Protocol):
    def wait(self) -> None: ...

    def done(self) -> bool:
        """Completed: ``wait()`` returns at once (never blocks)."""


class Exchange(Protocol):
    def all_reduce(self, holders: tuple[int, ...], buffers: Buffers, what: str) -> Pending:
        """Sum the holders' buffers, in place in each (asynchronous: ``wait()`` before reading)."""

    def broadcast(self, source: int, buffers: Buffers, what: str) -> Pending:
        """Copy worker ``source``'s buffer into every worker's, in place."""

    def all_gather(self, holders: tuple[int, ...], inputs: Buffers, outputs: Buffers, what: str) -> Pending:
        """Every holder's input (all of one size) into every holder's output, in holder order."""

    def reduce_scatter(self, holders: tuple[int, ...], inputs: Buffers, outputs: Buffers, what: str) -> Pending:
        """Sum the holders' inputs (all of one size, k times the output's); the i-th holder's output
        takes the i-th of k equal parts of the sum."""


def ring_wire_bytes(kind: str, size: int, group_size: int) -> float:
    """Bytes one worker sends for a collective of ``kind`` on ``size`` input bytes over
    ``group_size`` workers, under a ring model (what NCCL's and gloo's ring algorithms send per
    worker; latency ignored): an all-reduce sends 2 (g-1)/g s, an all-gather of an s-byte input
    (g-1) s, a reduce-scatter of an s-byte input (g-1)/g s, a pipelined broadcast (g-1)/g s on
    average (every worker but the last forwards it once)."""
    g = group_size
    if g <= 1:
        return 0.0
    return {"all_reduce": 2 * (g - 1) / g * size, "all_gather": (g - 1) * size,
            "reduce_scatter": (g - 1) / g * size, "broadcast": (g - 1) / g * size}[kind]



class _Done:
    def wait(self) -> None:
        return None

    def done(self) -> bool:
        return True


class LocalExchange:
    """Virtual workers in one process: an all-reduce is a sum over their buffers."""

    def all_reduce(self, holders: tuple[int, ...], buffers: Buffers, what: str) -> Pending:
        if len(holders) > 1:
            total = torch.stack([buffers[r] for r in holders]).sum(0)
            for r in holders:
                buffers[r].copy_(total)
        return _Done()

    def broadcast(self, source: int, buffers: Buffers, what: str) -> Pending:
        for r, buffer in buffers.items():
            if r != source:
                buffer.copy_(buffers[source])
        return _Done()

    def all_gather(self, holders: tuple[int, ...], inputs: Buffers, outputs: Buffers, what: str) -> Pending:
        gathered = torch.cat([inputs[r] for r in holders])
        for r in holders:
            outputs[r].copy_(gathered)
        return _Done()

    def reduce_scatter(self, holders: tuple[int, ...], inputs: Buffers, outputs: Buffers, what: str) -> Pending:
        total = torch.stack([inputs[r] for r in holders]).sum(0)
        for part, r in zip(total.chunk(len(holders)), holders):
            outputs[r].copy_(part)
        return _Done()


class ProcessGroupExchange:
    """This rank's side of collectives over one process group per holder set."""

    def __init__(self, process_group: dist.ProcessGroup | None, timeout: float) -> None:
        self.parent = process_group or dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(self.parent), dist.get_world_size(self.parent)
        self.global_ranks = dist.get_process_group_ranks(self.parent)
        self.backend = dist.get_backend(self.parent)
        self.timeout = datetime.timedelta(seconds=timeout)
        self.world = tuple(range(self.world_size))
        self.groups: dict[tuple[int, ...], Any] = {}
        self.created: set[tuple[int, ...]] = set()  # every group made so far (a re-draw reuses them)
        self.bytes_sent = 0  # bytes this rank handed to collectives
        self.wire_bytes = 0.0  # bytes this rank sends for them under a ring model (measure/comm.py)

    def _count(self, kind: str, tensor: torch.Tensor, group_size: int) -> None:
        size = tensor.numel() * tensor.element_size()
        self.bytes_sent += size
        self.wire_bytes += ring_wire_bytes(kind, size, group_size)

    def check_same_plan(self, plan: Plan, device: torch.device) -> None:
        """Every rank computed the same plan (an all-gather of fingerprints), before anything else
        is created: a mismatch is a PlanMismatchError on every rank, never a hang."""
        digest = torch.tensor(list(bytes.fromhex(plan.fingerprint())), dtype=torch.uint8, device=device)
        gathered = [torch.empty_like(digest) for _ in range(self.world_size)]
        work = dist.all_gather(gathered, digest, group=self.parent, async_op=True)
        _Work(work, self, "all_gather of plan fingerprints", self.world, digest).wait()
        if all(torch.equal(d, gathered[0]) for d in gathered):
            return
        # every rank sees the same gathered digests, so every rank takes this branch together
        summaries: list[Any] = [None] * self.world_size
        dist.all_gather_object(summaries, _plan_summary(plan), group=self.parent)
        differences = [f"{field}: " + ", ".join(f"rank {r} {s[field]}" for r, s in enumerate(summaries))
                       for field in summaries[0] if any(s[field] != summaries[0][field] for s in summaries)]
        raise PlanMismatchError(
            f"rank {self.rank}: the ranks computed different SDP plans ({'; '.join(differences)}); every rank must "
            "wrap the same model with the same coverage, level, neuron_groups, example input and seed")

    def broadcast_from_first(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's values (as DDP does at wrap time), so
        that every worker starts from the same model even if the ranks initialised differently."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, group in by_dtype.items():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            work = dist.broadcast(flat, src=self.global_ranks[0], group=self.parent, async_op=True)
            _Work(work, self, "broadcast of the initial model from rank 0", self.world, flat).wait()
            offset = 0
            with torch.no_grad():
                for t in group:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    def create_groups(self, holder_sets: Sequence[tuple[int, ...]]) -> None:
        """One process group per distinct holder set, plus one for all workers, created on every
        rank in the same order (new_group is collective over the whole world); those that exist
        already (a re-drawn plan's) are reused."""
        for members in sorted((set(holder_sets) | {self.world}) - self.created):
            self.created.add(members)
            group = dist.new_group(ranks=[self.global_ranks[r] for r in members], timeout=self.timeout,
                                   backend=self.backend)
            if self.rank in members:
                self.groups[members] = group

    def create_weight_group(self) -> None:
        """A second group over all workers for the shared weights' all-gathers (shared_weights.py):
        backward issues them while the gradient reduce-scatters run on the world group, and the two
        sequences may interleave differently on different ranks (the blocks between differ); each
        group on its own sees one order on every rank. Collective: every rank calls it."""
        self.weight_group = dist.new_group(ranks=list(self.global_ranks), timeout=self.timeout, backend=self.backend)

    def all_gather_weights(self, input: torch.Tensor, output: torch.Tensor, what: str) -> Pending:
        """An all-gather over all workers on the weight group (``create_weight_group``)."""
        self._count("all_gather", input, self.world_size)
        work = _all_gather_single(output, input, group=self.weight_group, async_op=True)
        return _Work(work, self, what, self.world, input)

    def all_reduce(self, holders: tuple[int, ...], buffers: Buffers, what: str) -> Pending:
        if len(holders) == 1:
            return _Done()  # one holder: its buffer is already the sum
        tensor = buffers[self.rank]
        self._count("all_reduce", tensor, len(holders))
        return _Work(dist.all_reduce(tensor, group=self.groups[holders], async_op=True), self, what, holders, tensor)

    def all_gather(self, holders: tuple[int, ...], inputs: Buffers, outputs: Buffers, what: str) -> Pending:
        return self._input_to_output("all_gather", _all_gather_single, holders, inputs, outputs, what)

    def reduce_scatter(self, holders: tuple[int, ...], inputs: Buffers, outputs: Buffers, what: str) -> Pending:
        return self._input_to_output("reduce_scatter", _reduce_scatter_single, holders, inputs, outputs, what)

    def _input_to_output(self, kind: str, collective: Any, holders: tuple[int, ...], inputs: Buffers,
                         outputs: Buffers, what: str) -> Pending:
        """A collective from this rank's input into its output over a holder set (one holder: a copy)."""
        tensor, output = inputs[self.rank], outputs[self.rank]
        if len(holders) == 1:
            output.copy_(tensor)
            return _Done()
        self._count(kind, tensor, len(holders))
        work = collective(output, tensor, group=self.groups[holders], async_op=True)
        return _Work(work, self, what, holders, tensor)

    def broadcast(self, source: int, buffers: Buffers, what: str) -> Pending:
        tensor = buffers[self.rank]
        self._count("broadcast", tensor, self.world_size)
        work = dist.broadcast(tensor, src=self.global_ranks[source], group=self.groups[self.world], async_op=True)
        return _Work(work, self, what, self.world, tensor)


def _plan_summary(plan: Plan) -> dict[str, Any]:
    """What a user can compare between ranks when plans differ."""
    return {"workers": plan.world_size, "coverage": plan.coverage, "level": plan.level, "seed": plan.seed,
            "units": len(plan.holders), "unit parameters": sum(plan.unit_params.values()),
            "shared parameters": plan.shared_params, "flops counted": plan.flops_counted,
            "holders": plan.fingerprint()[:12]}


class _Work:
    """An in-flight collective whose failure or timeout becomes one CollectiveError naming it."""

    def __init__(self, work: Any, exchange: ProcessGroupExchange, what: str, ranks: tuple[int, ...],
                 tensor: torch.Tensor) -> None:
        self.work, self.exchange, self.what, self.ranks, self.tensor = work, exchange, what, ranks, tensor

    def done(self) -> bool:
        # a fake process group's (benchmarks, tests) work does nothing, so it is done at once, but
        # never says so
        return bool(self.work.is_completed()) or self.exchange.backend == "fake"

    def wait(self) -> None:
        ex = self.exchange
        size = self.tensor.numel() * self.tensor.element_size()
        try:
            completed = self.work.wait(timeout=ex.timeout)
        except Exception as exc:  # noqa: BLE001 - every backend failure becomes one clear error
            raise CollectiveError(
                f"rank {ex.rank}: {self.what} over workers {list(self.ranks)} ({size:,} bytes) failed or did not "
                f"complete within {ex.timeout.total_seconds():g}s; a peer has probably died or is stuck. "
                f"Backend said: {exc}") from exc
        if completed is False:
            raise CollectiveError(f"rank {ex.rank}: {self.what} over workers {list(self.ranks)} timed out after "
                                  f"{ex.timeout.total_seconds():g}s")
