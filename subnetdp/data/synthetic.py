"""Synthetic image classification: each class is a fixed random template plus noise, so a model
can learn it (accuracy well above chance within a few dozen steps) without any download."""

from __future__ import annotations

import torch


class SyntheticImages:
    """Deterministic batches; ``shard`` selects a worker's stream, ``split`` train or test."""

    def __init__(self, num_classes: int = 10, channels: int = 1, size: int = 32, noise: float = 1.5,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.templates = torch.randn(num_classes, channels, size, size, generator=g)
        self.num_classes, self.noise, self.seed = num_classes, noise, seed

    def batch(self, batch_size: int, step: int, shard: int = 0,
              split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        offset = 0 if split == "train" else 1 << 40
        g = torch.Generator().manual_seed(offset + self.seed * 1_000_003 + step * 1_009 + shard)
        labels = torch.randint(0, self.num_classes, (batch_size,), generator=g)
        images = self.templates[labels] + self.noise * torch.randn(
            (batch_size, *self.templates.shape[1:]), generator=g)
        return images, labels
