"""From a model to its plan: find the units, measure them on an example input, place them.

    units, plan = plan_model(model, world_size=8, blocks="model.layers", coverage=0.5,
                             example_input=batch)
    plan = plan_for(model, 8, neurons="model.layers", coverage=0.5)   # the plan only
    plan = plan_for(model, 4, blocks="model.layers", coverage=[1, 1, 0.5, 0.5])   # per-rank coverage
    plan = plan_for(model, 4, blocks="model.layers", coverage=0.5, example_input=batch,
                    memory_budget=["2GiB", "2GiB", "1GiB", "1GiB"])   # per-rank memory budgets

A pure function of (model structure, N, C, seed, example input): every rank computes the same
plan locally, and the model is left unchanged (the example forward runs in eval mode, so norm
running statistics are untouched).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import DisconnectedPlanWarning, SDPConfigError
from .plan import MemoryBudget, Plan, PlanError, UnitCost, make_plan
from .units import BlockInfo, NeuronSite, analyse_block, find_neuron_sites, get_module, resolve_block_paths

MASKINGS = ("forward", "backward")
SCALES = ("none", "inverse-coverage")


@dataclass
class Units:
    """The units of a model: whole blocks (block level) or neuron groups inside blocks."""

    level: str                                               # "block" | "neuron"
    blocks: dict[str, BlockInfo] = field(default_factory=dict)
    sites: list[NeuronSite] = field(default_factory=list)


def _is_coverage(c: Any) -> bool:
    return not isinstance(c, bool) and isinstance(c, (int, float)) and 0 < c <= 1


def check_arguments(*, blocks: Any, neurons: Any, coverage: Any, masking: str = "forward",
                    scale: str = "none", timeout: float = 600.0, reduce_dtype: Any = None,
                    memory_budget: Any = None) -> None:
    """The argument errors every entry point (wrapper, simulator, plan_for) reports the same way."""
    if (blocks is None) == (neurons is None):
        raise SDPConfigError("pass exactly one of blocks= (block level) or neurons= (neuron level)")
    if masking not in MASKINGS:
        raise SDPConfigError(f"masking must be 'forward' or 'backward', got {masking!r}")
    if scale not in SCALES:
        raise SDPConfigError(f"scale must be 'none' or 'inverse-coverage', got {scale!r}")
    if isinstance(coverage, (list, tuple)):
        if not coverage or not all(_is_coverage(c) for c in coverage):
            raise SDPConfigError(f"coverage must be in (0, 1], one number or one per worker, got {list(coverage)!r}")
    elif not _is_coverage(coverage):
        raise SDPConfigError(f"coverage must be in (0, 1], got {coverage!r}")
    if memory_budget is not None:
        if isinstance(coverage, (list, tuple)):
            raise SDPConfigError("give per-rank coverage or memory_budget, not both: with memory_budget, coverage is "
                                 "one number (it sets k, the holders per unit)")
        if blocks is None:
            raise SDPConfigError("memory_budget needs block level (blocks=): saved activations are counted per block")
        if not isinstance(memory_budget, (MemoryBudget, list, tuple)):
            raise SDPConfigError(f"memory_budget takes one size per worker (a list, or a MemoryBudget), "
                                 f"got {memory_budget!r}")
    if timeout <= 0:
        raise SDPConfigError(f"timeout must be positive seconds, got {timeout}")
    if reduce_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise SDPConfigError(f"reduce_dtype must be None, torch.bfloat16, torch.float16 or torch.float32, "
                             f"got {reduce_dtype!r}")


def find_units(model: nn.Module, world_size: int, *, blocks: str | Sequence[str] | None = None,
               neurons: str | Sequence[str] | None = None, neuron_groups: int | None = None) -> Units:
    """Analyse each named block (its shortcut, or its neuron sites split into groups)."""
    paths = resolve_block_paths(model, blocks if blocks is not None else neurons)  # type: ignore[arg-type]
    if blocks is not None:
        return Units("block", blocks={p: analyse_block(get_module(model, p), p) for p in paths})
    sites = [site for p in paths for site in find_neuron_sites(model, p)]
    for site in sites:
        site.split(neuron_groups or world_size)
    return Units("neuron", sites=sites)


def plan_model(model: nn.Module, world_size: int, *, blocks: str | Sequence[str] | None = None,
               neurons: str | Sequence[str] | None = None, coverage: float | Sequence[float] = 0.5, seed: int = 0,
               neuron_groups: int | None = None, example_input: Any = None,
               memory_budget: MemoryBudget | Sequence[int | str] | None = None) -> tuple[Units, Plan]:
    """The units of ``model`` and the plan that places them on ``world_size`` workers.
    ``coverage``: one number, or one per rank (``plan.plan_targeted``). ``memory_budget``: one size
    per rank (bytes, or strings such as ``"2GiB"``), or a ``MemoryBudget`` with the memory model's
    assumptions; block level, and ``example_input`` one worker's training batch (its saved
    activations are counted on it)."""
    check_arguments(blocks=blocks, neurons=neurons, coverage=coverage, memory_budget=memory_budget)
    if memory_budget is not None:
        if example_input is None:
            raise SDPConfigError("memory_budget needs example_input= (one worker's training batch): the memory model "
                                 "counts each block's saved activations on it")
        try:
            budget = (memory_budget if isinstance(memory_budget, MemoryBudget)
                      else MemoryBudget(tuple(memory_budget)))  # type: ignore[arg-type]  # sizes parsed there
        except PlanError as exc:
            raise SDPConfigError(str(exc)) from None
        if len(budget.per_worker) != world_size:
            raise SDPConfigError(f"memory_budget has {len(budget.per_worker)} sizes for {world_size} workers: give one "
                                 "per worker (rank order)")
        memory_budget = budget
    if isinstance(coverage, (list, tuple)):
        if len(coverage) != world_size:
            raise SDPConfigError(f"coverage has {len(coverage)} values for {world_size} workers: give one number, or "
                                 "one per worker (rank order)")
    elif math.floor(float(coverage) * world_size + 0.5) == 0:  # type: ignore[arg-type]
        raise SDPConfigError(
            f"coverage {coverage} with {world_size} workers gives round(C*N) = 0 holders per unit; the "
            f"smallest coverage for N={world_size} is 1/N = {1 / world_size:.4g}")
    units = find_units(model, world_size, blocks=blocks, neurons=neurons, neuron_groups=neuron_groups)
    flops, activations = (None, {})
    shared_activations = 0.0
    if example_input is not None:
        check_untraced_shapes(model, units, example_input)
        flops = count_flops(model, example_input)
        if units.level == "block" and memory_budget is not None:
            counted = count_activation_memory(model, units, example_input)
            activations, shared_activations = counted.held, counted.shared
        elif units.level == "block":
            activations = count_saved_activations(model, units, example_input)
    costs = unit_costs(model, units, flops, activations)
    total_params = sum(p.numel() for p in model.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shared_flops = None if flops is None else max(0.0, flops.get("", 0.0) - sum(u.flops or 0.0 for u in costs))
    try:
        plan = make_plan(costs, world_size, [float(c) for c in coverage] if isinstance(coverage, (list, tuple))
                         else float(coverage), seed, level=units.level,  # type: ignore[arg-type]
                         shared_params=total_params - sum(u.params for u in costs),
                         shared_bytes=total_bytes - sum(u.bytes for u in costs), shared_flops=shared_flops,
                         memory_budget=memory_budget, shared_activations=shared_activations)
    except PlanError as exc:
        if memory_budget is None:
            raise
        raise PlanError(f"memory_budget: {exc}") from None
    return units, plan


def budget_for_masking(memory_budget: Any, masking: str) -> Any:
    """A plain list of budgets under backward masking, as a MemoryBudget that models it (every
    worker keeps every unit's weights); anything else as it is."""
    if not isinstance(memory_budget, (list, tuple)) or masking == "forward":
        return memory_budget  # None, a MemoryBudget, or a wrong type that plan_model reports
    return MemoryBudget(tuple(memory_budget), masking=masking)


def warn_if_disconnected(plan: Plan) -> None:
    """A DisconnectedPlanWarning when no unit links some workers to the others (k = 1, or a
    plan whose overlap graph falls apart): legal, but rarely what is meant."""
    if plan.world_size > 1 and plan.algebraic_connectivity < 1e-9:
        fix = (f"a coverage of at least {min(1.0, 2 / plan.world_size):.3g} gives k >= 2" if plan.k == 1 else
               "the model has too few units to link every worker at this coverage")
        warnings.warn(DisconnectedPlanWarning(
            f"the SDP plan's worker-overlap graph is disconnected (coverage {plan.coverage:g} on {plan.world_size} "
            f"workers gives k = {plan.k} holder{'s' if plan.k > 1 else ''} per unit): some workers share no unit, so "
            "they exchange only the shared parameters' gradients and each unit trains on the data of its "
            f"holders alone; {fix}"), stacklevel=3)


# the wrapper's and the simulator's keywords: those that decide the plan, and those that do not
PLAN_KEYWORDS = ("blocks", "neurons", "coverage", "seed", "neuron_groups", "example_input", "memory_budget")
RUN_KEYWORDS = ("masking", "scale", "process_group", "timeout", "sync_weights_after_step", "bucket_cap_mb", "shard",
                "shard_shared_weights", "reduce_dtype")


def plan_for(model: nn.Module, world_size: int, **kwargs: Any) -> Plan:
    """The plan SubnetworkDataParallel would use for ``model`` on ``world_size`` workers, computed
    without torch.distributed and without changing ``model``. Keyword arguments as the wrapper's:
    those that do not affect the plan (``masking``, ``shard``, ...) are checked and ignored."""
    unknown = sorted(set(kwargs) - set(PLAN_KEYWORDS) - set(RUN_KEYWORDS))
    if unknown:
        raise SDPConfigError(f"plan_for: unknown keyword(s) {unknown}; it takes SubnetworkDataParallel's: "
                             f"{', '.join(PLAN_KEYWORDS + RUN_KEYWORDS)}")
    check_arguments(blocks=kwargs.get("blocks"), neurons=kwargs.get("neurons"), coverage=kwargs.get("coverage", 0.5),
                    masking=kwargs.get("masking", "forward"), scale=kwargs.get("scale", "none"),
                    timeout=kwargs.get("timeout", 600.0), reduce_dtype=kwargs.get("reduce_dtype"),
                    memory_budget=kwargs.get("memory_budget"))
    return plan_model(model, world_size, **{k: v for k, v in kwargs.items() if k in PLAN_KEYWORDS})[1]


# ---------------------------------------------------------------------------------------------
# measuring units on the example input


def unit_costs(model: nn.Module, units: Units, flops: dict[str, float] | None,
               activations: Mapping[str, float]) -> list[UnitCost]:
    """Each unit's parameters, bytes, forward FLOPs and saved activations, as the planner sees them."""
    costs: list[UnitCost] = []
    for path, info in units.blocks.items():
        params = [p for n, p in get_module(model, path).named_parameters() if not info.is_shortcut_key(n)]
        unit_flops = None
        if flops is not None:  # the shortcut's FLOPs stay with every worker: they are shared
            unit_flops = flops.get(path, 0.0) - sum(flops.get(f"{path}.{m}", 0.0) for m in info.shortcut_modules)
        costs.append(UnitCost(path, sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params),
                              unit_flops, activations=activations.get(path)))
    for site in units.sites:
        per_hidden_params = per_hidden_bytes = 0
        for spec in site.slices:
            tensor = getattr(get_module(model, spec.module), spec.tensor)
            if isinstance(tensor, nn.Parameter):
                n = tensor.numel() // tensor.shape[spec.dim] * spec.unit_width * spec.segments
                per_hidden_params += n
                per_hidden_bytes += n * tensor.element_size()
        for g, (a, b) in enumerate(site.groups):
            width = b - a
            f = None if flops is None else flops.get(site.path, 0.0) * width / site.hidden
            costs.append(UnitCost(site.unit_name(g), per_hidden_params * width, per_hidden_bytes * width, f,
                                  site=site.path, group=g, num_groups=len(site.groups)))
    return costs


