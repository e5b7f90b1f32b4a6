"""Find the units of an unmodified model: residual blocks, and hidden-neuron groups inside blocks.

A *block* is a module computing ``post(shortcut(x) + f(x))``. Dropping it keeps ``post(shortcut(x))``.
Blocks that torch.fx can trace (ResNet basic/bottleneck blocks) are analysed exactly: the residual
add is found in the graph and the dropped block becomes the graph without the branch ``f``, so a
down-sampling shortcut (and a post-add activation) is kept. Blocks that fx cannot trace (Hugging
Face decoder layers take ``**kwargs``) must map their first input to an output of the same shape;
their dropped form returns that input unchanged.

A *neuron site* is a recognised pattern inside a block whose hidden width can be cut without
changing the block's input or output width: a plain MLP, a gated (SwiGLU) MLP, attention heads, or
the inner channels of a residual conv block (conv, norm, conv). Its hidden units are split into
groups; each group is one SDP unit. Projections are ``nn.Linear`` or Hugging Face's ``Conv1D``
(GPT-2; weight stored (in, out)); a pattern's layers may live in sibling submodules, as in BERT's
``intermediate.dense`` / ``output.dense`` MLP and ``attention.self.{query,key,value}`` /
``attention.output.dense`` attention.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence, cast

import torch
import torch.fx
from torch import nn

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing.TypeIs from Python 3.13

from .errors import SDPConfigError


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path, or an error that names the path and what exists there."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        parent = path.rpartition(".")[0]
        try:
            options = [n for n, _ in model.get_submodule(parent).named_children()] if parent else [
                n for n, _ in model.named_children()]
        except AttributeError:
            options = [n for n, _ in model.named_children()]
        raise SDPConfigError(
            f"module path {path!r} names nothing in {type(model).__name__}; "
            f"children at {parent or '<root>'!r}: {options}") from None


def resolve_block_paths(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Expand ``blocks=``/``neurons=``: a ModuleList/Sequential path, ``"auto"`` (see
    :func:`find_block_stack`), or a list of module paths."""
    if spec == "auto":
        spec = find_block_stack(model)
    if isinstance(spec, str):
        container = get_module(model, spec)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise SDPConfigError(
                f"{spec!r} is a {type(container).__name__}, not an nn.ModuleList or nn.Sequential; "
                "pass the container of the blocks, or a list of block paths")
        paths = [f"{spec}.{name}" for name, _ in container.named_children()]
        if not paths:
            raise SDPConfigError(f"{spec!r} is empty: it holds no blocks")
        return paths
    paths = list(spec)
    if not paths:
        raise SDPConfigError("the list of block paths is empty")
    if len(set(paths)) != len(paths):
        raise SDPConfigError(f"block paths repeat: {paths}")
    for path in paths:
        get_module(model, path)
    for a in paths:
        for b in paths:
            if a != b and b.startswith(a + "."):
                raise SDPConfigError(f"block {b!r} lies inside block {a!r}; units must not nest")
    return paths


# ---------------------------------------------------------------------------------------------
# Blocks: how a dropped block is computed


class SkippedBlock(nn.Module):
    """A dropped block whose forward could not be traced: it returns its first input unchanged."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            return args[0]
        for key in ("hidden_states", "x", "input", "inputs"):
            if key in kwargs:
                return kwargs[key]
        raise TypeError(f"dropped block {self.name!r} got no positional input to pass through")

    def extra_repr(self) -> str:
        return f"dropped {self.name}: identity"


def _scale_residual_hook(scale: float):
    """A forward hook turning an untraceable residual block ``y = x + f(x)`` into ``x + s * f(x)``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        return x + (output - x) * scale

    return hook


_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}


def _is_add(node: torch.fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS))


def _input_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes]


def _param_modules_upstream(node: Any, modules: dict[str, nn.Module]) -> set[str]:
    """Names of parameterised modules that a node's value depends on."""
    seen: set[torch.fx.Node] = set()
    found: set[str] = set()
    stack = [node] if isinstance(node, torch.fx.Node) else []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            target = cast(str, n.target)  # call_module: the module's qualified name
            if any(True for _ in modules[target].parameters()):
                found.add(target)
        stack.extend(_input_nodes(n))
    return found


