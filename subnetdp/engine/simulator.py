"""N virtual SDP workers in one process: the same plan, cut, buckets and sync code as the
multi-process wrapper, with the exchange a sum over the virtual workers' buffers instead of a
collective. One GPU (or CPU) reproduces an N-worker experiment.

    sim = SubnetworkSimulator(model, world_size=8, blocks="layers", coverage=0.5)
    opts = [torch.optim.AdamW(w.parameters(), lr=3e-4) for w in sim.workers]
    for shards in loader:                      # one batch per virtual worker
        for worker, (x, y) in zip(sim.workers, shards):
            loss_fn(worker(x), y).backward()
        sim.sync_gradients()                   # holder-set averaging across the virtual workers
        for opt in opts:
            opt.step(); opt.zero_grad()
        sim.sync_weights()                     # backward masking or sharding; a no-op otherwise
    state = sim.full_state_dict()
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import assembly, evaluation, redraw, reducer, sharding, weights
from .errors import SDPConfigError
from .exchange import LocalExchange, _Done
from .plan import Plan
from .planning import budget_for_masking, check_arguments, plan_model, warn_if_disconnected
from .shared_weights import SharedWeights
from .subnetwork import Subnetwork, check_device


class SubnetworkSimulator:
    """One :class:`Subnetwork` per virtual worker, each a cut copy of ``model``. Keyword arguments
    are those of :class:`SubnetworkDataParallel`, so a script switches between the two by its
    constructor (``timeout`` and ``sync_weights_after_step`` are checked, then unused: nothing
    waits on a peer, and ``sync_weights()`` is always called explicitly)."""

    def __init__(self, model: nn.Module, world_size: int, *, blocks: str | Sequence[str] | None = None,
                 neurons: str | Sequence[str] | None = None, coverage: float = 0.5, masking: str = "forward",
                 seed: int = 0, scale: str = "none", neuron_groups: int | None = None,
                 example_input: Any = None, bucket_cap_mb: float = 25.0, timeout: float = 600.0,
                 sync_weights_after_step: bool = True, shard: bool = False, shard_shared_weights: bool = False,
                 reduce_dtype: torch.dtype | None = None, memory_budget: Any = None) -> None:
        if world_size < 1:
            raise SDPConfigError(f"world_size must be >= 1, got {world_size}")
        check_arguments(blocks=blocks, neurons=neurons, coverage=coverage, masking=masking, scale=scale,
                        timeout=timeout, reduce_dtype=reduce_dtype)
        check_device(model, None)
        units, plan = plan_model(model, world_size, blocks=blocks, neurons=neurons, coverage=coverage, seed=seed,
                                 neuron_groups=neuron_groups, example_input=example_input,
                                 memory_budget=budget_for_masking(memory_budget, masking))
        warn_if_disconnected(plan)
        self.world_size, self.masking = world_size, masking
        self.workers: list[Subnetwork] = [
            Subnetwork(copy.deepcopy(model), units, plan, r, masking=masking, scale=scale, bucket_cap_mb=bucket_cap_mb,
                       shard=shard, shard_shared_weights=shard_shared_weights, reduce_dtype=reduce_dtype)
            for r in range(world_size)]
        self.exchange = LocalExchange()
        self._shard_index = {id(s): j for w in self.workers for j, s in enumerate(w.freed_shards)}
        for worker in self.workers:
            if worker.freed_shards:
                worker.shared_weights = SharedWeights(worker.module, worker.freed_shards, self._gather_shard)

    def _gather_shard(self, shard: sharding.Shard) -> Any:
        """A freed shared buffer of one virtual worker, from every worker's part (local)."""
        index = self._shard_index[id(shard)]  # the shared buckets are the same on every worker
        parts = [self.workers[r].freed_shards[index].param.detach() for r in shard.holders]
        assert shard.weights is not None
        torch.cat(parts, out=shard.weights)
        return _Done()

    @property
    def plan(self) -> Plan:
        return self.workers[0].plan

    @property
    def _layouts(self) -> dict[int, Any]:
        return {w.rank: w.layout for w in self.workers}

    def sync_gradients(self) -> None:
        """Average every gradient over its unit's holders, as the multi-process buckets do."""
        with torch.no_grad():
            reducer.sync_all({w.rank: w.buckets for w in self.workers}, self.exchange)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """As :meth:`SubnetworkDataParallel.clip_grad_norm_`, after :meth:`sync_gradients`."""
        return reducer.clip_grad_norm_({w.rank: w.buckets for w in self.workers},
                                       {w.rank: w.shard_parameters() for w in self.workers}, self.exchange,
                                       self.world_size, max_norm, self.workers[0].device)

    def sync_weights(self) -> None:
        """After the optimizer steps: sharded, each bucket's updated parts are gathered into every
        holder's weights; backward masking, every worker takes each unit's values from the unit's
        first holder."""
        if self.workers[0].sharded:
            sharding.gather_weights({w.rank: w.buckets for w in self.workers}, self.exchange)
        if self.masking == "backward":
            weights.sync_weights(self._layouts, self.exchange, self.world_size)

    def redraw(self, seed: int, optimizers: Sequence[torch.optim.Optimizer]) -> int:
        """As :meth:`SubnetworkDataParallel.redraw`, for every virtual worker (one optimizer each)."""
        by_rank = dict(enumerate(optimizers))
        redraw.check_redrawable(self.workers[0], by_rank)
        return redraw.redraw({w.rank: w for w in self.workers}, by_rank, redraw.replan(self.plan, seed), self.exchange)

    @staticmethod
    def ensemble_log_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ensemble view from each virtual worker's subnetwork output on the same batch (as
        :meth:`SubnetworkDataParallel.ensemble_log_probs` over real ranks)."""
        return evaluation.ensemble_log_probs(dict(enumerate(logits)), LocalExchange(), len(logits))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The assembled full model: units from their first holder, float buffers averaged over
        the holders (shared ones over all workers)."""
        with contextlib.ExitStack() as gathered:
            for worker in self.workers:
                gathered.enter_context(worker.gathered())
            return assembly.full_state_dict(self._layouts, self.exchange, self.world_size)

    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for worker in self.workers:
            worker.load_full_state_dict(state)

    def full_optimizer_state(self, optimizers: Sequence[torch.optim.Optimizer]) -> assembly.OptimizerState:
        """The full model's optimizer state from each virtual worker's optimizer."""
        by_rank: dict[int, Any] = dict(enumerate(optimizers))
        if self.workers[0].sharded:
            by_rank = sharding.unsharded_state({w.rank: w.buckets for w in self.workers}, by_rank,
                                               {w.rank: list(w.trained_parameters()) for w in self.workers},
                                               self.exchange)
        return assembly.full_optimizer_state(self._layouts, by_rank, self.exchange, self.world_size)

    def load_full_optimizer_state(self, optimizers: Sequence[torch.optim.Optimizer],
                                  state: assembly.OptimizerState) -> None:
        for worker, optimizer in zip(self.workers, optimizers):
            worker.load_full_optimizer_state(optimizer, state)