def run_example(model: nn.Module, example_input: Any, grad: bool = False) -> Any:
    """One forward of ``model`` on the example input (a tensor, a tuple of positional arguments or
    a dict of keyword arguments) in eval mode, so norm running statistics are untouched; each
    module's mode is restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.set_grad_enabled(grad):
            if isinstance(example_input, Mapping):
                return model(**example_input)
            if isinstance(example_input, tuple):
                return model(*example_input)
            return model(example_input)
    finally:
        for module, training in modes.items():
            module.training = training


def _dispatch_mode_without_dynamo() -> type | None:
    """torch's FLOP-counting dispatch mode with its own ``__torch_dispatch__``, minus the
    ``torch._disable_dynamo`` wrapper that every TorchDispatchMode subclass gets: that wrapper's
    first call imports torch._dynamo (about 1 s, most of `subnetdp plan`'s time after importing
    torch) only to keep torch.compile out of the mode, and nothing compiles in an example forward.
    The counting code is torch's, unchanged, so the counts (and the plan) are the same. None
    where this torch is laid out otherwise (then FlopCounterMode as it is)."""
    from torch.utils import flop_counter
    base = getattr(flop_counter, "_FlopCounterMode", None)
    dispatch = getattr(getattr(base, "__dict__", {}).get("__torch_dispatch__"), "__wrapped__", None)
    if base is None or dispatch is None:
        return None

    class _Mode(base):  # type: ignore[misc, valid-type]
        @classmethod
        def _should_skip_dynamo(cls) -> bool:  # read once, by __init_subclass__: no wrapper
            return False

        __torch_dispatch__ = dispatch

    return _Mode


class _FlopCounter(FlopCounterMode):
    """FlopCounterMode whose dispatch mode does not import torch._dynamo (see above). Once
    torch._dynamo is imported (something may compile: transformers imports it) it is
    FlopCounterMode as it is, which then costs nothing more."""

    _mode: type | None | Literal[False] = False  # False: not looked up yet

    def __enter__(self) -> "_FlopCounter":
        if "torch._dynamo" in sys.modules:
            return super().__enter__()
        if _FlopCounter._mode is False:
            _FlopCounter._mode = _dispatch_mode_without_dynamo()
        if _FlopCounter._mode is None:
            return super().__enter__()
        self.flop_counts.clear()  # FlopCounterMode.__enter__, with that mode
        self.mod_tracker.__enter__()
        self.mode = _FlopCounter._mode(self)
        self.mode.__enter__()
        return self


def count_flops(model: nn.Module, example_input: Any) -> dict[str, float]:
    """Forward FLOPs per module path ("" is the whole model) on the example input."""
    with _FlopCounter(display=False) as counter:
        run_example(model, example_input)
    root = type(model).__name__
    return {name[len(root) + 1:] if name != root else "": float(sum(v.values()))
            for name, v in counter.get_flop_counts().items() if name.startswith(root)}


def check_untraced_shapes(model: nn.Module, units: Units, example_input: Any) -> None:
    """A block fx cannot trace is dropped by passing its input through: it must keep its shape."""
    untraced = [path for path, info in units.blocks.items() if not info.traced]
    if not untraced:
        return
    shapes: dict[str, tuple] = {}

    def record(path: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            shapes[path] = (getattr(x, "shape", None), getattr(out, "shape", None))
        return hook

    handles = [get_module(model, p).register_forward_hook(record(p), with_kwargs=True) for p in untraced]
    try:
        run_example(model, example_input)
    finally:
        for h in handles:
            h.remove()
    for path, (shape_in, shape_out) in shapes.items():
        if shape_in is None or shape_out is None or shape_in != shape_out:
            raise SDPConfigError(
                f"block {path!r} maps input shape {tuple(shape_in or ())} to output shape "
                f"{tuple(shape_out) if shape_out is not None else type(shape_out)} and has no traceable "
                "shortcut: a dropped block must be able to pass its input through")


def count_saved_activations(model: nn.Module, units: Units, example_input: Any) -> dict[str, float]:
    """Bytes that autograd saves for backward inside each block on the example input (parameters
    are not counted; a storage saved twice counts once)."""
    return _count_saved(model, units, example_input)[0]


@dataclass
class ActivationCount:
    """What the memory model reads from the example forward (bytes)."""

    blocks: dict[str, float]   # saved inside each block, less what is also saved outside every block
    outside: float             # saved outside every block (stem, head, loss-side tensors)
    largest: float             # the largest single saved storage
    output: float              # the model's output (logits)
    dropped: dict[str, float] = field(default_factory=dict)  # saved by each block's dropped form

    @property
    def shared(self) -> float:
        """Activation bytes every worker keeps, whatever it holds: those saved outside the blocks,
        by every block's dropped form (a held block's ``held`` is on top of it), two output-sized
        tensors for the loss (its saved log-probabilities and the logits' gradient) and two of the
        largest saved tensor for the gradients in flight in backward."""
        return self.outside + sum(self.dropped.values()) + 2 * self.output + 2 * self.largest

    @property
    def held(self) -> dict[str, float]:
        """What holding each block adds to its dropped form's activations."""
        return {path: saved - self.dropped.get(path, 0.0) for path, saved in self.blocks.items()}


def count_activation_memory(model: nn.Module, units: Units, example_input: Any) -> ActivationCount:
    """The saved activations per block (a storage that something outside the blocks saves too
    counts outside: every worker keeps it), outside the blocks, the largest and the output, on the
    example input: the memory model of ``memory_budget``."""
    return _count_saved(model, units, example_input, dropped=True)[1]


def _output_bytes(out: Any) -> float:
    logits = getattr(out, "logits", out)  # Hugging Face outputs
    if isinstance(logits, (tuple, list)) and logits:
        logits = logits[0]
    return float(logits.numel() * logits.element_size()) if isinstance(logits, torch.Tensor) else 0.0


def _never_unpacked(packed: None) -> torch.Tensor:
    raise RuntimeError("the activation-counting forward has no backward")


def _count_saved(model: nn.Module, units: Units, example_input: Any,
                 dropped: bool = False) -> tuple[dict[str, float], ActivationCount]:
    """The saved bytes per block as the planner's balance reads them, and the memory model's count;
    ``dropped``: each block's dropped form (its shortcut and post-add ops) also runs on the block's
    input, and what it saves is counted apart (a worker that drops the block keeps that)."""
    saved = {path: 0.0 for path in units.blocks}
    dropping: list[str] = []  # the block whose dropped form runs now
    dropped_saved = {path: 0.0 for path in units.blocks}
    seen: set[int] = set()
    params = {p.data_ptr() for p in model.parameters()}
    inside: list[str] = []  # the stack of blocks the forward is in
    alive: list[torch.Tensor] = []
    first_block: dict[int, tuple[str, int]] = {}  # storage -> (the first block that saved it, bytes)
    outside: dict[int, int] = {}  # storages saved outside every block

    def pack(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if dropping:
            if ptr not in params and ptr not in outside:
                dropped_saved[dropping[-1]] += t.untyped_storage().nbytes()
            alive.append(t.detach())
            return None
        if ptr not in params:
            if inside:
                first_block.setdefault(ptr, (inside[-1], t.untyped_storage().nbytes()))
            else:
                outside[ptr] = t.untyped_storage().nbytes()
        if inside and ptr not in params and ptr not in seen:
            seen.add(ptr)
            saved[inside[-1]] += t.untyped_storage().nbytes()
        # kept alive here until the count ends, so a freed storage's address is never reused and
        # skipped; not returned: returning ``t`` ties an output saved by its own grad_fn into a cycle
        # through autograd's C++ graph that gc cannot see, leaking the activations and (via the
        # graph's AccumulateGrad nodes) the model's parameters. Backward never runs on this graph.
        alive.append(t.detach())
        return None

    handles = []
    for path in units.blocks:
        block = get_module(model, path)
        handles.append(block.register_forward_pre_hook(lambda m, a, path=path: inside.append(path)))
        handles.append(block.register_forward_hook(lambda m, a, o: inside.pop() and None))
        if dropped:
            handles.append(block.register_forward_hook(_run_dropped(units.blocks[path], block, dropping),
                                                       with_kwargs=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked):
            output = _output_bytes(run_example(model, example_input, grad=True))
    finally:
        for h in handles:
            h.remove()
    blocks = {path: 0.0 for path in units.blocks}
    for ptr, (path, nbytes) in first_block.items():
        if ptr not in outside:
            blocks[path] += nbytes
    sizes = list(outside.values()) + [nbytes for _, nbytes in first_block.values()]
    return saved, ActivationCount(blocks, float(sum(outside.values())), float(max(sizes, default=0)), output,
                                  dropped_saved)


def _run_dropped(info: BlockInfo, block: nn.Module, dropping: list[str]) -> Any:
    """A forward hook that runs the block's dropped form on the block's input (its saves counted)."""
    form = info.dropped_module(block) if info.traced else None

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if form is None:
            return
        dropping.append(info.path)
        # the form shares the block's shortcut modules with the model: their modes are put back
        modes = [(m, m.training) for m in form.modules()]
        form.eval()
        try:
            form(*args, **kwargs)
        finally:
            dropping.pop()
            for m, training in modes:
                m.training = training
    return hook