@dataclass
class ResidualGraph:
    """A traced block with its residual add: ``output = post(add(branch, shortcut))``."""

    graph_module: torch.fx.GraphModule
    add: torch.fx.Node                                      # the outermost residual add
    branches: list[tuple[torch.fx.Node, torch.fx.Node]]     # (add, its branch input), outermost first
    shortcut: Any  # what the chain of adds starts from: a Node, or a constant in a degenerate block


def _graph_module(original: nn.Module, root: nn.Module, graph: torch.fx.Graph,
                  class_name: str) -> torch.fx.GraphModule:
    """``torch.fx.GraphModule(root, graph, class_name)`` with ``original``'s buffer persistence."""
    return _keep_buffer_persistence(torch.fx.GraphModule(root, graph, class_name), original)


def _keep_buffer_persistence(gm: torch.fx.GraphModule, original: nn.Module) -> torch.fx.GraphModule:
    """Mark the buffers of ``gm`` that are non-persistent in ``original`` non-persistent again.

    fx copies a tensor reached by ``get_attr`` (a buffer that the block's own code reads, not one
    inside a leaf module, e.g. an attention's RoPE tables) with a plain ``register_buffer``, which
    makes it persistent: the traced module's state_dict would gain keys the original does not have."""
    for name, buffer in gm.named_buffers():
        owner_path, _, attr = name.rpartition(".")
        try:
            original_owner = original.get_submodule(owner_path)
        except AttributeError:
            continue
        if attr in original_owner._non_persistent_buffers_set:
            gm.get_submodule(owner_path).register_buffer(attr, buffer, persistent=False)
    return gm


def find_block_stack(model: nn.Module) -> str:
    """``blocks="auto"``: the path of the model's stack of residual blocks, the longest
    ModuleList/Sequential of two or more members of one class that are all residual (fx finds
    their residual add) or all untraceable (as Hugging Face decoder layers are; their shape is
    checked on the example input later). Traceable stacks win over untraceable ones. Raises
    SDPConfigError naming the candidates when there is none, or several of the longest length."""
    traced: dict[str, int] = {}
    untraced: dict[str, int] = {}
    for path, module in model.named_modules():
        members = list(module.children())
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(members) < 2 \
                or len({type(m) for m in members}) != 1 or not any(True for _ in module.parameters()):
            continue
        try:
            graphs = [trace_residual(m, f"{path}.{i}") for i, m in enumerate(members)]
        except SDPConfigError:
            continue  # traceable, and not residual
        if all(g is not None for g in graphs):
            traced[path] = len(members)
        elif all(g is None for g in graphs):
            untraced[path] = len(members)
    candidates = traced or untraced
    if not candidates:
        raise SDPConfigError(
            f'blocks="auto": {type(model).__name__} has no ModuleList/Sequential of two or more residual blocks of '
            "one class; pass the container's path (blocks=\"model.layers\") or a list of block paths")
    longest = max(candidates.values())
    best = [p for p, n in candidates.items() if n == longest]
    if len(best) > 1:
        raise SDPConfigError(
            f'blocks="auto": several stacks of {longest} residual blocks: {best}; pass one of them, or a list of '
            "the block paths of all of them")
    kind = type(next(get_module(model, best[0]).children())).__name__
    warnings.warn(f'blocks="auto" chose {best[0]!r}: {longest} {kind} blocks', stacklevel=3)
    return best[0]


