"""Block- and neuron-level SDP on the model families people use: our ResNet-18, ViT and LLaMA, and
Hugging Face LLaMA, GPT-2 (Conv1D, fused c_attn), BERT (q/k/v and the output projection in sibling
submodules) and ViT, each a tiny randomly initialised config built here (no downloads).

``CASES`` is the list that ``scripts/models_table.py`` turns into ``docs/models.md``, through
``one_step`` below, so the table and the tests cannot disagree."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import runpy
import sys
from typing import Callable
from unittest import mock

import pytest
import torch
from torch import nn

from subnetdp import SDPConfigError, SubnetworkSimulator
from subnetdp.engine.units import find_neuron_sites, is_conv1d

from _models import (
    family_bert,
    family_gpt2,
    family_hf_llama,
    family_hf_vit,
    family_llama,
    family_plain_mlp,
    family_resnet18,
    family_vit,
    kept_columns,
    train_steps,
)

# (family, builder, path of its stack of blocks); builder(seed) -> (model, batch(seed), loss(model, batch))
CASES: list[tuple[str, Callable, str]] = [
    ("ResNet-18 (subnetdp.models.resnet18)", family_resnet18, "blocks"),
    ("ViT (subnetdp.models.vit)", family_vit, "blocks"),
    ("LLaMA (subnetdp.models.llama, preset debug)", family_llama, "layers"),
    ("Hugging Face LlamaForCausalLM", family_hf_llama, "model.layers"),
    ("Hugging Face GPT2LMHeadModel", family_gpt2, "transformer.h"),
    ("Hugging Face BertForSequenceClassification", family_bert, "bert.encoder.layer"),
    ("Hugging Face ViTForImageClassification", family_hf_vit, "vit.layers"),
    ("Plain MLP, no skip connection (tests/_models.py PlainMLP)", family_plain_mlp, "layers"),
]
NEW_NEURON_FAMILIES = [c for c in CASES if c[2] in ("transformer.h", "bert.encoder.layer", "vit.layers")]
TRANSFORMERS = [c for c in CASES if c[1] not in (family_resnet18, family_plain_mlp)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _output(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def check_training(builder: Callable, path: str, level: str, masking: str, steps: int = 1) -> None:
    """4 simulated workers at C = 0.5 train ``steps`` steps; the assembled model loads strictly into
    a fresh instance, and every weight matrix inside the blocks has moved."""
    model, batch, loss = builder(0)
    initial = copy.deepcopy(model.state_dict())
    sim = SubnetworkSimulator(model, 4, coverage=0.5, masking=masking, **{level: path})
    train_steps(sim, batch, loss, steps)
    full = sim.full_state_dict()
    fresh = builder(1)[0]
    fresh.load_state_dict(full, strict=True)
    moved = [k for k, v in initial.items() if k.startswith(path + ".") and v.dim() >= 2]
    assert moved, f"no weight under {path!r}"
    for key in moved:
        assert not torch.equal(full[key], initial[key]), f"{key} was not trained"
    with torch.no_grad():
        assert torch.isfinite(loss(fresh, batch(7)))


def one_step(builder: Callable, path: str, level: str, masking: str) -> str:
    """The compatibility table's cell: "works", or the SDPConfigError message a user sees."""
    try:
        check_training(builder, path, level, masking)
    except SDPConfigError as e:
        return f"SDPConfigError: {e}"
    return "works"


def zero_missing_inputs(model: nn.Module, worker: nn.Module) -> nn.Module:
    """The reference for a forward-masked neuron-level worker (scale 'none'): a copy of ``model`` in
    which each output projection that the worker holds with fewer inputs has the inputs it does not
    hold zeroed: an nn.Linear's weight columns, a Conv1D's weight rows (its weight is (in, out)).
    Which inputs are held is read from the worker's own weights, matched by value."""
    ref = copy.deepcopy(model)
    held = dict(worker.module.named_modules())
    for name, module in ref.named_modules():
        part = held.get(name)
        if isinstance(module, nn.Linear):
            full_w, part_w = module.weight, part.weight if part is not None else None
        elif is_conv1d(module):  # inputs are rows: compare the transposes
            full_w, part_w = module.weight.T, part.weight.T if part is not None else None
        else:
            continue
        if part_w is None or part_w.shape[1] == full_w.shape[1]:
            continue
        assert part_w.shape[0] == full_w.shape[0], f"{name}: both dimensions sliced"
        drop = torch.ones(full_w.shape[1], dtype=torch.bool)
        drop[kept_columns(full_w, part_w)] = False
        with torch.no_grad():
            full_w[:, drop] = 0  # a view of the weight (a transposed view for Conv1D)
    return ref


