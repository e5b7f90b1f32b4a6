"""The model classes a subnetwork can be exported as: how each one's constructor arguments (or
Hugging Face config) are read off the subnetwork's tensors, and how its folder loads.

    subnetdp.models.ResNet   layers per stage, inner_widths, projection_blocks
    subnetdp.models.ViT      depth, heads, head_dim, mlp_hidden
    subnetdp.models.Llama    LlamaConfig: n_layers, n_heads, n_kv_heads, head_dim, hidden_dim
    Hugging Face models      config: num_hidden_layers (n_layer, num_layers), layer_types; at neuron
                             level intermediate_size, num_attention_heads, num_key_value_heads, head_dim

Each family builds a fresh instance from those arguments; the caller loads the weights strictly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any

import torch
from torch import nn

from ..engine.errors import SDPConfigError
from ..engine.subnetwork import Subnetwork


def _indices(state: dict[str, torch.Tensor], container: str) -> list[int]:
    """The element indices of ``container`` (a ModuleList path) that the state has keys under."""
    pattern = re.compile(re.escape(container) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _uniform(values: list[int], what: str) -> int:
    if len(set(values)) != 1:
        raise SDPConfigError(f"the layers' {what} differ ({values}); this class takes one value for every layer")
    return values[0]


class Family:
    """One kind of model class: ``build`` a fresh model for a subnetwork's tensors (``state``,
    keys renumbered; ``entries``: the kept blocks; ``widths``: each neuron site's place in its
    block -> (pattern, held hidden units, heads per unit) where they differ from the full model)."""

    name = ""
    uniform_widths = True  # the constructor takes one width for all layers: narrower ones are zero-padded

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def build(self, worker: Subnetwork, state: dict[str, torch.Tensor], entries: list[Any],
              widths: dict[str, tuple[str, int, int]]) -> tuple[nn.Module, dict[str, Any]]:
        raise NotImplementedError


class SubnetdpModel(Family):
    """A model of ``subnetdp.models``: ``config`` is {"class", "module", "kwargs"}; the class
    rebuilds it from JSON (``construct``)."""

    class_name = ""
    module_name = ""
    builder = ""  # the function of subnetdp.models (and `subnetdp train`'s [model] name) taking the same kwargs

    def matches(self, module: nn.Module) -> bool:
        from .. import models
        return type(module) is getattr(models, self.class_name)

    def config(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"class": self.class_name, "module": self.module_name, "kwargs": kwargs, "builder": self.builder}


class ResNetFamily(SubnetdpModel):
    name, class_name, module_name, builder = "resnet", "ResNet", "subnetdp.models.resnet", "resnet18"
    uniform_widths = False  # inner_widths is per block

    def build(self, worker: Subnetwork, state: dict[str, torch.Tensor], entries: list[Any],
              widths: dict[str, tuple[str, int, int]]) -> tuple[nn.Module, dict[str, Any]]:
        from ..models import ResNet
        width, in_channels = state["stem.0.weight"].shape[:2]
        num_classes, last = state["fc.weight"].shape
        stages = int(round(math.log2(last / width))) + 1
        layers, inner, planes_of, projections = [0] * stages, [], [], []
        for j in _indices(state, "blocks"):
            if f"blocks.{j}.conv2.weight" in state:
                planes = int(state[f"blocks.{j}.conv2.weight"].shape[0])
                inner.append(int(state[f"blocks.{j}.conv1.weight"].shape[0]))
            else:
                planes = int(state[f"blocks.{j}.downsample.0.weight"].shape[0])
                inner.append(0)
                projections.append(j)
            planes_of.append(planes)
            layers[int(round(math.log2(planes / width)))] += 1
        plain = not projections and inner == planes_of
        kwargs: dict[str, Any] = {
            "layers": layers, "num_classes": int(num_classes), "in_channels": int(in_channels), "width": int(width),
            "inner_widths": None if plain else inner, "projection_blocks": projections}
        return ResNet(**kwargs), self.config(kwargs)


class ViTFamily(SubnetdpModel):
    name, class_name, module_name, builder = "vit", "ViT", "subnetdp.models.vit", "vit"

    def build(self, worker: Subnetwork, state: dict[str, torch.Tensor], entries: list[Any],
              widths: dict[str, tuple[str, int, int]]) -> tuple[nn.Module, dict[str, Any]]:
        module: Any = worker.module  # the model's own attributes (config, drop) are read below
        from ..models import ViT
        blocks = _indices(state, "blocks")
        head_dim = _head_dim([module, *worker.templates.values()])
        dim, in_channels, patch = state["patch_embed.weight"].shape[:3]
        tokens = state["pos_embed"].shape[1]
        kwargs: dict[str, Any] = {
            "image_size": int(math.isqrt(tokens)) * int(patch), "patch_size": int(patch),
            "in_channels": int(in_channels), "num_classes": int(state["head.weight"].shape[0]), "dim": int(dim),
            "depth": len(blocks),
            "heads": _uniform([state[f"blocks.{j}.attn.qkv.weight"].shape[0] // (3 * head_dim) for j in blocks],
                              "head counts"),
            "dropout": float(module.drop.p), "head_dim": int(head_dim),
            "mlp_hidden": _uniform([state[f"blocks.{j}.mlp.fc1.weight"].shape[0] for j in blocks], "MLP widths")}
        return ViT(**kwargs), self.config(kwargs)


def _head_dim(modules: list[nn.Module]) -> int:
    """The head size of a ViT's attention: read from a block the cut left as it was, or from the
    meta copy of a dropped one (a train-time scaled block is a traced copy without the attribute)."""
    from ..models.vit import Attention
    for m in (m for module in modules for m in module.modules()):
        if isinstance(m, Attention):
            return int(m.head_dim)
    raise SDPConfigError("cannot find the ViT's head size: no attention module left as it was in the subnetwork")


class LlamaFamily(SubnetdpModel):
    name, class_name, module_name, builder = "llama", "Llama", "subnetdp.models.llama", "llama"

    def build(self, worker: Subnetwork, state: dict[str, torch.Tensor], entries: list[Any],
              widths: dict[str, tuple[str, int, int]]) -> tuple[nn.Module, dict[str, Any]]:
        module: Any = worker.module  # the model's own attributes (config, drop) are read below
        from ..models import Llama
        layers = _indices(state, "layers")
        original = module.config
        head_dim = original.head_size
        heads = _uniform([state[f"layers.{j}.attn.q_proj.weight"].shape[0] // head_dim for j in layers], "head counts")
        kv = _uniform([state[f"layers.{j}.attn.k_proj.weight"].shape[0] // head_dim for j in layers], "KV head counts")
        hidden = _uniform([state[f"layers.{j}.mlp.gate_proj.weight"].shape[0] for j in layers], "MLP widths")
        config = dataclasses.replace(
            original, n_layers=len(layers), n_heads=heads, n_kv_heads=kv if kv != heads else None,
            head_dim=None if heads == original.n_heads else head_dim, hidden_dim=hidden)
        return Llama(config), {**self.config(dataclasses.asdict(config)), "config_class": "LlamaConfig"}


def _layer_count_attr(config: Any) -> str:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, attr, None), int):
            return attr
    raise SDPConfigError(f"{type(config).__name__} has no layer count (num_hidden_layers, n_layer, num_layers)")


class HuggingFaceFamily(Family):
    """A ``transformers`` PreTrainedModel: the same class with a copy of its config, the layer
    count (and per-layer lists such as ``layer_types``) and, at neuron level, the widths changed;
    ``save_pretrained`` writes it."""

    name = "huggingface"

    def matches(self, module: nn.Module) -> bool:
        return hasattr(module, "config") and hasattr(module, "save_pretrained") and hasattr(module.config, "to_dict")

    def build(self, worker: Subnetwork, state: dict[str, torch.Tensor], entries: list[Any],
              widths: dict[str, tuple[str, int, int]]) -> tuple[nn.Module, dict[str, Any]]:
        module: Any = worker.module  # the model's own attributes (config, drop) are read below
        config = copy.deepcopy(module.config)
        attr = _layer_count_attr(config)
        old = getattr(config, attr)
        if entries:
            if len({e.source.rpartition(".")[0] for e in entries}) > 1:
                raise SDPConfigError(f"{type(config).__name__}: the blocks lie in several lists ("
                                     f"{sorted({e.source.rpartition('.')[0] for e in entries})}), and the config has "
                                     "one layer count: export at neuron level, or name one list of blocks")
            kept = [int(e.source.rpartition(".")[2]) for e in entries]
            setattr(config, attr, len(entries))
            for name, value in list(vars(config).items()):  # per-layer lists (layer_types, ...)
                if isinstance(value, list) and len(value) == old and name not in ("architectures",):
                    setattr(config, name, [value[i] for i in kept])
        for pattern, width, heads_per_unit in widths.values():
            if pattern == "attention":
                head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
                if not hasattr(config, "head_dim") and width * heads_per_unit != config.num_attention_heads:
                    raise SDPConfigError(f"{type(config).__name__} has no head_dim: its head size follows from "
                                         "hidden_size / num_attention_heads, so a model with fewer heads of the same "
                                         "size cannot be expressed in it (export at block level)")
                config.head_dim = head_dim
                config.num_attention_heads = width * heads_per_unit
                if hasattr(config, "num_key_value_heads"):
                    config.num_key_value_heads = width
            else:
                names = [n for n in ("intermediate_size", "n_inner", "ffn_dim") if hasattr(config, n)]
                if not names:
                    raise SDPConfigError(f"{type(config).__name__} has no MLP width (intermediate_size, n_inner, "
                                         "ffn_dim)")
                setattr(config, names[0], width)
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        model = type(module)(config).to(dtype)
        return model, config.to_dict()


FAMILIES: list[Family] = [ResNetFamily(), ViTFamily(), LlamaFamily(), HuggingFaceFamily()]


def family_of(module: nn.Module) -> Family:
    for family in FAMILIES:
        if family.matches(module):
            return family
    raise SDPConfigError(f"no exporter for {type(module).__name__}: a standalone subnetwork can be built for "
                         "subnetdp.models.ResNet, ViT and Llama, and Hugging Face transformers models")
