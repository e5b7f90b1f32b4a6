"""ResNet's thinner and shorter variants: per-block inner widths and projection-only blocks."""

from __future__ import annotations

import pytest
import torch

from subnetdp.models import ProjectionBlock, ResNet, resnet18


def test_the_default_model_is_unchanged() -> None:
    torch.manual_seed(0)
    a = resnet18(10, 1, 8)
    torch.manual_seed(0)
    b = ResNet((2, 2, 2, 2), 10, 1, 8, inner_widths=None, projection_blocks=())
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_inner_widths_and_projection_blocks() -> None:
    model = ResNet((1, 2, 1, 1), in_channels=1, width=8, projection_blocks=(3,), inner_widths=(8, 4, 16, 0, 3))
    assert isinstance(model.blocks[3], ProjectionBlock)
    assert model.blocks[1].conv1.out_channels == 4 and model.blocks[4].bn1.num_features == 3
    assert [k for k in model.state_dict() if k.startswith("blocks.3.")] == [
        "blocks.3.downsample.0.weight", "blocks.3.downsample.1.weight", "blocks.3.downsample.1.bias",
        "blocks.3.downsample.1.running_mean", "blocks.3.downsample.1.running_var",
        "blocks.3.downsample.1.num_batches_tracked"]
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_sizes_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="inner_widths has 2 entries for 8 blocks"):
        ResNet(inner_widths=(1, 2))
    with pytest.raises(ValueError, match="block 1 keeps its width and resolution"):
        ResNet((2, 2, 2, 2), projection_blocks=(1,))