@pytest.mark.parametrize("family,builder,path", NEW_NEURON_FAMILIES, ids=[c[2] for c in NEW_NEURON_FAMILIES])
def test_neuron_sites_cover_attention_and_mlp(family: str, builder: Callable, path: str) -> None:
    model = builder(0)[0]
    sites = find_neuron_sites(model, f"{path}.0")
    assert sorted(s.pattern for s in sites) == ["attention", "mlp"], family
    attention = next(s for s in sites if s.pattern == "attention")
    assert attention.hidden == 4  # heads


@pytest.mark.parametrize("family,builder,path", TRANSFORMERS, ids=[c[1].__name__ for c in TRANSFORMERS])
def test_forward_masked_worker_is_the_full_model_with_missing_neurons_zeroed(
        family: str, builder: Callable, path: str) -> None:
    model, batch, _ = builder(0)
    x = batch(5)[0]
    sim = SubnetworkSimulator(model, 4, neurons=path, coverage=0.5)
    with torch.no_grad():
        full = _output(model(x))
        for r, worker in enumerate(sim.workers):
            assert sum(p.numel() for p in worker.parameters()) < sum(p.numel() for p in model.parameters())
            out = _output(worker(x))
            torch.testing.assert_close(out, _output(zero_missing_inputs(model, worker)(x)), atol=1e-5, rtol=1e-5,
                                       msg=f"{family}: worker {r}")
            assert not torch.allclose(out, full, atol=1e-4), f"{family}: worker {r} computes the full model"
    fresh = builder(1)[0]
    fresh.load_state_dict(sim.full_state_dict(), strict=True)
    for key, value in model.state_dict().items():  # untrained: assembly gives back the model
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("masking", ["forward", "backward"])
@pytest.mark.parametrize("family,builder,path", NEW_NEURON_FAMILIES, ids=[c[2] for c in NEW_NEURON_FAMILIES])
def test_neuron_level_trains_and_assembles(family: str, builder: Callable, path: str, masking: str) -> None:
    check_training(builder, path, "neurons", masking, steps=2)


def test_backward_masked_worker_computes_the_full_model() -> None:
    for _, builder, path in NEW_NEURON_FAMILIES:
        model, batch, _ = builder(0)
        x = batch(5)[0]
        sim = SubnetworkSimulator(model, 4, neurons=path, coverage=0.5, masking="backward")
        with torch.no_grad():
            for worker in sim.workers:
                torch.testing.assert_close(_output(worker(x)), _output(model(x)))


@pytest.mark.parametrize("family,builder,path", NEW_NEURON_FAMILIES, ids=[c[2] for c in NEW_NEURON_FAMILIES])
def test_block_level_trains_and_assembles(family: str, builder: Callable, path: str) -> None:
    check_training(builder, path, "blocks", "forward")


def test_forward_masking_updates_width_attributes() -> None:
    gpt2 = family_gpt2(0)[0]
    sim = SubnetworkSimulator(gpt2, 4, neurons="transformer.h", coverage=0.5)
    attn = sim.workers[0].module.transformer.h[0].attn
    held_heads = attn.c_proj.weight.shape[0] // attn.head_dim
    assert 0 < held_heads < 4 and attn.num_heads == held_heads and attn.split_size == held_heads * attn.head_dim
    assert (attn.c_attn.nx, attn.c_attn.nf) == tuple(attn.c_attn.weight.shape) == (32, 3 * attn.split_size)
    bert = family_bert(0)[0]
    sim = SubnetworkSimulator(bert, 4, neurons="bert.encoder.layer", coverage=0.5)
    self_attn = sim.workers[0].module.bert.encoder.layer[0].attention.self
    assert self_attn.all_head_size == self_attn.query.out_features == \
        self_attn.num_attention_heads * self_attn.attention_head_size < 32


