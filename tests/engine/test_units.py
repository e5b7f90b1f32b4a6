"""Unit discovery on models we did not write, slicing numerics, and errors for bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from subnetdp import SDPConfigError, SubnetworkSimulator, plan_for
from subnetdp.engine.units import SkippedBlock, analyse_block, find_neuron_sites
from subnetdp.models.resnet import BasicBlock

from _models import assert_each_neuron_has_k_holders, make, tiny_llama, zero_missing_columns


def test_downsampling_block_keeps_its_shortcut_when_dropped() -> None:
    torch.manual_seed(0)
    block = BasicBlock(4, 8, stride=2).eval()
    info = analyse_block(block, "b")
    assert info.traced and info.shortcut_modules == ["downsample.0", "downsample.1"]
    dropped = info.dropped_module(block)
    x = torch.randn(2, 4, 8, 8)
    x_before = x.clone()
    expected = torch.relu(block.downsample(x))
    torch.testing.assert_close(dropped(x), expected)
    assert torch.equal(x, x_before), "the dropped block must not modify its input in place"
    assert not any("conv1" in n for n, _ in dropped.named_parameters())


def test_identity_block_drops_to_its_input() -> None:
    block = BasicBlock(4, 4)
    dropped = analyse_block(block, "b").dropped_module(block)
    x = torch.rand(2, 4, 8, 8)  # non-negative, as after the previous block's ReLU
    torch.testing.assert_close(dropped(x), x)
    assert sum(p.numel() for p in dropped.parameters()) == 0


class PreNormLayer(nn.Module):
    """A transformer layer with two chained residual adds: h = x + f(x); y = h + g(h)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm1, self.f = nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.norm2, self.g = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.f(self.norm1(x))
        return h + self.g(self.norm2(h))


def test_pre_norm_layer_with_chained_adds_drops_to_identity_and_scales_both_branches() -> None:
    layer, x = PreNormLayer(), torch.randn(3, 8)
    info = analyse_block(layer, "layer")
    assert info.traced and info.shortcut_modules == []
    assert torch.equal(info.dropped_module(layer)(x), x)
    scaled = info.scaled_module(copy.deepcopy(layer), 2.0)
    h = x + 2.0 * layer.f(layer.norm1(x))
    torch.testing.assert_close(scaled(x), h + 2.0 * layer.g(layer.norm2(h)))


def test_hugging_face_decoder_layer_is_dropped_as_identity() -> None:
    model = tiny_llama()
    info = analyse_block(model.model.layers[0], "model.layers.0")
    assert not info.traced
    assert isinstance(info.dropped_module(model.model.layers[0]), SkippedBlock)


def test_neuron_patterns_in_unmodified_models() -> None:
    llama = tiny_llama()
    patterns = {s.path: (s.pattern, s.hidden) for s in find_neuron_sites(llama, "model.layers.0")}
    assert patterns == {"model.layers.0.self_attn": ("attention", 2),  # 2 key/value heads (GQA)
                        "model.layers.0.mlp": ("gated-mlp", 64)}
    resnet = make("resnet")
    [conv] = find_neuron_sites(resnet, "blocks.2")
    assert (conv.pattern, conv.hidden) == ("conv", resnet.blocks[2].conv1.out_channels)
    [mlp] = find_neuron_sites(make("mlp"), "blocks.0")
    assert (mlp.pattern, mlp.hidden) == ("mlp", 16)


def test_block_without_pattern_is_an_error_naming_it() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Sequential(nn.Conv1d(4, 4, 1))]))
    with pytest.raises(SDPConfigError, match=r"'1.0' .*no recognisable neuron pattern"):
        find_neuron_sites(model, "1.0")


@pytest.mark.parametrize("kind,blocks", [("llama", "model.layers"), ("mlp", "blocks")])
def test_sliced_worker_computes_the_subnetwork(kind: str, blocks: str) -> None:
    model = make(kind)
    sim = SubnetworkSimulator(model, 4, neurons=blocks, coverage=0.5, seed=1)
    x = torch.randint(0, 64, (2, 8)) if kind == "llama" else torch.randn(3, 5)
    for worker in sim.workers:
        ref, _ = zero_missing_columns(model, worker)
        out, expected = worker(x), ref(x)
        if kind == "llama":
            out, expected = out.logits, expected.logits
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        assert sum(p.numel() for p in worker.parameters()) < sum(p.numel() for p in model.parameters())
    assert_each_neuron_has_k_holders(sim, model)


def test_fused_qkv_attention_is_sliced_by_heads() -> None:
    class Attention(nn.Module):  # timm/ViT style: one qkv projection, num_heads read in forward
        def __init__(self, dim: int = 16, num_heads: int = 4) -> None:
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = nn.functional.scaled_dot_product_attention(q, k, v)
            return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attention()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.attn(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Sequential(Block(), Block()))
    sim = SubnetworkSimulator(model, 2, neurons="1", coverage=0.5)
    x = torch.randn(2, 5, 16)
    for worker in sim.workers:
        assert worker.module[1][0].attn.num_heads == 2
        torch.testing.assert_close(worker(x), zero_missing_columns(model, worker)[0](x), rtol=1e-4, atol=1e-5)
    assert_each_neuron_has_k_holders(sim, model)


# ---------------------------------------------------------------------------------------------
# plans and scaling (the wrapper's argument checks are in test_wrapper.py)