def trace_residual(block: nn.Module, name: str) -> ResidualGraph | None:
    """Trace ``block`` and find its residual add; None when fx cannot trace it."""
    try:
        traced = torch.fx.symbolic_trace(block)
    except Exception:  # noqa: BLE001 - any tracing failure means "not traceable", handled by caller
        return None
    gm = _keep_buffer_persistence(traced, block)
    modules = dict(gm.named_modules())
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    node = outputs[0].args[0]
    # Walk back from the output through parameter-free single-input ops (activations, dropout).
    while isinstance(node, torch.fx.Node) and not _is_add(node):
        inputs = _input_nodes(node)
        parameter_free = node.op != "call_module" or not any(True for _ in modules[node.target].parameters())
        if len(inputs) != 1 or not parameter_free or node.op in ("placeholder", "get_attr"):
            break
        node = inputs[0]
    if not (isinstance(node, torch.fx.Node) and _is_add(node)):
        raise SDPConfigError(
            f"block {name!r} ({type(block).__name__}) is not residual: its output is not "
            "post(shortcut(x) + f(x)), so dropping it would change the network's shapes or cut it; "
            "choose residual blocks (e.g. the layers of a transformer or the blocks of a ResNet stage)")
    outer = node
    branches: list[tuple[torch.fx.Node, torch.fx.Node]] = []
    # A pre-norm transformer layer chains its residual adds: h = x + attn(x); y = h + mlp(h). Follow
    # the shortcut side through every add, so the dropped layer is the identity, not x + attn(x).
    while True:
        a, b = node.args[0], node.args[1]
        upstream_a = _param_modules_upstream(a, modules)
        upstream_b = _param_modules_upstream(b, modules)
        if len(upstream_a) == len(upstream_b):
            raise SDPConfigError(
                f"block {name!r}: cannot tell the residual branch from the shortcut "
                f"(both sides of the add use {len(upstream_a)} parameterised modules)")
        branch, shortcut = (a, b) if len(upstream_a) > len(upstream_b) else (b, a)
        # a Node: only a Node has parameterised modules upstream, and the branch has more than the shortcut
        branches.append((node, cast(torch.fx.Node, branch)))
        if not (isinstance(shortcut, torch.fx.Node) and _is_add(shortcut)):
            break
        node = shortcut
    return ResidualGraph(gm, outer, branches, shortcut)


@dataclass
class BlockInfo:
    """What the engine knows about one block unit."""

    path: str
    traced: bool
    shortcut_modules: list[str] = field(default_factory=list)  # relative to the block: shared

    def is_shortcut_key(self, relative_key: str) -> bool:
        """Whether a block-relative state_dict key belongs to the kept shortcut (a shared tensor)."""
        return any(relative_key.startswith(m + ".") for m in self.shortcut_modules)

    def dropped_module(self, block: nn.Module) -> nn.Module:
        """The module that replaces the block on a worker that does not hold it."""
        if not self.traced:
            return SkippedBlock(self.path)
        res = trace_residual(block, self.path)
        assert res is not None
        graph = res.graph_module.graph
        res.add.replace_all_uses_with(res.shortcut)
        graph.erase_node(res.add)
        graph.eliminate_dead_code()
        gm = _graph_module(block, res.graph_module, graph, f"Dropped{type(block).__name__}")
        # The post-add ops now act on the shortcut, which may be the block's own input (saved for
        # the previous layer's backward): an in-place activation there would corrupt it.
        for node in gm.graph.nodes:
            if node.op == "call_module" and getattr(gm.get_submodule(node.target), "inplace", False):
                out_of_place: Any = copy.copy(gm.get_submodule(node.target))  # any module with .inplace
                out_of_place.inplace = False
                name = node.target.replace(".", "_") + "_out_of_place"
                gm.add_submodule(name, out_of_place)
                node.target = name
            elif node.op == "call_function" and node.kwargs.get("inplace"):
                node.kwargs = {**node.kwargs, "inplace": False}
            elif node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
                    and not node.target.startswith("__"):
                node.target = node.target[:-1]
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm

    def scaled_module(self, block: nn.Module, scale: float) -> nn.Module:
        """The held block with its residual branch multiplied by ``scale`` (train-time scaling).
        Parameter names are kept, so state_dict keys do not change."""
        if not self.traced:
            block.register_forward_hook(_scale_residual_hook(scale), with_kwargs=True)
            return block
        res = trace_residual(block, self.path)
        assert res is not None
        graph = res.graph_module.graph
        for add, branch in res.branches:
            with graph.inserting_after(branch):
                scaled = graph.call_function(operator.mul, (branch, scale))
            add.replace_input_with(branch, scaled)
        return _graph_module(block, res.graph_module, graph, f"Scaled{type(block).__name__}")


def analyse_block(block: nn.Module, path: str) -> BlockInfo:
    """Find how ``block`` is dropped, and which of its parameters belong to the kept shortcut."""
    res = trace_residual(block, path)
    if res is None:
        return BlockInfo(path, traced=False)
    modules = dict(res.graph_module.named_modules())
    shortcut_modules = set(_param_modules_upstream(res.shortcut, modules))
    # Parameter-free modules on the shortcut path can still own buffers (a norm's running stats).
    stack = [res.shortcut] if isinstance(res.shortcut, torch.fx.Node) else []
    while stack:
        node = stack.pop()
        if node.op == "call_module":
            shortcut_modules.add(cast(str, node.target))  # call_module: the module's qualified name
        stack.extend(node.all_input_nodes)
    return BlockInfo(path, traced=True, shortcut_modules=sorted(shortcut_modules))


