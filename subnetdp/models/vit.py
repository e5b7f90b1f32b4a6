"""Vision Transformer for small images: conv patch embedding, learned positions, pre-norm blocks,
mean-pooled tokens (no cls token), final LayerNorm and a linear head.

Each ``Block`` is ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; ``Attention`` has one fused
``qkv`` Linear laid out as [q heads | k heads | v heads] and a ``proj``; ``Mlp`` is fc1, GELU, fc2.
Forward passes read head counts and hidden widths from the tensors, never from attributes, so a
model whose heads or hidden neurons were sliced out still runs, and blocks trace with torch.fx.

    model = vit("small32", num_classes=100)           # 32x32 images, patch 4: 64 tokens
    model = vit("tiny32", in_channels=1, image_size=28)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0, head_dim: int = 0) -> None:
        super().__init__()
        if not head_dim and dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.num_heads = heads
        self.head_dim = head_dim or dim // heads
        self.qkv = nn.Linear(dim, 3 * heads * self.head_dim)
        self.proj = nn.Linear(heads * self.head_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # [B, T, 3 * H * hd] -> 3 x [B, H, T, hd]; H comes from the tensor (-1), see module docstring
        q, k, v = self.qkv(x).reshape(B, T, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.drop(self.proj(out.transpose(1, 2).reshape(B, T, -1)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, head_dim: int = 0,
                 mlp_hidden: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden or int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class ViT(nn.Module):
    """A ViT classifier; ``blocks`` is one flat ModuleList so SDP can name it directly.
    ``head_dim`` (0: dim // heads) and ``mlp_hidden`` (0: dim x mlp_ratio) fix the head size and
    the MLP's hidden width, for thinner variants (fewer heads of the same size, fewer neurons)."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3,
                 num_classes: int = 10, dim: int = 192, depth: int = 6, heads: int = 3,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, head_dim: int = 0, mlp_hidden: int = 0) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, head_dim, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # timm's ViT init; the conv keeps PyTorch's default (fan-in) init, as timm does
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, dim, h, w] -> [B, h*w, dim]
        x = self.drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(dim=1)))


PRESETS: dict[str, dict] = {
    "tiny32": dict(image_size=32, patch_size=4, dim=64, depth=4, heads=2),  # debug / CPU
    "small32": dict(image_size=32, patch_size=4, dim=192, depth=6, heads=3),
}


def vit(preset: str = "small32", **overrides) -> ViT:
    """A ViT from a preset, any constructor argument overridden (``num_classes``, ``in_channels``...)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; valid: {sorted(PRESETS)}")
    return ViT(**{**PRESETS[preset], **overrides})
