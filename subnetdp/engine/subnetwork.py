"""One worker's subnetwork: the model cut for that worker, where each piece of the full model
lives there, and its gradient buckets. No communication: ``SubnetworkDataParallel`` adds the
process-group side, ``SubnetworkSimulator`` holds N of these in one process."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from . import assembly, sharding
from .cut import cut_model, meta_copy
from .errors import SDPConfigError
from .plan import Plan
from .planning import Units
from .reducer import make_buckets
from .shared_weights import SharedWeights
from .units import get_module


def check_device(model: nn.Module, backend: str | None) -> torch.device:
    """The one device the model's parameters are on, checked against the backend."""
    devices = {t.device.type for t in model.parameters()}
    if "meta" in devices:
        raise SDPConfigError("the model has parameters on the meta device; materialise it (to_empty + init) "
                             "before wrapping")
    if len(devices) > 1:
        raise SDPConfigError(f"the model's parameters are on several device kinds: {sorted(devices)}")
    kind = devices.pop() if devices else "cpu"
    if backend == "nccl" and kind != "cuda":
        raise SDPConfigError(f"the process group uses NCCL but the model is on {kind!r}; move the model to "
                             "its GPU first, or use the gloo backend on CPU")
    if backend == "gloo" and kind not in ("cpu", "cuda"):
        raise SDPConfigError(f"the gloo backend cannot move tensors on {kind!r}")
    return next(model.parameters()).device if kind == "cuda" else torch.device(kind)


def _freeable_weights(layout: Any, units: Units, plan: Plan, masking: str) -> set[int]:
    """The parameters whose weights ``shard_shared_weights`` may free between uses: whole ones
    held by every worker, except units under backward masking (its weight sync reads them) and, at
    block level with k < N, those inside a block (a worker that holds the block may checkpoint it
    and gather them in its recomputation while the others gather them from saved tensors: the
    ranks' gathers would differ in order)."""
    world = tuple(range(plan.world_size))
    blocks = list(units.blocks) if units.level == "block" and plan.k < plan.world_size else []
    out = set()
    for piece in layout.pieces:
        if piece.holders != world or not piece.is_param or (piece.unit is not None and masking == "backward"):
            continue
        if any(piece.key.startswith(block + ".") for block in blocks):
            continue
        location = layout.trainable(piece)
        if location is not None and location.dim is None:
            out.add(id(location.tensor))
    return out