# ---------------------------------------------------------------------------------------------
# Neurons: recognised patterns and how their tensors are sliced


@dataclass(frozen=True)
class TensorSlice:
    """One tensor cut along ``dim``: hidden unit u owns ``unit_width`` consecutive entries in each
    of ``segments`` equal parts of that dim (segments=3 for a fused q/k/v projection)."""

    module: str
    tensor: str
    dim: int
    unit_width: int
    segments: int = 1

    def full_ranges(self, full_len: int, start: int, stop: int) -> list[tuple[int, int]]:
        seg = full_len // self.segments
        return [(s * seg + start * self.unit_width, s * seg + stop * self.unit_width)
                for s in range(self.segments)]

    def local_ranges(self, local_len: int, offset: int, width: int) -> list[tuple[int, int]]:
        """Ranges of a group that starts ``offset`` hidden units into the locally held ones."""
        seg = local_len // self.segments
        return [(s * seg + offset * self.unit_width, s * seg + (offset + width) * self.unit_width)
                for s in range(self.segments)]


@dataclass
class NeuronSite:
    """A recognised hidden-width pattern inside a block, split into groups of hidden units."""

    path: str
    block: str
    pattern: str                 # "mlp" | "gated-mlp" | "attention" | "conv"
    hidden: int                  # hidden units: neurons, key/value heads, or inner channels
    slices: list[TensorSlice]
    output: str                  # module whose input is scaled at train time
    # int attributes counting heads (or heads x head size), by path relative to ``path``: each
    # becomes value / hidden * held hidden units on a forward-masked worker
    head_attrs: dict[str, int] = field(default_factory=dict)
    heads_per_unit: int = 1
    groups: list[tuple[int, int]] = field(default_factory=list)

    def split(self, num_groups: int) -> None:
        """Split the hidden units into ``num_groups`` contiguous groups, as even as possible."""
        g = max(1, min(num_groups, self.hidden))
        bounds = [round(i * self.hidden / g) for i in range(g + 1)]
        self.groups = [(bounds[i], bounds[i + 1]) for i in range(g)]

    def unit_name(self, g: int) -> str:
        return f"{self.path}#{g}"


_GATED_MLP = [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")]
_PLAIN_MLP = [("fc1", "fc2"), ("c_fc", "c_proj"), ("up_proj", "down_proj"), ("lin1", "lin2"),
              ("linear1", "linear2"), ("dense_h_to_4h", "dense_4h_to_h"), ("w_in", "w_out")]
# an MLP whose two projections live in sibling submodules (BERT, RoBERTa, ViT of transformers 4.x)
_SPLIT_MLP = [("intermediate.dense", "output.dense")]
_ATTENTION = [("q_proj", "k_proj", "v_proj", "o_proj"), ("wq", "wk", "wv", "wo"),
              ("query", "key", "value", "out_proj"), ("q", "k", "v", "o")]
# q/k/v in one child, the output projection in a sibling: (child holding q/k/v, q, k, v, output)
_SPLIT_ATTENTION = [("self", "query", "key", "value", "output.dense"),
                    ("attention", "query", "key", "value", "output.dense")]
_FUSED_ATTENTION = [("qkv", "proj"), ("qkv", "out"), ("qkv_proj", "o_proj"), ("Wqkv", "out_proj"),
                    ("c_attn", "c_proj")]
_HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "n_head", "num_attention_heads")
_KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")
_HEAD_WIDTH_ATTRS = ("split_size", "all_head_size")  # heads x head size, read by the forward
_HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size")


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return dict(module.named_children())


def _submodule(module: nn.Module, rel: str) -> nn.Module | None:
    try:
        return module.get_submodule(rel)
    except AttributeError:
        return None


def is_conv1d(module: Any) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out) = (nx, nf)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(getattr(module, "nx", None), int) and isinstance(weight, torch.Tensor)
            and weight.dim() == 2 and tuple(weight.shape) == (module.nx, module.nf))


def _is_projection(module: Any) -> TypeIs[nn.Module]:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _out_features(layer: nn.Module) -> int:
    return layer.nf if is_conv1d(layer) else layer.out_features  # type: ignore[return-value]


def _in_features(layer: nn.Module) -> int:
    return layer.nx if is_conv1d(layer) else layer.in_features  # type: ignore[return-value]


