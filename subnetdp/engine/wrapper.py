"""SubnetworkDataParallel: DDP's training loop, with each worker training only its subnetwork.

    sdp = SubnetworkDataParallel(model, blocks="model.layers", coverage=0.5, masking="forward")
    opt = torch.optim.AdamW(sdp.parameters(), lr=3e-4)      # only what this worker holds
    loss_fn(sdp(x), y).backward(); opt.step(); opt.zero_grad()
    state = sdp.full_state_dict()                            # the whole model, original keys

The wrapper is the wiring; each step lives in its own module:
1. planning.py: find the units (blocks, or neuron groups inside blocks) and the plan, locally;
   exchange.py: every rank checks with an all-gather that it computed the same plan (else
   PlanMismatchError naming what differs), takes rank 0's initial weights (as DDP does), then one
   process group per holder set is created (same order on every rank).
2. cut.py: the model is cut in place into this worker's subnetwork (forward masking: dropped
   units are not allocated; backward masking: they are frozen).
3. reducer.py: during backward each (holder set, dtype) bucket of gradients is all-reduced as
   soon as it and the buckets before it are ready, overlapping the rest of backward; at its end
   every gradient is the average over its unit's holders.
4. weights.py (backward masking): after ``optimizer.step()`` (before the model's next forward,
   from a forward pre-hook on it, or an explicit ``sync_weights()``) each unit's first holder
   sends its new values to all (one all-gather). sharding.py (``shard=True``): gradients are
   reduce-scattered into per-holder shards, the optimizer steps the shards (``parameters()``),
   and the updated shards are all-gathered into the weights the same way. shared_weights.py
   (``shard_shared_weights``): the shared weights are kept as shards too, gathered just before
   each use and freed after (ZeRO-3).
5. assembly.py: the full model (and optimizer state) from the pieces, and back.
6. redraw.py (``redraw()``): a new plan during training; the units that change hands move, with
   their optimizer state, one at a time.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import assembly, evaluation, redraw, reducer, sharding, weights
from .errors import SDPConfigError
from .exchange import ProcessGroupExchange
from .planning import budget_for_masking, check_arguments, plan_model, warn_if_disconnected
from .shared_weights import SharedWeights
from .subnetwork import Subnetwork, check_device


class SubnetworkDataParallel(Subnetwork):
    """Wrap ``model`` so that this worker trains only its subnetwork (see the module docstring).

    Args:
        model: a plain PyTorch module, the same full model on every rank (same init); cut in place.
        blocks: block level. A dotted path to an ``nn.ModuleList``/``nn.Sequential`` of residual
            blocks, or a list of dotted block paths. Each block is one unit.
        neurons: neuron level. Same form as ``blocks``; the hidden-neuron groups inside each named
            block are the units (MLP neurons, attention heads, inner conv channels).
        coverage: C in (0, 1], the fraction of units each worker holds; each unit has
            k = round(C * N) holders. C = 1 is DDP. Or one value per rank (``[1, 1, 0.5, 0.5]``):
            k = round(sum), each worker's share of the units in proportion (``plan.plan_targeted``).
        masking: ``"forward"`` (train the subnetwork) or ``"backward"`` (full forward, gradients
            and optimizer state only for held units).
        seed: plan seed; all ranks must pass the same.
        process_group: the workers (default: the world).
        scale: train-time scaling of kept blocks/neuron groups under forward masking: ``"none"`` or
            ``"inverse-coverage"`` (branch or hidden activations times N/k, as inverted dropout).
            The assembled full model is always evaluated unscaled.
        neuron_groups: groups per neuron site (default: N; capped by the site's hidden units).
        example_input: a batch (tensor, tuple of positional args, or dict of keyword args) used once
            to count each unit's forward FLOPs, so the plan balances compute as well as parameters,
            and to check that untraceable blocks keep their input's shape.
        timeout: seconds after which a collective that has not completed (a dead or stuck peer)
            raises ``CollectiveError`` naming it.
        sync_weights_after_step: backward masking or ``shard``: after a synced backward (so after
            the step that follows it), share the updated weights before the model's next forward (a
            forward pre-hook on ``model``), ``full_state_dict()`` or checkpoint; every rank must then run
            that forward, as under FSDP2. Turn off to call ``sync_weights()`` yourself.
        bucket_cap_mb: gradients are all-reduced in buckets of about this size per holder set,
            each issued as soon as backward has produced its gradients (as DDP's buckets are).
        shard: ZeRO-2 inside holder sets (``sharding.py``): each bucket held by k > 1 workers
            is reduce-scattered, and each holder keeps the gradient and optimizer state of 1/k of
            it (shared parameters: 1/N). ``parameters()`` are then those shards (as FSDP2's
            are); the optimizer must be elementwise (SGD, Adam, AdamW, ...).
        shard_shared_weights: with ``shard``, ZeRO-3 for the shared parameters
            (``shared_weights.py``): each worker keeps 1/N of their weights too; a module's shared
            weights are all-gathered just before its forward (and, where its backward reads them,
            before that), with the next one prefetched, and freed after.
        reduce_dtype: send gradients in this dtype (``torch.bfloat16`` or ``torch.float16``):
            half the bytes; each bucket is divided by its holder count, cast, reduced and cast
            back (DDP's compression hooks; FSDP2's ``reduce_dtype``). None: the gradients' dtype.
        memory_budget: one size per rank (bytes, or strings such as ``"2GiB"``), or a
            ``plan.MemoryBudget`` with the memory model's assumptions (optimizer states per
            parameter, masking): block level, one ``coverage`` (it sets k), and ``example_input``
            one worker's training batch (its saved activations are counted on it). The plan keeps
            every worker's predicted peak within its budget, or raises ``PlanError`` naming the
            shortfall. The plan is then heterogeneous: ``redraw`` refuses it.
    """

    def __init__(self, model: nn.Module, *, blocks: str | Sequence[str] | None = None,
                 neurons: str | Sequence[str] | None = None, coverage: float = 0.5,
                 masking: str = "forward", seed: int = 0,
                 process_group: dist.ProcessGroup | None = None, scale: str = "none",
                 neuron_groups: int | None = None, example_input: Any = None,
                 timeout: float = 600.0, sync_weights_after_step: bool = True, bucket_cap_mb: float = 25.0,
                 shard: bool = False, shard_shared_weights: bool = False,
                 reduce_dtype: torch.dtype | None = None, memory_budget: Any = None) -> None:
        check_arguments(blocks=blocks, neurons=neurons, coverage=coverage, masking=masking, scale=scale,
                        timeout=timeout, reduce_dtype=reduce_dtype)
        if not dist.is_available() or not dist.is_initialized():
            raise SDPConfigError("torch.distributed is not initialised: call dist.init_process_group() first "
                                 "(torchrun sets it up), or use subnetdp.SubnetworkSimulator for N virtual "
                                 "workers in one process")
        exchange = ProcessGroupExchange(process_group, timeout)
        device = check_device(model, exchange.backend)
        if exchange.world_size == 1:
            warnings.warn("SubnetworkDataParallel on a world of one worker: every unit is held by that worker, "
                          "so SDP is plain (non-distributed) training", stacklevel=2)
        units, plan = plan_model(model, exchange.world_size, blocks=blocks, neurons=neurons, coverage=coverage,
                                 seed=seed, neuron_groups=neuron_groups, example_input=example_input,
                                 memory_budget=budget_for_masking(memory_budget, masking))
        warn_if_disconnected(plan)
        exchange.check_same_plan(plan, device)  # before any group exists: a mismatch never hangs
        exchange.broadcast_from_first(list(model.state_dict().values()))
        exchange.create_groups(plan.holder_sets)
        super().__init__(model, units, plan, exchange.rank, masking=masking, scale=scale,
                         bucket_cap_mb=bucket_cap_mb, shard=shard, shard_shared_weights=shard_shared_weights,
                         reduce_dtype=reduce_dtype)
        self.seed, self.exchange = seed, exchange
        self.reducer = reducer.GradientReducer(self.rank, self.buckets, exchange)
        self._hook_handles = self._register_hooks(sync_weights_after_step and (masking == "backward" or shard))
        if self.freed_shards:
            exchange.create_weight_group()
            self.shared_weights = SharedWeights(model, self.freed_shards, self._gather_shard)
            self._hook_handles += self.shared_weights.handles
        weakref.finalize(self, _remove_all, self._hook_handles)
        exchange.bytes_sent, exchange.wire_bytes = 0, 0.0  # counted from here: set-up is not training

    def _register_hooks(self, weights_after_step: bool) -> list[Any]:
        # through a weak reference: a hook must not keep the wrapper (and with it the whole model)
        # alive after the user drops it; gc cannot see cycles through tensor hooks. The handles are
        # removed when the wrapper goes away (weakref.finalize).
        this = weakref.ref(self)

        def grad_ready(param: torch.Tensor) -> None:
            sdp = this()
            if sdp is not None:
                sdp.reducer.grad_ready(param)

        handles = [p.register_post_accumulate_grad_hook(grad_ready) for p in self.trained_parameters()]
        self._auto_sync = weights_after_step
        if weights_after_step:
            # the weights the optimizer stepped are shared before the model's next forward (as
            # FSDP2 gathers its shards in a forward pre-hook), on the model itself, so a trainer
            # that calls the inner model (transformers.Trainer) syncs too
            def before_forward(module: nn.Module, args: Any) -> None:
                sdp = this()
                if sdp is not None:
                    sdp.sync_weights_if_stepped()

            handles.append(self.module.register_forward_pre_hook(before_forward))
        self._synced_after = self.reducer.backwards
        return handles

    def _gather_shard(self, shard: sharding.Shard) -> Any:
        """All-gather a freed shared buffer (allocated) from every worker's shard."""
        weights = shard.weights
        assert weights is not None
        if self.exchange.backend == "fake":  # nothing moves: every part takes this rank's values
            weights.view(len(shard.holders), shard.size).copy_(shard.param.detach())
        return self.exchange.all_gather_weights(shard.param.detach(), weights, "shared-weight all_gather")

    def weights_loaded(self) -> None:
        super().weights_loaded()
        self._synced_after = self.reducer.backwards  # a load is not a step: nothing to share

    def sync_weights_if_stepped(self) -> None:
        """``sync_weights()`` if an optimizer stepped since the last one (sync_weights_after_step)."""
        # after a synced backward (a collective: every rank agrees), whatever the optimizer (fused
        # ones update the weights without the in-place counters a version check would read)
        if self._auto_sync and self.reducer.backwards != self._synced_after:
            self.sync_weights()

    def redraw(self, seed: int, optimizer: torch.optim.Optimizer) -> int:
        """Re-draw the plan with ``seed`` (collective; every rank passes the same seed): the units
        that change hands move with their optimizer state, ``optimizer`` (over ``parameters()``) now
        steps this worker's new subnetwork. Block level, forward masking, unsharded only (see
        redraw.py). Returns the bytes moved, the same on every rank; ``comm_bytes`` counts them too."""
        redraw.check_redrawable(self, {self.rank: optimizer})
        new_plan = redraw.replan(self.plan, seed)
        self.exchange.check_same_plan(new_plan, self.device)
        self.exchange.create_groups(new_plan.holder_sets)
        moved = redraw.redraw({self.rank: self}, {self.rank: optimizer}, new_plan, self.exchange)
        self.seed = seed
        self.reducer = reducer.GradientReducer(self.rank, self.buckets, self.exchange)
        _remove_all(self._hook_handles)
        self._hook_handles[:] = self._register_hooks(False)
        return moved

    @property
    def comm_bytes(self) -> int:
        """Bytes this worker has handed to collectives (gradients, weights, assembly)."""
        return self.exchange.bytes_sent

    @property
    def wire_bytes(self) -> float:
        """Bytes this worker has sent for those collectives under a ring model
        (``exchange.ring_wire_bytes``)."""
        return self.exchange.wire_bytes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.reducer.reset()  # a backward that raised before its callback must not block the next
        return self.module(*args, **kwargs)  # its forward pre-hook syncs stepped weights first

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (as DDP's no_sync); the next backward outside averages."""
        previous, self.reducer.enabled = self.reducer.enabled, False
        try:
            yield
        finally:
            self.reducer.enabled = previous

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the gradient norm of the full model, the same on every worker (collective: call
        it on every rank after backward). Returns the norm before clipping."""
        return reducer.clip_grad_norm_({self.rank: self.buckets}, {self.rank: self.shard_parameters()},
                                       self.exchange, self.world_size, max_norm, self.device)

    def sync_weights(self) -> None:
        """After ``optimizer.step()`` (with ``sync_weights_after_step``, by itself before the
        model's next forward, ``full_state_dict()`` or checkpoint; collective): sharded, every
        holder's updated part of each bucket is all-gathered into the weights; backward masking,
        every unit's first holder sends its updated values to all workers (one all-gather), which
        then hold bitwise-identical full weights."""
        if self.sharded:
            sharding.gather_weights({self.rank: self.buckets}, self.exchange)
        if self.masking == "backward":
            weights.sync_weights({self.rank: self.layout}, self.exchange, self.world_size)
        self._synced_after = self.reducer.backwards

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The assembled full model on CPU, with the original model's keys (collective: call it on
        every rank). Each unit comes from its first holder; norm running statistics are averaged
        over the unit's holders (shared ones over all workers)."""
        self.sync_weights_if_stepped()
        with self.gathered():
            return assembly.full_state_dict({self.rank: self.layout}, self.exchange, self.world_size)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> assembly.OptimizerState:
        """The optimizer state of the full model, keyed by the full model's keys (collective)."""
        self.sync_weights_if_stepped()
        optimizers: dict[int, Any] = {self.rank: optimizer}
        if self.sharded:
            optimizers = sharding.unsharded_state({self.rank: self.buckets}, optimizers,
                                                  {self.rank: list(self.trained_parameters())}, self.exchange)
        return assembly.full_optimizer_state({self.rank: self.layout}, optimizers, self.exchange, self.world_size)

    def ensemble_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The ensemble view: given this worker's subnetwork output (``sdp(x)`` in eval mode) on a
        batch that every worker evaluates, the log of the mean over the N workers of their predicted
        probabilities (collective; a valid input for ``F.cross_entropy``)."""
        return evaluation.ensemble_log_probs({self.rank: logits}, self.exchange, self.world_size)


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