class Subnetwork(nn.Module):
    """Worker ``rank``'s subnetwork of ``model`` under ``plan`` (the model is cut in place)."""

    def __init__(self, model: nn.Module, units: Units, plan: Plan, rank: int, *, masking: str = "forward",
                 scale: str = "none", bucket_cap_mb: float = 25.0, shard: bool = False,
                 shard_shared_weights: bool = False, reduce_dtype: torch.dtype | None = None) -> None:
        if shard_shared_weights and not shard:
            raise SDPConfigError("shard_shared_weights=True shards the shared weights on top of shard=True: pass "
                                 "shard=True too")
        super().__init__()
        self.device = check_device(model, None)
        self.module = model
        self.plan, self.rank, self.world_size = plan, rank, plan.world_size
        self.level, self.coverage, self.masking, self.scale = units.level, plan.coverage, masking, scale
        self.units, self.bucket_cap_mb, self.reduce_dtype = units, bucket_cap_mb, reduce_dtype
        # meta copies of the blocks this worker does not hold, for a re-drawn plan (redraw.py): they
        # allocate nothing, and a dropped block cannot be rebuilt from the module that replaces it
        held = set(plan.held_units(rank))
        self.templates: dict[str, nn.Module] = (
            {path: meta_copy(get_module(model, path)) for path in units.blocks if path not in held}
            if units.level == "block" and masking == "forward" else {})
        self.layout = cut_model(model, units, plan, rank, masking, scale)
        self.buckets = make_buckets(self.layout, bucket_cap_mb, split_shared=shard_shared_weights)
        for bucket_list in self.buckets.values():
            for bucket in bucket_list:
                bucket.reduce_dtype = reduce_dtype if reduce_dtype != bucket.dtype else None
        freeable = _freeable_weights(self.layout, units, plan, masking) if shard_shared_weights else None
        self.shards = sharding.make_shards(self.buckets, rank, freeable) if shard else []
        # ZeRO-3 of the shared weights: set by the wrapper or simulator, which know how to gather
        self.shared_weights: SharedWeights | None = None

    @property
    def freed_shards(self) -> list[sharding.Shard]:
        """The shards whose flat buffer is freed between uses (``shard_shared_weights``)."""
        return [s for s in self.shards if s.frees_weights]

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.state_dict`` of the cut model; refused while ``shard_shared_weights`` has
        freed the shared weights (reading them would read freed memory): take
        ``full_state_dict()``, ``subnetdp.checkpoint``, or call it inside ``gathered()``."""
        if any(not s.gathered for s in self.freed_shards):
            raise SDPConfigError("state_dict(): under shard_shared_weights the shared weights are freed between "
                                 "uses; take full_state_dict() or subnetdp.checkpoint, or call it inside "
                                 "`with sdp.gathered():` (collective)")
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.load_state_dict`` of the cut model; refused under ``shard_shared_weights``
        (the shared weights are freed between uses): ``load_full_state_dict`` or ``subnetdp.checkpoint``."""
        if self.freed_shards:
            raise SDPConfigError("load_state_dict(): under shard_shared_weights the shared weights are freed between "
                                 "uses; use load_full_state_dict() or subnetdp.checkpoint.load")
        return super().load_state_dict(*args, **kwargs)

    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor this worker stores, as it stores it: the model's parameters and buffers,
        with the freed shared weights' (``shard_shared_weights``) replaced by this worker's part."""
        freed = {id(seg.tensor) for shard in self.freed_shards for seg in shard.bucket.segments}
        return ([p for p in self.module.parameters() if id(p) not in freed] + [s.param for s in self.freed_shards]
                + list(self.module.buffers()))

    def gathered(self) -> contextlib.AbstractContextManager[None]:
        """The shared weights whole inside the block (collective under ``shard_shared_weights``)."""
        return self.shared_weights.gathered() if self.shared_weights is not None else contextlib.nullcontext()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """What the optimizer steps (as FSDP2's ``parameters()`` are its shards): with
        ``shard=True`` this worker's part of every bucket held by several workers (flat
        parameters) plus the parameters only it holds; otherwise ``trained_parameters()``."""
        return iter(self.shard_parameters()) if self.sharded else self.trained_parameters(recurse)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """``parameters()`` with names: the model's under ``shard=False``; ``shards.I`` with it."""
        if self.sharded:
            return ((f"{prefix}{'.' if prefix else ''}shards.{i}", p) for i, p in enumerate(self.shard_parameters()))
        return ((n, p) for n, p in self.module.named_parameters(prefix, recurse, remove_duplicate)
                if p.requires_grad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The gradients of ``parameters()`` and, sharded, of the model's own parameters too (where
        backward under ``no_sync()`` leaves them)."""
        super().zero_grad(set_to_none)
        if self.sharded:
            self.module.zero_grad(set_to_none)

    def trained_parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The model's parameters this worker trains (held units and shared parameters); frozen
        copies that backward masking keeps for the forward pass are left out."""
        return (p for p in self.module.parameters(recurse) if p.requires_grad)

    @property
    def sharded(self) -> bool:
        return bool(self.shards)

    def shard_parameters(self) -> list[nn.Parameter]:
        """``list(parameters())``: the name from before ``parameters()`` gave the shards itself."""
        params = list(self.trained_parameters())
        return sharding.shard_parameters(self.buckets, params) if self.sharded else params

    @property
    def held_units(self) -> list[str]:
        return self.plan.held_units(self.rank)

    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a full-model state dict (original keys) into this subnetwork; local, no communication."""
        self.allocate_freed_weights()  # written whole below; this worker keeps its part (weights_loaded)
        try:
            assembly.load_full_state_dict(self.layout, state)
        except BaseException:
            for shard in self.freed_shards:  # the shards still hold the weights as they were
                shard.free()
            raise
        self.weights_loaded()

    def allocate_freed_weights(self) -> None:
        """``shard_shared_weights``: every freed buffer allocated (after any gather in flight),
        for a local write of all its entries; ``weights_loaded()`` then keeps this worker's part."""
        if self.shared_weights is not None:
            self.shared_weights.free_all()
        for shard in self.freed_shards:
            shard.allocate_zeroed_padding()

    def weights_loaded(self) -> None:
        """The weights were written from outside a step (a load): shards that copy them re-read them;
        under ``shard_shared_weights`` this worker keeps its part of each written buffer, then frees it."""
        for shard in self.shards:
            if shard.frees_weights:
                if shard.gathered:
                    shard.keep_own_part()
                if self.shared_weights is not None:
                    self.shared_weights.free(shard)
                else:
                    shard.free()
            else:
                shard.read_weights()

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, state: assembly.OptimizerState) -> None:
        """Give ``optimizer`` (over ``parameters()``) the state of what this worker trains,
        from a full optimizer state (``full_optimizer_state()``), possibly under another plan."""
        if not self.sharded:
            assembly.load_full_optimizer_state(self.layout, optimizer, state)
            return
        unsharded = sharding.UnshardedState(list(self.trained_parameters()))
        assembly.load_full_optimizer_state(self.layout, unsharded, state)  # type: ignore[arg-type]
        sharding.load_sharded_state(self.buckets, optimizer, unsharded)

    def local_full_state_dict(self) -> dict[str, torch.Tensor]:
        """Backward masking: this worker's own copy of the full model (no communication). After
        ``sync_weights()`` the parameters are bitwise identical on every worker; norm running
        statistics are this worker's own. Collective under ``shard_shared_weights`` (a gather)."""
        with self.gathered():
            return assembly.local_full_state_dict(self.layout)

    def held_bytes(self) -> dict[str, int]:
        """Bytes of this worker's trainable parameters, their gradients, all parameters (including
        frozen copies under backward masking) and buffers, counted from the live tensors."""
        trainable = list(self.trained_parameters())
        freed = {id(s.tensor) for shard in self.freed_shards for s in shard.bucket.segments}
        resident = sum(s.weights.untyped_storage().nbytes() + s.param.numel() * s.param.element_size()
                       for s in self.freed_shards if s.weights is not None)  # buffers as they are now, shards
        return {
            "trainable_params": sum(p.numel() * p.element_size() for p in trainable if id(p) not in freed) + resident,
            "grads": sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None),
            "all_params": sum(p.numel() * p.element_size() for p in self.module.parameters() if id(p) not in freed)
            + resident,
            "buffers": sum(b.numel() * b.element_size() for b in self.buffers()),
        }

    def extra_repr(self) -> str:
        return (f"level={self.level}, masking={self.masking}, coverage={self.coverage:g}, "
                f"rank={self.rank}/{self.world_size}, units held={len(self.held_units)}/{len(self.plan.holders)}")