def _projection_slices(path: str, name: str, layer: nn.Module, side: str, width: int,
                       segments: int = 1) -> list[TensorSlice]:
    """The tensors of a projection cut along its outputs (``side="out"``: weight and bias) or its
    inputs (``side="in"``: weight only). An nn.Linear's outputs are weight dim 0, a Conv1D's dim 1."""
    module = _join(path, name)
    out_dim, in_dim = (1, 0) if is_conv1d(layer) else (0, 1)
    if side == "in":
        return [TensorSlice(module, "weight", in_dim, width, segments)]
    out = [TensorSlice(module, "weight", out_dim, width, segments)]
    if getattr(layer, "bias", None) is not None:
        out.append(TensorSlice(module, "bias", 0, width, segments))
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else (path or name)


def _match_site(module: nn.Module, path: str, block: str) -> NeuronSite | None:
    """Recognise a neuron pattern at ``module``; None if it is none of the known ones."""
    ch = _children(module)
    is_proj = lambda n: _is_projection(ch.get(n))  # noqa: E731
    for gate, up, down in _GATED_MLP:
        if is_proj(gate) and is_proj(up) and is_proj(down):
            hidden = _out_features(ch[up])
            slices = (_projection_slices(path, gate, ch[gate], "out", 1)
                      + _projection_slices(path, up, ch[up], "out", 1)
                      + _projection_slices(path, down, ch[down], "in", 1))
            return NeuronSite(path, block, "gated-mlp", hidden, slices, _join(path, down))
    for up, down in _PLAIN_MLP + _SPLIT_MLP:
        up_layer, down_layer = _submodule(module, up), _submodule(module, down)
        if _is_projection(up_layer) and _is_projection(down_layer) \
                and _out_features(up_layer) == _in_features(down_layer):
            slices = (_projection_slices(path, up, up_layer, "out", 1)
                      + _projection_slices(path, down, down_layer, "in", 1))
            return NeuronSite(path, block, "mlp", _out_features(up_layer), slices, _join(path, down))
    if isinstance(module, nn.Sequential) and len(module) >= 3:
        layers = list(module)
        if (_is_projection(layers[0]) and _is_projection(layers[-1])
                and not any(True for m in layers[1:-1] for _ in m.parameters())):
            slices = _projection_slices(path, "0", layers[0], "out", 1) + _projection_slices(
                path, str(len(layers) - 1), layers[-1], "in", 1)
            return NeuronSite(path, block, "mlp", _out_features(layers[0]), slices,
                              _join(path, str(len(layers) - 1)))
    attention = _match_attention(module, ch, path, block)
    if attention is not None:
        return attention
    conv1, bn1, conv2 = ch.get("conv1"), ch.get("bn1"), ch.get("conv2")
    if (isinstance(conv1, nn.Conv2d) and isinstance(bn1, nn.BatchNorm2d) and isinstance(conv2, nn.Conv2d)
            and conv1.groups == 1 and conv2.groups == 1 and conv1.out_channels == bn1.num_features
            and conv2.in_channels == conv1.out_channels):
        slices = [TensorSlice(f"{path}.conv1", "weight", 0, 1)]
        if conv1.bias is not None:
            slices.append(TensorSlice(f"{path}.conv1", "bias", 0, 1))
        for t in ("weight", "bias", "running_mean", "running_var"):
            if getattr(bn1, t, None) is not None:
                slices.append(TensorSlice(f"{path}.bn1", t, 0, 1))
        slices.append(TensorSlice(f"{path}.conv2", "weight", 1, 1))
        return NeuronSite(path, block, "conv", conv1.out_channels, slices, _join(path, "conv2"))
    return None


def _head_dim(module: nn.Module, q_rows: int, path: str) -> int:
    for attr in _HEAD_DIM_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    for attr in _HEAD_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return q_rows // value
    raise SDPConfigError(
        f"attention {path!r}: cannot find its head size (looked for attributes "
        f"{_HEAD_DIM_ATTRS + _HEAD_COUNT_ATTRS})")


def _head_attrs(module: nn.Module, prefix: str = "") -> dict[str, int]:
    """The int attributes of ``module`` that count heads (or heads x head size), keyed by their
    path relative to the site (``prefix`` is the owner's path relative to the site)."""
    return {_join(prefix, a): getattr(module, a) for a in _HEAD_COUNT_ATTRS + _KV_HEAD_COUNT_ATTRS + _HEAD_WIDTH_ATTRS
            if isinstance(getattr(module, a, None), int) and not isinstance(getattr(module, a), bool)}


