"""ResNet-18, CIFAR-style: 3x3 stem, no max-pool, four stages of two basic blocks.

Blocks follow torchvision's BasicBlock (conv1, bn1, relu, conv2, bn2, optional downsample,
``relu(f(x) + shortcut(x))``), so code that handles this model handles torchvision's too.

    model = resnet18(num_classes=10, in_channels=1, width=16)   # width 64 is the standard model

Thinner or shorter variants (a pruned model, or one SDP worker's subnetwork exported on its own):
``inner_widths`` sets each block's conv1 output channels, and ``projection_blocks`` lists blocks
reduced to their projection shortcut, ``relu(bn(conv1x1(x)))``, which keep the change of width
and resolution of a stage whose first block was removed.

    model = ResNet((1, 2, 1, 1), projection_blocks=(3,), inner_widths=(64, 32, 128, 0, 512))
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, inner: int | None = None) -> None:
        super().__init__()
        inner = planes if inner is None else inner  # conv1's output channels
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(inner, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ProjectionBlock(nn.Module):
    """A block of only its projection shortcut, ``relu(bn(conv1x1(x)))``: BasicBlock's keys
    (``downsample.0``, ``downsample.1``) without its residual branch."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.downsample(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet; ``blocks`` is one flat ModuleList so SDP can name it directly.
    ``layers``: blocks per stage (stage s has width x 2**s channels; the first block of stages
    after the first halves the resolution). ``inner_widths``: conv1's output channels of each
    block (0 for a projection block; default: the stage's width). ``projection_blocks``: indices
    of blocks that are a ProjectionBlock (only the first block of a stage can change width)."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 in_channels: int = 3, width: int = 64, inner_widths: tuple[int, ...] | None = None,
                 projection_blocks: tuple[int, ...] = ()) -> None:
        super().__init__()
        if inner_widths is not None and len(inner_widths) != sum(layers):
            raise ValueError(f"inner_widths has {len(inner_widths)} entries for {sum(layers)} blocks")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        in_planes = width
        for stage, count in enumerate(layers):
            planes = width * 2 ** stage
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                index = len(blocks)
                if index in projection_blocks:
                    if in_planes == planes and stride == 1:
                        raise ValueError(f"block {index} keeps its width and resolution: a projection block there "
                                         "would have no projection (remove the block instead)")
                    blocks.append(ProjectionBlock(in_planes, planes, stride))
                else:
                    inner = inner_widths[index] if inner_widths is not None else None
                    blocks.append(BasicBlock(in_planes, planes, stride, inner))
                in_planes = planes
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64, layers: tuple[int, ...] = (2, 2, 2, 2),
             inner_widths: tuple[int, ...] | None = None, projection_blocks: tuple[int, ...] = ()) -> ResNet:
    """ResNet-18; ``layers``, ``inner_widths`` and ``projection_blocks`` give a shorter or thinner
    one (an exported subnetwork of it)."""
    return ResNet(tuple(layers), num_classes, in_channels, width, inner_widths, tuple(projection_blocks))
