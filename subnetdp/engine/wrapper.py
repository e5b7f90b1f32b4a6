"""SubnetworkDataParallel: DDP's training loop, with each worker training only its subnetwork.

    sdp = SubnetworkDataParallel(model, blocks="model.layers", coverage=0.5, masking="forward")
    opt = torch.optim.AdamW(sdp.parameters(), lr=3e-4)      # only what this worker holds
    loss_fn(sdp(x), y).backward(); opt.step(); opt.zero_grad()
    state = sdp.full_state_dict()                            # the whole model, original keys

What happens, in order:
1. ``__init__`` finds the units (blocks, or neuron groups inside blocks), computes the plan locally
   and checks with an all-gather that every rank computed the same one, creates one process group
   per distinct holder set (same order on every rank), then cuts the model in place:
   - forward masking: dropped blocks are replaced by their shortcut; neuron groups are sliced out of
     the weight tensors. The worker never keeps parameters, gradients or optimizer state of units
     it does not hold.
   - backward masking: the full model stays; parameters of units not held are frozen (blocks) or
     split into a trainable held slice and a frozen rest (neurons), so no gradient or optimizer
     state exists for them.
2. ``backward()``: when the first gradient is accumulated, a callback is queued on the autograd
   engine; at the end of backward it all-reduces one flat bucket per holder set (async, all sets
   in flight at once) and divides by the set's size: each unit's gradient is averaged over its
   holders only, shared parameters over all workers.
3. backward masking only: after ``optimizer.step()`` (a global optimizer hook, or an explicit
   ``sync_weights()``) each unit's first holder broadcasts its new values, so every worker has the
   full current model, bitwise identical, for the next forward.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.flop_counter import FlopCounterMode

from .errors import CollectiveError, PlanMismatchError, SDPConfigError
from .layout import Piece, flatten, narrow_ranges, unflatten_into
from .plan import Plan, UnitCost, make_plan
from .units import (BlockInfo, NeuronSite, analyse_block, find_neuron_sites, get_module,
                    refresh_shape_attributes, resolve_block_paths)

BucketKey = tuple[tuple[int, ...], torch.dtype]


def _split_key(key: str) -> tuple[str, str]:
    module, _, name = key.rpartition(".")
    return module, name


class SubnetworkDataParallel(nn.Module):
    """Wrap ``model`` so that this worker trains only its subnetwork (see the module docstring).

    Args:
        model: a plain PyTorch module, the same full model on every rank (same init); cut in place.
        blocks: block level. A dotted path to an ``nn.ModuleList``/``nn.Sequential`` of residual
            blocks, or a list of dotted block paths. Each block is one unit.
        neurons: neuron level. Same form as ``blocks``; the hidden-neuron groups inside each named
            block are the units (MLP neurons, attention heads, inner conv channels).
        coverage: C in (0, 1], the fraction of units each worker holds; each unit has
            k = round(C * N) holders. C = 1 is DDP.
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
        bucket_cap_mb: gradients are all-reduced in buckets of about this size per holder set,
            each issued as soon as backward has produced its gradients, so the sync overlaps the
            rest of backward (as DDP's buckets do).
        sync_weights_after_step: backward masking: broadcast updated units after every optimizer
            step that updates this module's parameters. Turn off to call ``sync_weights()`` yourself
            (e.g. with several optimizers).
    """

    def __init__(self, model: nn.Module, *, blocks: str | Sequence[str] | None = None,
                 neurons: str | Sequence[str] | None = None, coverage: float = 0.5,
                 masking: str = "forward", seed: int = 0,
                 process_group: dist.ProcessGroup | None = None, scale: str = "none",
                 neuron_groups: int | None = None, example_input: Any = None,
                 timeout: float = 600.0, sync_weights_after_step: bool = True, bucket_cap_mb: float = 25.0,
                 _virtual_rank: int | None = None, _virtual_world_size: int | None = None,
                 _plan_only: bool = False) -> None:
        super().__init__()
        if (blocks is None) == (neurons is None):
            raise SDPConfigError("pass exactly one of blocks= (block level) or neurons= (neuron level)")
        if masking not in ("forward", "backward"):
            raise SDPConfigError(f"masking must be 'forward' or 'backward', got {masking!r}")
        if scale not in ("none", "inverse-coverage"):
            raise SDPConfigError(f"scale must be 'none' or 'inverse-coverage', got {scale!r}")
        if not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
            raise SDPConfigError(f"coverage must be in (0, 1], got {coverage!r}")
        if timeout <= 0:
            raise SDPConfigError(f"timeout must be positive seconds, got {timeout}")
        self.level = "block" if blocks is not None else "neuron"
        self.masking, self.coverage, self.seed, self.scale = masking, float(coverage), seed, scale
        self.timeout = datetime.timedelta(seconds=timeout)
        self.virtual = _virtual_rank is not None
        if self.virtual:
            self.rank, self.world_size = int(_virtual_rank), int(_virtual_world_size or 1)
            self._global_ranks = list(range(self.world_size))
            self._backend = None
        else:
            if not dist.is_available() or not dist.is_initialized():
                raise SDPConfigError("torch.distributed is not initialised: call "
                                     "dist.init_process_group() first (torchrun sets it up), or use "
                                     "subnetdp.SubnetworkSimulator for N virtual workers in one process")
            pg = process_group or dist.group.WORLD
            self.rank, self.world_size = dist.get_rank(pg), dist.get_world_size(pg)
            self._global_ranks = dist.get_process_group_ranks(pg)
            self._backend = dist.get_backend(pg)
        self._check_device(model)
        k_raw = math.floor(self.coverage * self.world_size + 0.5)
        if k_raw == 0:
            raise SDPConfigError(
                f"coverage {self.coverage} with {self.world_size} workers gives round(C*N) = 0 holders "
                f"per unit; the smallest coverage for N={self.world_size} is 1/N = {1 / self.world_size:.4g}")
        if self.world_size == 1 and not self.virtual:
            warnings.warn("SubnetworkDataParallel on a world of one worker: every unit is held by that "
                          "worker, so SDP is plain (non-distributed) training", stacklevel=2)
        self.module = model
        self._blocks: dict[str, BlockInfo] = {}
        self._sites: list[NeuronSite] = []
        paths = resolve_block_paths(model, blocks if blocks is not None else neurons)  # type: ignore[arg-type]
        if self.level == "block":
            self._blocks = {p: analyse_block(get_module(model, p), p) for p in paths}
        else:
            for p in paths:
                self._sites.extend(find_neuron_sites(model, p))
            for site in self._sites:
                site.split(neuron_groups or self.world_size)
        flops = self._inspect_example(example_input) if example_input is not None else None
        self.plan: Plan = self._make_plan(flops)
        if _plan_only:
            return
        self._full_meta = {k: (v.shape, v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
        self._pieces = self._make_pieces(model)
        self._groups: dict[tuple[int, ...], Any] = {}
        if not self.virtual:
            self._create_groups(process_group)
            self._check_plan_agreement()
        self._held = set(self.plan.held_units(self.rank))
        self._sliced: dict[tuple[str, str], dict] = {}  # (module, tensor) -> local layout info
        self._apply_masking()
        self._grad_segments = self._make_grad_segments()
        self.bucket_cap_mb = bucket_cap_mb
        self._chunks = self._make_chunks()
        self._chunks_of_param: dict[int, list[tuple[int, ...]]] = {}
        # how many segments of each parameter a multi-holder bucket carries, and whether that is all
        # of it (a parameter with a single-holder segment keeps its .grad)
        self._segments_per_param: dict[int, int] = {}
        for holders, chunk_list in self._chunks.items():
            for chunk in chunk_list:
                for p, _, _ in chunk.segments:
                    self._segments_per_param[id(p)] = self._segments_per_param.get(id(p), 0) + (
                        1 if len(holders) > 1 else 10 ** 9)
        self._unbucketed: dict[int, int] = {}
        for holders, chunk_list in self._chunks.items():
            for chunk in chunk_list:
                for pid in chunk.params:
                    if holders not in self._chunks_of_param.setdefault(pid, []):
                        self._chunks_of_param[pid].append(holders)
        self.comm_bytes = 0  # bytes this worker handed to collectives (gradients and weights)
        self._sync_enabled = True
        self._sync_queued = False
        self._auto_grad_sync = not self.virtual
        self._hook_handles: list[Any] = []
        # through a weak reference: a parameter's hook must not keep the wrapper (and with it the
        # whole model) alive after the user drops it; gc cannot see cycles through tensor hooks
        this = weakref.ref(self)

        def on_grad_ready(param: torch.Tensor) -> None:
            sdp = this()
            if sdp is not None:
                sdp._on_grad_ready(param)

        for p in self.parameters():
            self._hook_handles.append(p.register_post_accumulate_grad_hook(on_grad_ready))
        if self.masking == "backward" and sync_weights_after_step and not self.virtual:
            self._register_step_hook()

    # ------------------------------------------------------------------------------------------
    # set-up

    def _check_device(self, model: nn.Module) -> None:
        devices = {t.device.type for t in model.parameters()}
        if "meta" in devices:
            raise SDPConfigError("the model has parameters on the meta device; materialise it "
                                 "(to_empty + init) before wrapping")
        if len(devices) > 1:
            raise SDPConfigError(f"the model's parameters are on several device kinds: {sorted(devices)}")
        device = devices.pop() if devices else "cpu"
        if self._backend == "nccl" and device != "cuda":
            raise SDPConfigError(f"the process group uses NCCL but the model is on {device!r}; move "
                                 "the model to its GPU first, or use the gloo backend on CPU")
        if self._backend == "gloo" and device not in ("cpu", "cuda"):
            raise SDPConfigError(f"the gloo backend cannot move tensors on {device!r}")
        self.device = torch.device(device) if device != "cuda" else next(model.parameters()).device

    def _inspect_example(self, example_input: Any) -> dict[str, float]:
        """Count forward FLOPs per module and check shapes of untraceable blocks."""
        shapes: dict[str, tuple] = {}
        handles = []
        for path, info in self._blocks.items():
            if not info.traced:
                def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any, path: str = path) -> None:
                    x = args[0] if args else next(iter(kwargs.values()), None)
                    shapes[path] = (getattr(x, "shape", None), getattr(out, "shape", None))
                handles.append(get_module(self.module, path).register_forward_hook(hook, with_kwargs=True))
        with FlopCounterMode(display=False) as counter:
            self._probe(example_input, handles, grad=False)
        for path, (shape_in, shape_out) in shapes.items():
            if shape_in is None or shape_out is None or shape_in != shape_out:
                raise SDPConfigError(
                    f"block {path!r} maps input shape {tuple(shape_in or ())} to output shape "
                    f"{tuple(shape_out) if shape_out is not None else type(shape_out)} and has no traceable "
                    "shortcut: a dropped block must be able to pass its input through")
        root = type(self.module).__name__
        self._unit_activations = self._count_saved_activations(example_input) if self.level == "block" else {}
        return {name[len(root) + 1:] if name != root else "": float(sum(v.values()))
                for name, v in counter.get_flop_counts().items() if name.startswith(root)}

    def _count_saved_activations(self, example_input: Any) -> dict[str, float]:
        """Bytes that autograd saves for backward inside each block, on the example input (eval
        mode, so norm statistics are untouched; parameters are not counted)."""
        saved = {path: 0.0 for path in self._blocks}
        seen: set[int] = set()
        params = {p.data_ptr() for p in self.module.parameters()}
        current: list[str] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if current and ptr not in params and ptr not in seen:
                seen.add(ptr)
                saved[current[-1]] += t.untyped_storage().nbytes()
            return t

        handles = []
        for path in self._blocks:
            block = get_module(self.module, path)
            handles.append(block.register_forward_pre_hook(lambda m, a, path=path: current.append(path)))
            handles.append(block.register_forward_hook(lambda m, a, o: current.pop() and None))  # keep o
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._probe(example_input, handles, grad=True)
        return saved

    def _probe(self, example_input: Any, handles: list[Any], grad: bool) -> None:
        """One forward of the full model on the example input, in eval mode so that norm running
        statistics are untouched; removes ``handles`` and restores each module's mode after."""
        modes = {m: m.training for m in self.module.modules()}
        self.module.eval()
        try:
            with torch.set_grad_enabled(grad):
                if isinstance(example_input, Mapping):
                    self.module(**example_input)
                elif isinstance(example_input, tuple):
                    self.module(*example_input)
                else:
                    self.module(example_input)
        finally:
            for h in handles:
                h.remove()
            for module, training in modes.items():
                module.training = training

    def _make_plan(self, flops: dict[str, float] | None) -> Plan:
        model = self.module
        units: list[UnitCost] = []
        unit_param_ids: set[int] = set()
        if self.level == "block":
            for path, info in self._blocks.items():
                block = get_module(model, path)
                params = [(n, p) for n, p in block.named_parameters() if not info.is_shortcut_key(n)]
                unit_param_ids.update(id(p) for _, p in params)
                unit_flops = None
                if flops is not None:
                    unit_flops = flops.get(path, 0.0) - sum(flops.get(f"{path}.{m}", 0.0)
                                                            for m in info.shortcut_modules)
                units.append(UnitCost(path, sum(p.numel() for _, p in params),
                                      sum(p.numel() * p.element_size() for _, p in params), unit_flops,
                                      activations=getattr(self, "_unit_activations", {}).get(path)))
        else:
            for site in self._sites:
                site_params, site_bytes = 0, 0
                for spec in site.slices:
                    t = getattr(get_module(model, spec.module), spec.tensor)
                    if isinstance(t, nn.Parameter):
                        per_unit = t.numel() // t.shape[spec.dim] * spec.unit_width * spec.segments
                        site_params += per_unit
                        site_bytes += per_unit * t.element_size()
                for g, (a, b) in enumerate(site.groups):
                    width = b - a
                    f = None if flops is None else flops.get(site.path, 0.0) * width / site.hidden
                    units.append(UnitCost(site.unit_name(g), site_params * width, site_bytes * width, f,
                                          site=site.path, group=g, num_groups=len(site.groups)))
        total_params = sum(p.numel() for p in model.parameters())
        total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        unit_params = sum(u.params for u in units)
        unit_bytes = sum(u.bytes for u in units)
        shared_flops = None
        if flops is not None:
            shared_flops = max(0.0, flops.get("", 0.0) - sum(u.flops or 0.0 for u in units))
        return make_plan(units, self.world_size, self.coverage, self.seed, level=self.level,
                         shared_params=total_params - unit_params, shared_bytes=total_bytes - unit_bytes,
                         shared_flops=shared_flops)

    def _make_pieces(self, model: nn.Module) -> list[Piece]:
        """Every piece of the full model's state, identical on all ranks."""
        world = tuple(range(self.world_size))
        param_keys = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        slices = {(s.module, s.tensor): (site, s) for site in self._sites for s in site.slices}
        pieces: list[Piece] = []
        for key, (shape, _) in self._full_meta.items():
            is_param = key in param_keys
            if self.level == "block":
                unit = next((p for p in self._blocks if key.startswith(p + ".")), None)
                if unit is not None and not self._blocks[unit].is_shortcut_key(key[len(unit) + 1:]):
                    pieces.append(Piece(key, self.plan.holders[unit], is_param, unit=unit))
                else:
                    pieces.append(Piece(key, world, is_param))
            elif _split_key(key) in slices:
                site, spec = slices[_split_key(key)]
                for g, (a, b) in enumerate(site.groups):
                    unit = site.unit_name(g)
                    pieces.append(Piece(key, self.plan.holders[unit], is_param, unit=unit, spec=spec,
                                        full_ranges=tuple(spec.full_ranges(shape[spec.dim], a, b)),
                                        site=site, group=g))
            else:
                pieces.append(Piece(key, world, is_param))
        return pieces

    def _create_groups(self, process_group: dist.ProcessGroup | None) -> None:
        """One process group per distinct holder set, plus one for all workers, created on every
        rank in the same order (new_group is collective over the whole world)."""
        sets = sorted(set(self.plan.holder_sets) | {tuple(range(self.world_size))})
        for s in sets:
            ranks = [self._global_ranks[r] for r in s]
            group = dist.new_group(ranks=ranks, timeout=self.timeout, backend=self._backend)
            if self.rank in s:
                self._groups[s] = group

    @property
    def _world_group(self) -> Any:
        return self._groups[tuple(range(self.world_size))]

    def _comm_device(self) -> torch.device:
        return self.device  # CPU or CUDA: gloo moves both, NCCL was checked to have CUDA

    def _check_plan_agreement(self) -> None:
        digest = torch.tensor(list(bytes.fromhex(self.plan.fingerprint())), dtype=torch.uint8,
                              device=self._comm_device())
        gathered = [torch.empty_like(digest) for _ in range(self.world_size)]
        work = dist.all_gather(gathered, digest, group=self._world_group, async_op=True)
        self._wait(work, "all_gather of plan fingerprints", tuple(range(self.world_size)), digest)
        differing = [r for r, d in enumerate(gathered) if not torch.equal(d, digest)]
        if differing:
            raise PlanMismatchError(
                f"rank {self.rank}: ranks {differing} computed a different SDP plan; every rank must "
                "wrap the same model structure with the same coverage, level, neuron_groups, "
                "example input and seed")

    def _apply_masking(self) -> None:
        model, me = self.module, self.rank
        if self.level == "block":
            factor = self.world_size / self.plan.k
            for path, info in self._blocks.items():
                block = get_module(model, path)
                if path not in self._held:
                    if self.masking == "forward":
                        model.set_submodule(path, info.dropped_module(block))
                    else:
                        for name, p in block.named_parameters():
                            if not info.is_shortcut_key(name):
                                p.requires_grad_(False)
                elif self.masking == "forward" and self.scale == "inverse-coverage" and factor != 1:
                    model.set_submodule(path, info.scaled_module(block, factor))
            return
        for site in self._sites:
            held = [g for g in range(len(site.groups)) if me in self.plan.holders[site.unit_name(g)]]
            offsets, offset = {}, 0
            for g in held:
                a, b = site.groups[g]
                offsets[g] = (offset, b - a)
                offset += b - a
            held_hidden = offset
            for spec in site.slices:
                module = get_module(model, spec.module)
                tensor = getattr(module, spec.tensor)
                is_param = isinstance(tensor, nn.Parameter)
                if self.masking == "backward" and not is_param:
                    continue  # buffers stay whole: the full forward updates them all
                index = torch.cat([torch.arange(a, b) for g in held
                                   for a, b in spec.full_ranges(tensor.shape[spec.dim], *site.groups[g])]
                                  or [torch.empty(0, dtype=torch.long)]).to(tensor.device)
                local = tensor.detach().index_select(spec.dim, index).clone()
                self._sliced[(spec.module, spec.tensor)] = {"spec": spec, "offsets": offsets,
                                                            "index": index}
                if self.masking == "forward":
                    if is_param:
                        setattr(module, spec.tensor, nn.Parameter(local, requires_grad=tensor.requires_grad))
                    else:
                        module._buffers[spec.tensor] = local
                    refresh_shape_attributes(module)
                else:
                    self._split_for_backward(module, spec.tensor, tensor, local, spec.dim, index)
            if self.masking == "forward":
                attention = get_module(model, site.path)
                for attr, value in site.head_attrs.items():
                    per_unit = value // site.hidden
                    setattr(attention, attr, per_unit * held_hidden)
                if self.scale == "inverse-coverage" and 0 < held_hidden < site.hidden:
                    factor = site.hidden / held_hidden
                    get_module(model, site.output).register_forward_pre_hook(
                        lambda m, args, f=factor: (args[0] * f, *args[1:]))

    def _split_for_backward(self, module: nn.Module, name: str, full: torch.Tensor, held: torch.Tensor,
                            dim: int, index: torch.Tensor) -> None:
        """Backward masking of a neuron-sliced parameter: a trainable held slice plus a frozen rest;
        a pre-forward hook assembles the full tensor (gradient flows to the held slice only)."""
        del module._parameters[name]
        module.register_parameter(f"{name}_sdp_held", nn.Parameter(held, requires_grad=full.requires_grad))
        module.register_buffer(f"{name}_sdp_full", full.detach().clone(), persistent=False)
        object.__setattr__(module, name, getattr(module, f"{name}_sdp_full"))

        def assemble(m: nn.Module, args: tuple) -> None:
            frozen, trained = getattr(m, f"{name}_sdp_full"), getattr(m, f"{name}_sdp_held")
            object.__setattr__(m, name, frozen.index_copy(dim, index, trained))

        def release(m: nn.Module, args: tuple, out: Any) -> None:
            object.__setattr__(m, name, getattr(m, f"{name}_sdp_full"))

        module.register_forward_pre_hook(assemble)
        module.register_forward_hook(release)

    # ------------------------------------------------------------------------------------------
    # where pieces live on this worker

    def _local_tensor(self, key: str, trainable: bool = False) -> torch.Tensor | None:
        module_path, name = _split_key(key)
        module = get_module(self.module, module_path)
        if self.masking == "backward" and (module_path, name) in self._sliced:
            return getattr(module, f"{name}_sdp_held" if trainable else f"{name}_sdp_full")
        return getattr(module, name)

    def _local_views(self, piece: Piece) -> list[torch.Tensor] | None:
        """This worker's storage of a piece (views), or None if it does not hold it."""
        if self.rank not in piece.holders:
            if self.masking == "forward":
                return None
            if piece.spec is None:
                return [self._local_tensor(piece.key)]
            return narrow_ranges(self._local_tensor(piece.key), piece.spec.dim, piece.full_ranges)
        if piece.spec is None:
            return [self._local_tensor(piece.key)]
        layout = self._sliced.get(_split_key(piece.key))
        if layout is None:  # backward masking keeps sliced buffers whole
            return narrow_ranges(self._local_tensor(piece.key), piece.spec.dim, piece.full_ranges)
        tensor = self._local_tensor(piece.key, trainable=True)
        offset, width = layout["offsets"][piece.group]
        return narrow_ranges(tensor, piece.spec.dim,
                             piece.spec.local_ranges(tensor.shape[piece.spec.dim], offset, width))

    def _make_grad_segments(self) -> dict[BucketKey, list[tuple[nn.Parameter, int | None, tuple]]]:
        """For each holder set (and dtype): the trainable local tensors and ranges whose gradients it
        averages, deduplicated (tied weights appear under two keys)."""
        segments: dict[BucketKey, list[tuple[nn.Parameter, int | None, tuple]]] = {}
        seen: set[tuple[int, tuple]] = set()
        for piece in self._pieces:
            if not piece.is_param or self.rank not in piece.holders:
                continue
            tensor = self._local_tensor(piece.key, trainable=True)
            if not isinstance(tensor, nn.Parameter) or not tensor.requires_grad:
                continue
            if piece.spec is None:
                dim, ranges = None, ()
            else:
                offset, width = self._sliced[_split_key(piece.key)]["offsets"][piece.group]
                dim = piece.spec.dim
                ranges = tuple(piece.spec.local_ranges(tensor.shape[dim], offset, width))
            if (id(tensor), ranges) in seen:
                continue
            seen.add((id(tensor), ranges))
            segments.setdefault((piece.holders, tensor.dtype), []).append((tensor, dim, ranges))
        return dict(sorted(segments.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))))

    # ------------------------------------------------------------------------------------------
    # the training step

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._sync_queued = False  # a backward that raised before its callback must not block the next
        return self.module(*args, **kwargs)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The parameters this worker trains (held units and shared parameters); frozen copies that
        backward masking keeps for the forward pass are left out, so the optimizer never sees them."""
        return (p for p in self.module.parameters(recurse) if p.requires_grad)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.module.named_parameters(prefix, recurse, remove_duplicate)
                if p.requires_grad)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (as DDP's no_sync); the next backward outside averages."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def _make_chunks(self) -> dict[tuple[int, ...], list[_Chunk]]:
        """Each holder set's gradient segments in reverse model order (the order backward
        produces them), cut into buckets of about ``bucket_cap_mb``: a bucket's all-reduce is
        issued as soon as its gradients and those of the buckets before it are ready, so it
        overlaps the rest of backward. The fixed order keeps every member's issue order the same."""
        chunks: dict[tuple[int, ...], list[_Chunk]] = {}
        cap = self.bucket_cap_mb * 2 ** 20
        for key, segs in self._grad_segments.items():
            current: list[tuple[nn.Parameter, int | None, tuple]] = []
            size = 0
            for seg in reversed(segs):
                current.append(seg)
                p, dim, ranges = seg
                size += (p.numel() if dim is None else
                         p.numel() // p.shape[dim] * sum(b - a for a, b in ranges)) * p.element_size()
                if size >= cap:
                    chunks.setdefault(key[0], []).append(_Chunk(key, current))
                    current, size = [], 0
            if current:
                chunks.setdefault(key[0], []).append(_Chunk(key, current))
        return chunks

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not (self._auto_grad_sync and self._sync_enabled):
            return
        if not self._sync_queued:
            self._sync_queued = True
            for chunk_list in self._chunks.values():
                for chunk in chunk_list:
                    chunk.reset()
            self._unbucketed = dict(self._segments_per_param)
            torch.autograd.Variable._execution_engine.queue_callback(self._sync_after_backward)
        for holders in self._chunks_of_param.get(id(param), ()):
            for chunk in self._chunks[holders]:
                chunk.pending.discard(id(param))
            self._launch_ready(holders)

    def _launch_ready(self, holders: tuple[int, ...], everything: bool = False) -> None:
        for chunk in self._chunks[holders]:
            if chunk.work is not None:
                continue
            if chunk.pending and not everything:
                return  # a bucket waits for the ones before it: same issue order on every member
            if len(holders) == 1:
                chunk.work = False  # one holder: its gradient is already the average
                continue
            flat = self._flatten_chunk(chunk).to(self._comm_device())
            self.comm_bytes += flat.numel() * flat.element_size()
            chunk.flat = flat
            chunk.work = dist.all_reduce(flat, group=self._groups[holders], async_op=True)
            # the bucket now holds these gradients: free a parameter's .grad once all of it is in
            # buckets, so overlapping the sync does not keep two copies while activations live
            for p, _, _ in chunk.segments:
                self._unbucketed[id(p)] -= 1
                if self._unbucketed[id(p)] == 0:
                    p.grad = None

    def _flatten_chunk(self, chunk: "_Chunk") -> torch.Tensor:
        parts = []
        for p, dim, ranges in chunk.segments:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            parts += [grad] if dim is None else narrow_ranges(grad, dim, ranges)
        return flatten(parts, device=self.device, dtype=chunk.key[1])

    @torch.no_grad()
    def _sync_after_backward(self) -> None:
        """End of backward: issue what is left, wait for every bucket, write the averages back."""
        self._sync_queued = False
        for holders in self._chunks:
            self._launch_ready(holders, everything=True)
        for holders, chunk_list in self._chunks.items():
            for chunk in chunk_list:
                if chunk.work is False:
                    continue
                self._wait(chunk.work, "gradient all_reduce", holders, chunk.flat)
                averaged = chunk.flat.div_(len(holders)).to(self.device)
                targets = []
                for p, dim, ranges in chunk.segments:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    targets += [p.grad] if dim is None else narrow_ranges(p.grad, dim, ranges)
                unflatten_into(averaged, targets)
                chunk.flat = None

    def grad_buckets(self) -> dict[BucketKey, torch.Tensor]:
        """One flat gradient buffer per holder set this worker belongs to (missing grads are 0)."""
        buckets = {}
        for key, segs in self._grad_segments.items():
            parts = []
            for p, dim, ranges in segs:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                parts += [grad] if dim is None else narrow_ranges(grad, dim, ranges)
            buckets[key] = flatten(parts, device=self.device, dtype=key[1])
        return buckets

    def set_grad_buckets(self, buckets: Mapping[BucketKey, torch.Tensor]) -> None:
        """Write averaged buckets back into the parameters' ``.grad``."""
        for key, flat in buckets.items():
            targets = []
            for p, dim, ranges in self._grad_segments[key]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                targets += [p.grad] if dim is None else narrow_ranges(p.grad, dim, ranges)
            unflatten_into(flat, targets)

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Average each gradient over the holders of its unit (runs by itself after backward)."""
        buckets = self.grad_buckets()
        pending = []
        for key, flat in buckets.items():
            if len(key[0]) == 1:
                continue  # a unit with one holder (k = 1): its gradient is already the average
            flat = flat.to(self._comm_device())
            self.comm_bytes += flat.numel() * flat.element_size()
            work = dist.all_reduce(flat, group=self._groups[key[0]], async_op=True)
            pending.append((key, flat, work))
        averaged = {}
        for key, flat, work in pending:
            self._wait(work, "gradient all_reduce", key[0], flat)
            averaged[key] = flat.div_(len(key[0])).to(self.device)
        self.set_grad_buckets(averaged)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the gradient norm of the full model, the same on every worker (collective: call
        it on every rank after backward). Each holder set's averaged bucket is counted once, by its
        lowest rank, so the norm is that of the full model's averaged gradient, and every holder
        scales its copy by the same factor. Returns the norm before clipping."""
        squared = torch.zeros((), dtype=torch.float64, device=self._comm_device())
        for key, flat in self.grad_buckets().items():
            if key[0][0] == self.rank:
                squared += flat.double().pow(2).sum().to(squared.device)
        work = dist.all_reduce(squared, group=self._world_group, async_op=True)
        self._wait(work, "gradient-norm all_reduce", tuple(range(self.world_size)), squared)
        return _apply_clip(self.parameters(), squared.sqrt().item(), max_norm)

    @torch.no_grad()
    def ensemble_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The ensemble view: given this worker's subnetwork output (``sdp(x)`` in eval mode) on a
        batch that every worker evaluates, the log of the mean over the N workers of their
        predicted probabilities (softmax over the last dimension). Collective: every rank calls it
        with the same batch. The result is a valid input for ``F.cross_entropy`` (its softmax is
        the mean probability itself)."""
        probs = torch.softmax(logits.float(), dim=-1).to(self._comm_device())
        work = dist.all_reduce(probs, group=self._world_group, async_op=True)
        self._wait(work, "all_reduce of ensemble probabilities", tuple(range(self.world_size)), probs)
        # a probability that underflowed to 0 on every worker must not become -inf
        return (probs / self.world_size).clamp_min_(torch.finfo(probs.dtype).tiny).log_().to(logits.device)

    def _wait(self, work: Any, what: str, ranks: tuple[int, ...], tensor: torch.Tensor) -> None:
        try:
            completed = work.wait(timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - every backend failure becomes one clear error
            raise CollectiveError(
                f"rank {self.rank}: {what} over workers {list(ranks)} ({tensor.numel() * tensor.element_size():,} "
                f"bytes) failed or did not complete within {self.timeout.total_seconds():g}s; a peer "
                f"has probably died or is stuck. Backend said: {exc}") from exc
        if completed is False:
            raise CollectiveError(f"rank {self.rank}: {what} over workers {list(ranks)} timed out after "
                                  f"{self.timeout.total_seconds():g}s")

    # -- backward masking: bring every worker's copy of the updated units up to date ----------

    def _weights_owned_by(self, source: int) -> list[Piece]:
        """Unit parameters whose first holder is ``source`` (cached: used every step)."""
        if not hasattr(self, "_weights_by_source"):
            self._weights_by_source: dict[int, list[Piece]] = {}
            for p in self._pieces:
                if p.is_param and p.unit is not None:
                    self._weights_by_source.setdefault(p.owner, []).append(p)
        return self._weights_by_source.get(source, [])

    def owned_weights(self, source: int) -> torch.Tensor:
        """The flat values of the unit parameters whose owner is ``source`` (this worker)."""
        parts: list[torch.Tensor] = []
        for piece in self._weights_owned_by(source):
            parts += self._local_views(piece)  # type: ignore[operator]
        return flatten(parts, device=self.device)

    def _weight_numel(self, source: int) -> int:
        return sum(math.prod(p.full_shape(self._full_meta[p.key][0])) for p in self._weights_owned_by(source))

    def receive_weights(self, source: int, flat: torch.Tensor) -> None:
        """Overwrite this worker's copies (held and frozen) of ``source``'s unit parameters."""
        targets: list[torch.Tensor] = []
        for piece in self._weights_owned_by(source):
            # a holder's frozen copy of its own slices is stale but unused: forward overwrites it
            targets += self._local_views(piece)  # type: ignore[operator]
        unflatten_into(flat, targets)

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Backward masking: every unit's first holder broadcasts its updated values to all workers,
        which then hold bitwise-identical full weights. Runs by itself after ``optimizer.step()``."""
        if self.masking != "backward":
            return
        for source in range(self.world_size):
            numel = self._weight_numel(source)
            if numel == 0:
                continue
            if source == self.rank:
                flat = self.owned_weights(source).to(self._comm_device())
            else:
                dtype = self._full_meta[self._weights_owned_by(source)[0].key][1]
                flat = torch.empty(numel, device=self._comm_device(), dtype=dtype)
            self.comm_bytes += flat.numel() * flat.element_size()
            work = dist.broadcast(flat, src=self._global_ranks[source], group=self._world_group, async_op=True)
            self._wait(work, f"weight broadcast from worker {source}", tuple(range(self.world_size)), flat)
            if source != self.rank:
                self.receive_weights(source, flat.to(self.device))

    def _register_step_hook(self) -> None:
        this = weakref.ref(self)
        ids = {id(p) for p in self.parameters()}

        def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            sdp = this()
            if sdp is None:
                return
            if any(id(p) in ids for group in optimizer.param_groups for p in group["params"]):
                sdp.sync_weights()

        self._hook_handles.append(register_optimizer_step_post_hook(after_step))

    # ------------------------------------------------------------------------------------------
    # the full model

    def float_buffer_pieces(self) -> dict[BucketKey, list[Piece]]:
        """Floating-point buffers (norm running statistics) grouped by holder set: these are
        averaged over the holders when the full model is assembled."""
        out: dict[BucketKey, list[Piece]] = {}
        for piece in self._pieces:
            if not piece.is_param and self._full_meta[piece.key][1].is_floating_point \
                    and self.rank in piece.holders:
                out.setdefault((piece.holders, self._full_meta[piece.key][1]), []).append(piece)
        return dict(sorted(out.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))))

    def local_values(self, pieces: Sequence[Piece]) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        for piece in pieces:
            parts += self._local_views(piece)  # type: ignore[operator]
        return flatten(parts, device=self.device)

    def owned_pieces(self, source: int) -> list[Piece]:
        return [p for p in self._pieces if p.owner == source]

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The assembled full model on CPU, with the original model's keys (collective: call it on
        every rank). Each unit comes from its first holder; norm running statistics are averaged
        over the unit's holders (shared ones over all workers)."""
        averaged: dict[tuple[str, int], torch.Tensor] = {}
        for key, pieces in self.float_buffer_pieces().items():
            flat = self.local_values(pieces).to(self._comm_device())
            work = dist.all_reduce(flat, group=self._groups[key[0]], async_op=True)
            self._wait(work, "running-statistics all_reduce", key[0], flat)
            flat = flat.div_(len(key[0])).cpu()
            offset = 0
            for piece in pieces:
                n = math.prod(piece.full_shape(self._full_meta[piece.key][0]))
                averaged[(piece.key, piece.group)] = flat[offset:offset + n]
                offset += n

        def fetch(source: int, pieces: list[Piece]) -> list[torch.Tensor]:
            if source == self.rank:
                parts = [averaged[(p.key, p.group)] if (p.key, p.group) in averaged
                         else flatten(self._local_views(p)).cpu() for p in pieces]
                by_dtype = [flatten([x.reshape(-1) for x, p in zip(parts, pieces)
                                     if self._full_meta[p.key][1] == dt]) for dt in _dtypes(self, pieces)]
            else:
                by_dtype = [torch.empty(sum(math.prod(p.full_shape(self._full_meta[p.key][0]))
                                            for p in pieces if self._full_meta[p.key][1] == dt), dtype=dt)
                            for dt in _dtypes(self, pieces)]
            received = []
            for flat in by_dtype:
                flat = flat.to(self._comm_device())
                work = dist.broadcast(flat, src=self._global_ranks[source], group=self._world_group,
                                      async_op=True)
                self._wait(work, f"full-model broadcast from worker {source}", tuple(range(self.world_size)), flat)
                received.append(flat.cpu())
            return received

        return assemble_full_state(self, fetch)

    @torch.no_grad()
    def local_full_state_dict(self) -> dict[str, torch.Tensor]:
        """Backward masking: this worker's own copy of the full model (no communication). After
        ``sync_weights()`` the parameters are bitwise identical on every worker; norm running
        statistics are this worker's own."""
        if self.masking != "backward":
            raise SDPConfigError("local_full_state_dict() needs masking='backward': under forward "
                                 "masking a worker does not hold the full model; use full_state_dict()")

        def fetch(source: int, pieces: list[Piece]) -> list[torch.Tensor]:
            return [flatten([flatten(self._local_views(p)).cpu() for p in pieces  # type: ignore[arg-type]
                             if self._full_meta[p.key][1] == dt]) for dt in _dtypes(self, pieces)]

        return assemble_full_state(self, fetch)

    @torch.no_grad()
    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a full-model state dict (original keys) into this worker's subnetwork. Local: no
        communication, every rank loads the same file."""
        missing = set(self._full_meta) - set(state)
        unexpected = set(state) - set(self._full_meta)
        if missing or unexpected:
            raise SDPConfigError(f"full state dict does not match the model: missing {sorted(missing)[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]}")
        for piece in self._pieces:
            views = self._local_views(piece)
            if views is None:
                continue
            source = state[piece.key].to(self.device)
            if piece.spec is not None:
                parts = flatten(narrow_ranges(source, piece.spec.dim, piece.full_ranges))
                unflatten_into(parts, views)
                if self.masking == "backward" and _split_key(piece.key) in self._sliced:
                    full = narrow_ranges(self._local_tensor(piece.key), piece.spec.dim, piece.full_ranges)
                    unflatten_into(parts, full)
            else:
                views[0].copy_(source)

    # ------------------------------------------------------------------------------------------
    # what this worker holds

    def held_bytes(self) -> dict[str, int]:
        """Bytes of this worker's trainable parameters, their gradients, all parameters (including
        frozen copies under backward masking) and buffers, counted from the live tensors."""
        trainable = list(self.parameters())
        everything = list(self.module.parameters())
        return {
            "trainable_params": sum(p.numel() * p.element_size() for p in trainable),
            "grads": sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None),
            "all_params": sum(p.numel() * p.element_size() for p in everything),
            "buffers": sum(b.numel() * b.element_size() for b in self.buffers()),
        }

    def extra_repr(self) -> str:
        return (f"level={self.level}, masking={self.masking}, coverage={self.coverage:g}, "
                f"rank={self.rank}/{self.world_size}, units held={len(self._held)}/{len(self.plan.holders)}")


def _apply_clip(params: Iterable[nn.Parameter], norm: float, max_norm: float) -> torch.Tensor:
    factor = max_norm / (norm + 1e-6)
    if factor < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)
    return torch.tensor(norm)


class _Chunk:
    """One gradient bucket of a holder set: its segments, which of its parameters are still to
    produce a gradient in this backward, and its in-flight all-reduce."""

    def __init__(self, key: BucketKey, segments: list[tuple[nn.Parameter, int | None, tuple]]) -> None:
        self.key, self.segments = key, segments
        self.params = {id(p) for p, _, _ in segments}
        self.pending: set[int] = set(self.params)  # parameters yet to produce their gradient
        self.work: Any = None
        self.flat: torch.Tensor | None = None

    def reset(self) -> None:
        self.pending, self.work, self.flat = set(self.params), None, None


def plan_for(model: nn.Module, world_size: int, **kwargs: Any) -> Plan:
    """The plan SubnetworkDataParallel would use for ``model`` on ``world_size`` workers, computed
    without torch.distributed and without changing ``model``. Keyword arguments as the wrapper's."""
    return SubnetworkDataParallel(model, _virtual_rank=0, _virtual_world_size=world_size, _plan_only=True,
                                  **kwargs).plan


