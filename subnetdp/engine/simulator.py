"""N virtual SDP workers in one process: the same plan and the same averaging as the multi-process
wrapper, without torch.distributed. One GPU (or CPU) reproduces an N-worker experiment.

    sim = SubnetworkSimulator(model, world_size=8, blocks="layers", coverage=0.5)
    opts = [torch.optim.AdamW(w.parameters(), lr=3e-4) for w in sim.workers]
    for shards in loader:                      # one batch per virtual worker
        for worker, (x, y) in zip(sim.workers, shards):
            loss_fn(worker(x), y).backward()
        sim.sync_gradients()                   # holder-set averaging across the virtual workers
        for opt in opts:
            opt.step(); opt.zero_grad()
        sim.sync_weights()                     # backward masking only; a no-op otherwise
    state = sim.full_state_dict()
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .layout import Piece, flatten
from .plan import Plan
from .wrapper import SubnetworkDataParallel, _apply_clip, _dtypes, assemble_full_state


class SubnetworkSimulator:
    """Holds one :class:`SubnetworkDataParallel` per virtual worker (each a cut copy of ``model``).

    Keyword arguments are those of :class:`SubnetworkDataParallel` (``blocks``/``neurons``,
    ``coverage``, ``masking``, ``seed``, ``scale``, ``neuron_groups``, ``example_input``).
    """

    def __init__(self, model: nn.Module, world_size: int, **kwargs: Any) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.workers: list[SubnetworkDataParallel] = [
            SubnetworkDataParallel(copy.deepcopy(model), _virtual_rank=r, _virtual_world_size=world_size,
                                   **kwargs) for r in range(world_size)]

    @property
    def plan(self) -> Plan:
        return self.workers[0].plan

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Average every gradient over its unit's holders, as the multi-process all-reduce does."""
        buckets = [w.grad_buckets() for w in self.workers]
        for key in sorted({k for b in buckets for k in b}, key=lambda k: (k[0], str(k[1]))):
            members = key[0]
            total = torch.zeros_like(buckets[members[0]][key])
            for r in members:
                total += buckets[r][key]
            averaged = total / len(members)
            for r in members:
                self.workers[r].set_grad_buckets({key: averaged.clone()})

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """As :meth:`SubnetworkDataParallel.clip_grad_norm_`, after :meth:`sync_gradients`."""
        squared = torch.zeros((), dtype=torch.float64)
        for worker in self.workers:
            for key, flat in worker.grad_buckets().items():
                if key[0][0] == worker.rank:
                    squared += flat.double().pow(2).sum().cpu()
        norm = squared.sqrt().item()
        for worker in self.workers:
            _apply_clip(worker.parameters(), norm, max_norm)
        return torch.tensor(norm)

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Backward masking: every worker takes each unit's values from the unit's first holder."""
        if self.workers[0].masking != "backward":
            return
        for source in range(self.world_size):
            flat = self.workers[source].owned_weights(source)
            if flat.numel() == 0:
                continue
            for r, worker in enumerate(self.workers):
                if r != source:
                    worker.receive_weights(source, flat.clone())

    @staticmethod
    @torch.no_grad()
    def ensemble_log_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ensemble view: the log of the mean over workers of their predicted probabilities,
        from each virtual worker's subnetwork output on the same batch (as
        :meth:`SubnetworkDataParallel.ensemble_log_probs` over real ranks)."""
        stacked = torch.stack([torch.log_softmax(x.float(), dim=-1) for x in logits])
        return torch.logsumexp(stacked, dim=0) - math.log(len(logits))

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The assembled full model: units from their first holder, float buffers averaged over
        the holders (shared ones over all workers)."""
        averaged: dict[tuple[str, int], torch.Tensor] = {}
        first = self.workers[0]
        for piece in first._pieces:
            dtype = first._full_meta[piece.key][1]
            if not piece.is_param and dtype.is_floating_point:
                values = [flatten(self.workers[r]._local_views(piece)) for r in piece.holders]  # type: ignore[arg-type]
                averaged[(piece.key, piece.group)] = (torch.stack(values).sum(0) / len(values)).cpu()

        def fetch(source: int, pieces: list[Piece]) -> list[torch.Tensor]:
            worker = self.workers[source]
            parts = [averaged.get((p.key, p.group), None) for p in pieces]
            parts = [v if v is not None else flatten(worker._local_views(p)).cpu()  # type: ignore[arg-type]
                     for p, v in zip(pieces, parts)]
            return [flatten([x for x, p in zip(parts, pieces) if first._full_meta[p.key][1] == dt])
                    for dt in _dtypes(first, pieces)]

        return assemble_full_state(first, fetch)

    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for worker in self.workers:
            worker.load_full_state_dict(state)
