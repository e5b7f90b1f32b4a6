"""ZeRO-3 for the shared parameters (``shard_shared_weights=True``, on top of ``shard=True``).

The shared parameters (embeddings, head, final norm, stem, shortcuts) are held by all N workers, so
under ``shard=True`` their gradients and optimizer state are split N ways but every worker still
keeps their weights whole. Here each worker keeps only its 1/N of those weights too: the flat
buffer their parameters are views of (``sharding.Shard.weights``) has its storage freed between
uses, and is all-gathered just before use, as FSDP does:

- forward: a forward pre-hook on every module that owns one of them gathers its buckets (the
  shared buckets are cut at module boundaries: ``reducer.make_buckets(split_shared=...)``); they
  are freed when the next such module starts, or the forward ends (so a module called several
  times in a row, as a chunked loss calls the head, gathers once);
- backward: a saved-tensor hook replaces every tensor autograd saves that lives in a freed buffer
  by its place in the buffer; unpacking it gathers the buffer first. A module whose backward does
  not read its weights (an embedding) is never gathered in backward. A buffer is freed once all
  its parameters have their gradient (nothing later in backward reads it), or at the end of backward;
- prefetch: the next bucket in the order the previous pass needed them is gathered (asynchronously)
  as soon as one is, so the collective overlaps the compute in between; at most one bucket ahead.

The optimizer steps the shards (separate tensors here), and the next forward gathers them, so no
weight all-gather follows the step. Reading or writing the weights from outside a forward (state
dicts, checkpoints, assembly) goes through ``gathered()`` (collective) or a local load that keeps
this worker's part.

Every worker runs the same shared modules in the same order, and only those modules' hooks and
their parameters' gradients free or gather, so every rank issues the same gathers in the same
order (the blocks a worker holds decide nothing here): in backward, whether a gather is needed
depends only on which saved tensors backward reads and when each shared gradient is complete,
the same on every rank, as the shared modules' part of the graph is the same on every worker.
The wrapper runs these gathers on a process group of their own (``exchange.create_weight_group``):
how they interleave with the gradient reduce-scatters depends on the blocks a worker holds.

Rule for models: a shared parameter must be used inside the forward of the module that owns it
(true of ``nn.Linear``, ``nn.Embedding``, norms, convolutions, Hugging Face and torchvision models;
a tied head is the embedding's parameter owned by the head module too).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import SDPConfigError
from .exchange import Pending
from .sharding import Shard

GatherFn = Callable[[Shard], Pending]  # starts the all-gather of a shard's buffer (already allocated)


class SharedWeights:
    """One worker's freed shared buffers and the hooks that gather them before use."""

    def __init__(self, model: nn.Module, shards: Sequence[Shard], gather: GatherFn) -> None:
        self.shards, self.gather_fn = list(shards), gather
        owner = {id(s.tensor): shard for shard in self.shards for s in shard.bucket.segments}
        self.by_storage: dict[int | None, Shard] = {shard.weights_storage_id: shard for shard in self.shards}
        self.pending: dict[int, Pending] = {}                       # id(shard) -> gather in flight
        self.order: dict[str, list[Shard]] = {"forward": [], "backward": []}  # as the last pass needed them
        self.recording: dict[str, list[Shard]] = {"forward": [], "backward": []}
        self.free_queued = False
        self.releasable: list[Shard] = []  # used by a shared module whose forward has returned
        self.handles: list[Any] = []
        users = 0
        for module in model.modules():
            used: list[Shard] = []
            for p in module._parameters.values():
                shard = owner.get(id(p)) if p is not None else None
                if shard is not None and shard not in used:
                    used.append(shard)
            if used:
                users += 1
                self.handles.append(module.register_forward_pre_hook(self._before_module(used)))
                self.handles.append(module.register_forward_hook(self._after_module(used), always_call=True))
        # backward frees a buffer once every parameter in it has its gradient: no later use reads it
        self.params_of = {id(shard): {id(seg.tensor) for seg in shard.bucket.segments} for shard in self.shards}
        self.waiting: dict[int, set[int]] = {}
        this = weakref.ref(self)  # tensor hooks are held from C++, where gc cannot see a cycle

        def accumulated(index: int) -> Callable[[torch.Tensor], None]:
            def hook(param: torch.Tensor) -> None:  # by index: the shard's bucket holds this very tensor
                weights = this()
                if weights is not None:
                    weights._accumulated(weights.shards[index], param)
            return hook
        for index, shard in enumerate(self.shards):
            for seg in shard.bucket.segments:
                self.handles.append(seg.tensor.register_post_accumulate_grad_hook(accumulated(index)))
        # reading a freed buffer would read freed memory (a crash, not an error): refused instead
        self.handles.append(model.register_state_dict_pre_hook(self._refuse_if_freed))
        self.handles.append(model.register_load_state_dict_pre_hook(self._refuse_if_freed))
        if self.shards and not users:
            raise SDPConfigError("shard_shared_weights: no module owns the shared parameters")
        self._saved_hooks: list[Any] = []
        # first of the model's pre-hooks: it frees, then the model's own gathers (a class token it owns)
        self.handles.append(model.register_forward_pre_hook(self._enter_forward, prepend=True))
        self.handles.append(model.register_forward_hook(self._exit_forward, always_call=True))

    # -- forward ----------------------------------------------------------------------------
    def _enter_forward(self, module: nn.Module, args: Any) -> None:
        if not _in_backward():
            # every forward starts from freed buffers, on every rank alike: nothing gathered outside
            # a forward (a checkpoint, a backward that raised) is trusted across an optimizer step
            self.free_all()
            self.free_queued = False
        self._finish_recording("forward")
        if torch.is_grad_enabled():
            self.waiting.clear()  # a backward that left a parameter without gradient counts for nothing
            # chained to the hooks active around the forward (save_on_cpu, a memory tracker), which
            # still see every other saved tensor
            outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
            outer_pack, outer_unpack = outer if outer is not None else (None, None)

            def pack(t: torch.Tensor) -> Any:
                shard = self.by_storage.get(_storage_id(t))
                if shard is not None:
                    return _InBuffer(shard, t.size(), t.stride(), int(t.storage_offset()))
                return outer_pack(t) if outer_pack is not None else t

            def unpack(packed: Any) -> torch.Tensor:
                if isinstance(packed, _InBuffer):
                    return self._unpack(packed)
                return outer_unpack(packed) if outer_unpack is not None else packed

            hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
            hooks.__enter__()
            self._saved_hooks.append(hooks)

    def _exit_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not _in_backward():
            for shard in self.releasable:
                self.free(shard)
            self.releasable = []
        if self._saved_hooks:
            self._saved_hooks.pop().__exit__(None, None, None)

    def _before_module(self, shards: list[Shard]) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            phase = "backward" if _in_backward() else "forward"
            if phase == "forward":
                # what the previous shared module used is freed now, not after its forward: a
                # module called several times in a row (a chunked loss's head) keeps its weights
                for shard in [s for s in self.releasable if s not in shards]:
                    self.releasable.remove(shard)
                    self.free(shard)
            for shard in shards:
                self.ensure(shard, phase)
        return hook

    def _after_module(self, shards: list[Shard]) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if _in_backward():
                return  # a recomputation (activation checkpointing) inside backward: freed at its end
            self.releasable += [s for s in shards if s not in self.releasable]
        return hook

    # -- backward ---------------------------------------------------------------------------
    def _unpack(self, packed: _InBuffer) -> torch.Tensor:
        self.ensure(packed.shard, "backward")
        assert packed.shard.weights is not None
        return packed.shard.weights.as_strided(packed.size, packed.stride, packed.offset)

    def _accumulated(self, shard: Shard, param: torch.Tensor) -> None:
        waiting = self.waiting.setdefault(id(shard), set(self.params_of[id(shard)]))
        waiting.discard(id(param))
        if not waiting:
            del self.waiting[id(shard)]
            self.free(shard)

    def _refuse_if_freed(self, module: nn.Module, *args: Any) -> None:
        if any(not s.gathered for s in self.shards):
            raise SDPConfigError("state_dict()/load_state_dict() of a model under shard_shared_weights: its shared "
                                 "weights are freed between uses; use the wrapper's full_state_dict() / "
                                 "load_full_state_dict() or subnetdp.checkpoint, or call it inside "
                                 "`with sdp.gathered():` (collective)")

    def _end_of_backward(self) -> None:
        self.waiting.clear()
        self.free_queued = False
        self._finish_recording("backward")
        for shard in self.shards:
            self.free(shard)

    # -- gathering --------------------------------------------------------------------------
    def ensure(self, shard: Shard, phase: str) -> None:
        """``shard``'s weights whole in its buffer: wait for its prefetch, or gather it now; then
        prefetch the bucket the last pass needed next."""
        if phase == "backward" and not self.free_queued:
            self.free_queued = True  # what backward gathers is freed once it has finished
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        pending = self.pending.pop(id(shard), None)
        if pending is not None:
            pending.wait()
        elif not shard.gathered:
            self._start(shard).wait()
            self.pending.pop(id(shard), None)
        else:
            return
        if shard not in self.recording[phase]:
            self.recording[phase].append(shard)
        order = self.order[phase]
        if shard in order:
            i = order.index(shard)
            if i + 1 < len(order):
                following = order[i + 1]
                if not following.gathered and id(following) not in self.pending:
                    self._start(following)

    def _start(self, shard: Shard) -> Pending:
        shard.allocate()
        pending = self.gather_fn(shard)
        self.pending[id(shard)] = pending
        return pending

    def free(self, shard: Shard) -> None:
        pending = self.pending.pop(id(shard), None)
        if pending is not None:
            pending.wait()  # a buffer a collective writes into is not freed under it
        shard.free()

    def _finish_recording(self, phase: str) -> None:
        if self.recording[phase]:
            self.order[phase] = self.recording[phase]
        self.recording[phase] = []

    def gather_all(self) -> None:
        """Every freed buffer gathered (collective), in bucket order."""
        started = [self._start(s) for s in self.shards if not s.gathered and id(s) not in self.pending]
        for s in self.shards:
            pending = self.pending.pop(id(s), None)
            if pending is not None:
                pending.wait()
        del started

    def free_all(self) -> None:
        for shard in self.shards:
            self.free(shard)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """The shared weights whole inside the block (collective on entry), freed after."""
        self.gather_all()
        try:
            yield
        finally:
            self.free_all()

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def resident_bytes(self) -> int:
        return sum(s.weights.untyped_storage().nbytes() for s in self.shards if s.weights is not None)


class _InBuffer:
    """A saved tensor that is a view of a shared buffer: where it lies in it."""

    __slots__ = ("shard", "size", "stride", "offset")

    def __init__(self, shard: Shard, size: torch.Size, stride: tuple[int, ...], offset: int) -> None:
        self.shard, self.size, self.stride, self.offset = shard, size, stride, offset


def _storage_id(t: torch.Tensor) -> int | None:
    """The tensor's storage (``_cdata``), None for those without one (sparse, some subclasses)."""
    if t.layout is not torch.strided:
        return None
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1