def _dtypes(sdp: SubnetworkDataParallel, pieces: Sequence[Piece]) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for p in pieces:
        dt = sdp._full_meta[p.key][1]
        if dt not in seen:
            seen.append(dt)
    return seen


def assemble_full_state(sdp: SubnetworkDataParallel,
                        fetch: Callable[[int, list[Piece]], list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Build the full state dict from each source worker's owned pieces; ``fetch(source, pieces)``
    returns that worker's values as one flat tensor per dtype (in first-seen dtype order)."""
    out = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in sdp._full_meta.items()}
    for source in range(sdp.world_size):
        pieces = sdp.owned_pieces(source)
        if not pieces:
            continue
        flats = dict(zip(_dtypes(sdp, pieces), fetch(source, pieces)))
        offsets = {dt: 0 for dt in flats}
        for piece in pieces:
            shape, dtype = sdp._full_meta[piece.key]
            part_shape = piece.full_shape(shape)
            n = math.prod(part_shape)
            flat = flats[dtype][offsets[dtype]:offsets[dtype] + n]
            offsets[dtype] += n
            if piece.spec is None:
                out[piece.key].copy_(flat.view(part_shape))
            else:  # slices travel as their ranges flattened one after another
                unflatten_into(flat, narrow_ranges(out[piece.key], piece.spec.dim, piece.full_ranges))
    return out