def _match_attention(module: nn.Module, ch: dict[str, nn.Module], path: str,
                     block: str) -> NeuronSite | None:
    is_proj = lambda n: _is_projection(ch.get(n))  # noqa: E731
    for q, k, v, o in _ATTENTION:
        if all(is_proj(n) for n in (q, k, v, o)):
            return _qkvo_site(module, "", (ch[q], ch[k], ch[v]), (q, k, v), ch[o], o, path, block)
    for owner, q, k, v, o in _SPLIT_ATTENTION:
        inner, out = ch.get(owner), _submodule(module, o)
        if inner is None or not _is_projection(out):
            continue
        layers = [m for m in (_submodule(inner, n) for n in (q, k, v)) if _is_projection(m)]
        if len(layers) == 3 and _in_features(out) == _out_features(layers[0]):  # q, k and v all projections
            names = tuple(_join(owner, n) for n in (q, k, v))
            return _qkvo_site(inner, owner, layers, names, out, o, path, block)
    for qkv, o in _FUSED_ATTENTION:
        if is_proj(qkv) and is_proj(o) and _out_features(ch[qkv]) == 3 * _in_features(ch[o]):
            rows = _in_features(ch[o])
            hd = _head_dim(module, rows, path)
            slices = (_projection_slices(path, qkv, ch[qkv], "out", hd, segments=3)
                      + _projection_slices(path, o, ch[o], "in", hd))
            return NeuronSite(path, block, "attention", rows // hd, slices, _join(path, o),
                              head_attrs=_head_attrs(module))
    return None


def _qkvo_site(owner: nn.Module, owner_path: str, qkv: Sequence[nn.Module], names: Sequence[str],
               o_layer: nn.Module, o: str, path: str, block: str) -> NeuronSite:
    """Attention with separate q/k/v projections (held by ``owner``, at ``owner_path`` relative to
    the site) and an output projection; one unit is one key/value head with its query heads."""
    q_rows, k_rows = _out_features(qkv[0]), _out_features(qkv[1])
    hd = _head_dim(owner, q_rows, path)
    if q_rows % hd or k_rows % hd or q_rows % k_rows or _in_features(o_layer) != q_rows:
        raise SDPConfigError(f"attention {path!r}: q/k/v/o shapes do not fit head size {hd}")
    rep = q_rows // k_rows
    slices = (_projection_slices(path, names[0], qkv[0], "out", rep * hd)
              + _projection_slices(path, names[1], qkv[1], "out", hd)
              + _projection_slices(path, names[2], qkv[2], "out", hd)
              + _projection_slices(path, o, o_layer, "in", rep * hd))
    return NeuronSite(path, block, "attention", k_rows // hd, slices, _join(path, o),
                      head_attrs=_head_attrs(owner, owner_path), heads_per_unit=rep)


def find_neuron_sites(model: nn.Module, block_path: str) -> list[NeuronSite]:
    """All recognised neuron patterns inside a block, outermost first. A pattern is taken unless
    one of the modules it slices is already sliced by a pattern found before it, so a block whose
    own children form an MLP (BERT's ``intermediate``/``output``) still has its attention found."""
    block = get_module(model, block_path)
    sites: list[NeuronSite] = []
    claimed: set[str] = set()
    for rel, module in block.named_modules():
        site = _match_site(module, _join(block_path, rel), block_path)
        if site is None:
            continue
        sliced = {s.module for s in site.slices}
        if sliced & claimed:
            continue
        sites.append(site)
        claimed |= sliced
    if not sites:
        layout = ", ".join(f"{n}: {type(m).__name__}" for n, m in block.named_children())
        raise SDPConfigError(
            f"block {block_path!r} ({type(block).__name__}) has no recognisable neuron pattern "
            f"(plain MLP, gated MLP, attention q/k/v/o or fused qkv, conv-norm-conv; nn.Linear or Conv1D "
            f"projections); children: {layout}")
    return sites


def refresh_shape_attributes(module: nn.Module) -> None:
    """Make a layer's size attributes agree with its (sliced) weight."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        conv1d: Any = module  # Hugging Face's Conv1D, known by name only
        conv1d.nx, conv1d.nf = conv1d.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]