def test_plan_for_does_not_change_the_model() -> None:
    model = make("resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_for(model, 4, blocks="blocks", coverage=0.5, example_input=torch.randn(1, 1, 16, 16))
    assert plan.flops_counted and len(plan.holders) == 8
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_scale_residual_branches_multiplies_each_branch_and_keeps_keys() -> None:
    from subnetdp import scale_residual_branches
    model = make("resnet")
    x = torch.randn(2, 1, 32, 32)
    reference = copy.deepcopy(model).eval()
    scaled = scale_residual_branches(copy.deepcopy(model), "blocks", 0.5).eval()
    assert scaled.state_dict().keys() == model.state_dict().keys()
    block, h = reference.blocks[0], reference.stem(x)
    identity = h if block.downsample is None else block.downsample(h)
    expected = torch.relu(identity + 0.5 * block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h))))))
    torch.testing.assert_close(scaled.blocks[0](h), expected)
    assert not torch.allclose(scaled(x), reference(x))


class _Rotary(nn.Module):
    """Reads its own buffers in forward (fx records them as get_attr, not inside a leaf module)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("table", torch.linspace(0.5, 1.5, dim), persistent=False)
        self.register_buffer("kept", torch.ones(dim))  # persistent: must stay in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x * self.table) * self.kept


class BufferLayer(nn.Module):
    """A pre-norm residual layer with non-persistent buffers at the top and inside a child."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm, self.inner = nn.LayerNorm(dim), _Rotary(dim)
        self.register_buffer("gate", torch.full((dim,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(self.norm(x)) * self.gate


def test_traced_dropped_and_scaled_blocks_keep_buffer_persistence() -> None:
    layer, x = BufferLayer(), torch.randn(3, 8)
    info = analyse_block(layer, "layer")
    assert info.traced
    keys = set(layer.state_dict())
    assert "gate" not in keys and "inner.table" not in keys and "inner.kept" in keys
    scaled = info.scaled_module(copy.deepcopy(layer), 0.5)
    assert set(scaled.state_dict()) == keys
    assert {n for n, _ in scaled.named_buffers()} == {"gate", "inner.table", "inner.kept"}
    torch.testing.assert_close(scaled(x), x + 0.5 * layer.inner(layer.norm(x)) * layer.gate)
    scaled.load_state_dict(layer.state_dict(), strict=True)
    dropped = info.dropped_module(layer)
    assert set(dropped.state_dict()) == {k for k in keys if info.is_shortcut_key(k)} == set()
    torch.testing.assert_close(dropped(x), x)


class _ShortcutScale(nn.Module):
    """A parameter-free shortcut module with a non-persistent buffer, kept by the dropped block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("factor", torch.full((dim,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class ShortcutBufferBlock(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.shortcut, self.branch = _ShortcutScale(dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.branch(x)


def test_dropped_block_keeps_a_non_persistent_buffer_of_its_shortcut_non_persistent() -> None:
    block, x = ShortcutBufferBlock(), torch.randn(3, 8)
    dropped = analyse_block(block, "b").dropped_module(block)
    torch.testing.assert_close(dropped(x), 2.0 * x)  # the shortcut still reads its buffer
    assert {n for n, _ in dropped.named_buffers()} == {"shortcut.factor"}
    assert set(dropped.state_dict()) == set() == set(block.state_dict()) - {"branch.weight", "branch.bias"}


def test_scaled_llama_loads_its_own_state_dict_strictly() -> None:
    from subnetdp import scale_residual_branches
    from subnetdp.models import llama
    torch.manual_seed(0)
    model = llama("debug", vocab_size=32, max_seq_len=16)
    state = model.state_dict()
    assert not any("rope" in k for k in state)
    scaled = scale_residual_branches(llama("debug", vocab_size=32, max_seq_len=16), "layers", 0.5)
    assert set(scaled.state_dict()) == set(state)
    scaled.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 32, (2, 16))
    assert torch.isfinite(scaled(tokens)).all()
    # SDP with train-time scaling and dropped layers: each worker's keys are the full model's keys
    sim = SubnetworkSimulator(llama("debug", vocab_size=32, max_seq_len=16), 2, blocks="layers",
                              coverage=0.5, scale="inverse-coverage")
    for worker in sim.workers:
        assert set(worker.module.state_dict()) <= set(state)
    assert set(sim.full_state_dict()) == set(state)


def test_blocks_auto_finds_the_stack_of_residual_blocks_and_says_which() -> None:
    from subnetdp.engine.units import find_block_stack
    from subnetdp.models import resnet18, vit

    from _models import MLPBlock, tiny_llama
    assert find_block_stack(make("mlp")) == "blocks"
    assert find_block_stack(resnet18(width=4)) == "blocks"
    assert find_block_stack(tiny_llama()) == "model.layers"  # untraceable Hugging Face layers
    assert find_block_stack(vit(preset="tiny32", num_classes=10, in_channels=1, patch_size=8)) == "blocks"
    with pytest.warns(UserWarning, match="chose 'blocks': 4 MLPBlock blocks"):
        sim = SubnetworkSimulator(make("mlp"), 4, blocks="auto", coverage=0.5)
    assert sorted(sim.plan.holders) == [f"blocks.{i}" for i in range(4)]

    class Stages(nn.Module):  # torchvision's layout: one Sequential per stage
        def __init__(self) -> None:
            super().__init__()
            self.layer1 = nn.Sequential(MLPBlock(8, 16), MLPBlock(8, 16))
            self.layer2 = nn.Sequential(MLPBlock(8, 16), MLPBlock(8, 16))

    with pytest.raises(SDPConfigError, match=r"several stacks of 2 residual blocks: \['layer1', 'layer2'\]"):
        find_block_stack(Stages())
    with pytest.raises(SDPConfigError, match="has no ModuleList/Sequential of two or more residual blocks"):
        find_block_stack(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
