"""ViT: shapes, fx tracing, presets, and the SDP engine wrapping it at block and neuron level."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn

from subnetdp.engine.simulator import SubnetworkSimulator
from subnetdp.models import ViT, vit
from subnetdp.models.vit import PRESETS

from _models import (
    assert_dropped_blocks_are_identity,
    assert_each_neuron_has_k_holders,
    train_and_check_assembly,
    zero_missing_columns,
)


def small(**kw) -> ViT:
    torch.manual_seed(0)
    return vit("tiny32", **{"image_size": 16, "depth": 4, **kw})


def images(n: int = 2, channels: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_output_shape_and_channels() -> None:
    assert small(num_classes=7)(images()).shape == (2, 7)
    assert small(in_channels=1)(images(channels=1)).shape == (2, 10)
    assert vit("small32")(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_block_layout_and_fx_trace() -> None:
    model = small()
    block = model.blocks[0]
    assert [n for n, _ in block.named_children()] == ["norm1", "attn", "norm2", "mlp"]
    assert block.attn.qkv.out_features == 3 * 64 and block.attn.num_heads == 2 and block.attn.head_dim == 32
    x = torch.randn(2, 16, 64)
    gm = torch.fx.symbolic_trace(block)
    torch.testing.assert_close(gm(x), block(x))
    torch.testing.assert_close(gm(x[:, :5]), block(x[:, :5]))  # traced T is not baked in


def test_presets() -> None:
    assert set(PRESETS) == {"tiny32", "small32"}
    m = vit("small32")
    assert len(m.blocks) == 6 and m.blocks[0].attn.num_heads == 3 and m.head.in_features == 192
    with pytest.raises(ValueError, match="small32"):
        vit("huge")


def test_attention_runs_with_heads_sliced_out() -> None:
    # keep head 1 only: qkv rows of head 1 in each of q/k/v, proj columns of head 1
    attn = small().blocks[0].attn
    x = torch.randn(2, 16, 64)
    rows = torch.cat([torch.arange(s * 64 + 32, s * 64 + 64) for s in range(3)])
    cut = copy.deepcopy(attn)
    cut.qkv.weight = nn.Parameter(attn.qkv.weight[rows])
    cut.qkv.bias = nn.Parameter(attn.qkv.bias[rows])
    cut.proj.weight = nn.Parameter(attn.proj.weight[:, 32:])
    ref = copy.deepcopy(attn)
    with torch.no_grad():
        ref.proj.weight[:, :32] = 0
    torch.testing.assert_close(cut(x), ref(x))


LABELS = torch.tensor([1, 2])


def _train_and_assemble(model: ViT, **sdp) -> None:
    def loss(worker: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(worker(x), LABELS)

    train_and_check_assembly(model, small(), "blocks", loss, [images(seed=r) for r in range(4)], images(seed=9), **sdp)


def test_engine_block_level() -> None:
    _train_and_assemble(small(), blocks="blocks")


def test_engine_neuron_level() -> None:
    _train_and_assemble(small(), neurons="blocks")


def test_engine_dropped_block_is_identity() -> None:
    assert_dropped_blocks_are_identity(small(), "blocks", images())


def test_engine_neuron_worker_is_full_model_without_its_missing_neurons() -> None:
    # a worker's sliced forward equals the full model with the output columns of the heads and
    # MLP neurons it does not hold set to zero
    model = small()
    sim = SubnetworkSimulator(model, world_size=4, neurons="blocks", coverage=0.5)
    x = images()
    for r, worker in enumerate(sim.workers):
        ref, _ = zero_missing_columns(model, worker)
        torch.testing.assert_close(worker(x), ref(x), msg=f"worker {r}")
    assert_each_neuron_has_k_holders(sim, model)


def test_fewer_heads_of_the_same_size_and_a_set_mlp_width() -> None:
    model = ViT(image_size=16, patch_size=4, dim=32, depth=2, heads=1, head_dim=16, mlp_hidden=40)
    assert model.blocks[0].attn.qkv.weight.shape == (48, 32) and model.blocks[0].attn.proj.weight.shape == (32, 16)
    assert model.blocks[1].mlp.fc1.out_features == 40
    assert model(images()).shape == (2, 10)
    default = ViT(image_size=16, patch_size=4, dim=32, depth=2, heads=2)
    assert default.blocks[0].attn.head_dim == 16 and default.blocks[0].mlp.fc1.out_features == 128