class ViTLayer4(nn.Module):
    """A ViT layer laid out as in transformers 4.x (``attention.attention.{query,key,value}``,
    ``attention.output.dense``, ``intermediate.dense``, ``output.dense``), whose forward reads
    ``num_attention_heads`` and ``all_head_size``, as 4.x's ``ViTSelfAttention`` did."""

    def __init__(self, dim: int = 16, heads: int = 4, hidden: int = 24) -> None:
        super().__init__()
        inner = nn.Module()
        inner.num_attention_heads, inner.attention_head_size, inner.all_head_size = heads, dim // heads, dim
        inner.query, inner.key, inner.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attention = nn.Module()
        self.attention.attention, self.attention.output = inner, nn.Module()
        self.attention.output.dense = nn.Linear(dim, dim)
        self.intermediate, self.output = nn.Module(), nn.Module()
        self.intermediate.dense, self.output.dense = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, (b, n, _) = self.attention.attention, x.shape
        h = self.norm1(x)
        q, k, v = (layer(h).view(b, n, a.num_attention_heads, a.attention_head_size).transpose(1, 2)
                   for layer in (a.query, a.key, a.value))
        context = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, a.all_head_size)
        x = x + self.attention.output.dense(context)
        return x + self.output.dense(nn.functional.gelu(self.intermediate.dense(self.norm2(x))))


def test_transformers_4_vit_layout_and_its_width_attributes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Sequential(ViTLayer4(), ViTLayer4()))
    assert sorted((s.pattern, s.path) for s in find_neuron_sites(model, "1.0")) == [
        ("attention", "1.0.attention"), ("mlp", "1.0")]
    sim = SubnetworkSimulator(model, 4, neurons="1", coverage=0.5)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        for worker in sim.workers:
            inner = worker.module[1][0].attention.attention
            assert inner.num_attention_heads == 2 and inner.all_head_size == 8 == inner.query.out_features
            torch.testing.assert_close(worker(x), zero_missing_inputs(model, worker)(x), atol=1e-5, rtol=1e-5)
    train_steps(sim, lambda seed: torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed)),
                lambda m, x: m(x).square().mean())
    nn.Sequential(nn.Linear(16, 16), nn.Sequential(ViTLayer4(), ViTLayer4())).load_state_dict(
        sim.full_state_dict(), strict=True)


@pytest.mark.slow
def test_compatibility_table_is_current(tmp_path) -> None:
    out = tmp_path / "models.md"
    script = os.path.join(REPO, "scripts", "models_table.py")
    with mock.patch.object(sys, "argv", [script, "--out", str(out)]), contextlib.redirect_stdout(io.StringIO()):
        runpy.run_path(script, run_name="__main__")  # in this process: the command, without its start-up
    text = out.read_text()
    assert text.splitlines()[2] == "Regenerate with `python scripts/models_table.py --out docs/models.md` (the test " \
        "suite fails when this file is stale)."
    rows = [re.split(r"(?<!\\)\|", line.strip().strip("|")) for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| Family", "| ---"))]
    assert len(rows) == len(CASES) and all(len(row) == 6 for row in rows)

    def working(columns: slice) -> int:  # family | path | block fwd | block bwd | neuron fwd | neuron bwd
        return sum(all(c.strip() == "works" for c in row[columns]) for row in rows)

    assert working(slice(2, 4)) >= 5, "fewer than five families work at block level"
    assert working(slice(4, 6)) >= 4, "fewer than four families work at neuron level"
    assert any("SDPConfigError" in cell for row in rows for cell in row), "no error row"
    with open(os.path.join(REPO, "docs", "models.md")) as f:
        committed = [line for line in f.read().splitlines() if line.startswith("|")]
    assert committed == [line for line in text.splitlines() if line.startswith("|")], \
        "docs/models.md is stale: regenerate it with python scripts/models_table.py"
