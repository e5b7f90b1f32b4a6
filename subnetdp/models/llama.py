"""LLaMA-style decoder: RMSNorm pre-norm blocks, rotary positions, grouped-query attention, SwiGLU.

Each ``DecoderBlock`` is ``h = x + attn(attention_norm(x))`` then ``h + mlp(ffn_norm(h))`` and takes
only ``x``, so it can be dropped or traced with torch.fx. ``Attention`` reads its head counts from
the tensors, never from attributes, so a model whose heads were sliced out (SDP's neuron level)
still runs. Query head i uses key/value head i // (n_heads // n_kv_heads), as in LLaMA 2/3.

RoPE uses the rotate-half convention (Hugging Face's LLaMA, GPT-NeoX): dimension j of a head is
paired with dimension j + head_dim/2. Each attention owns its cos/sin tables as non-persistent
buffers (they are not in the state dict, and head slicing leaves them whole).

    model = llama("tiny", vocab_size=65)            # character-level Shakespeare on CPU
    with torch.device("meta"):
        print(num_parameters(llama("1b")))          # size a model without allocating it
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None   # None: n_heads (multi-head); fewer: grouped-query attention
    head_dim: int | None = None     # None: dim // n_heads; set: heads of this size (fewer heads, same size)
    hidden_dim: int | None = None   # None: SwiGLU default, 8*dim/3 rounded up to multiple_of
    multiple_of: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    loss_chunk: int = 0             # forward(tokens, targets): logits of this many tokens at a time (0: all)

    # None fields stay None (so dataclasses.replace re-derives them); these resolve them
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        m = self.multiple_of
        return m * ((int(8 * self.dim / 3) + m - 1) // m)

    def __post_init__(self) -> None:
        if self.head_dim is None and self.dim % self.n_heads or self.n_heads % self.kv_heads or self.head_size % 2:
            raise ValueError(f"need dim % n_heads == 0 (or head_dim set), n_heads % n_kv_heads == 0 and an even "
                             f"head size; got dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                             f"head_dim={self.head_dim}")


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_seq_len, head_dim], for rotate-half RoPE (frequencies repeated twice)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_j, x_{j+d/2}) of x [B, H, T, d] by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.kv_heads
        self.head_dim = config.head_size
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        cos, sin = rope_tables(self.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # head counts come from the tensors (-1): the engine may have sliced heads out
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H_kv, T, hd]
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        # torch.narrow, not [:T]: fx passes buffers as real tensors, and a tensor cannot be sliced
        # by a traced T, whereas a torch function taking the proxy T is recorded
        cos = torch.narrow(self.rope_cos, 0, 0, T).to(q.dtype)
        sin = torch.narrow(self.rope_sin, 0, 0, T).to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA inside SDPA (no copies of k/v); decided from the shapes, and a worker holding no
        # heads of this layer (0 == 0) still runs, where q.shape[1] // k.shape[1] would divide by 0
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = FeedForward(config.dim, config.ffn_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.attention_norm(x))
        return h + self.mlp(self.ffn_norm(h))


class Llama(nn.Module):
    """A decoder-only LM: tokens [B, T] -> logits [B, T, vocab]; ``layers`` is one flat ModuleList."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.apply(self._init_weights)
        # GPT-2: each residual branch's output layer is scaled down so the stream's variance does
        # not grow with depth (two branches per layer)
        for layer in self.layers:
            for proj in (layer.attn.o_proj, layer.mlp.down_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]; with ``targets`` [B, T] the mean next-token cross-entropy instead,
        computed ``config.loss_chunk`` tokens at a time when that is set (see
        ``chunked_cross_entropy``), so the full logits never exist."""
        if tokens.shape[1] > self.config.max_seq_len:  # RoPE tables cover max_seq_len positions
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        if targets is None:
            return self.lm_head(self.norm(x))
        return chunked_cross_entropy(self.norm(x), self.lm_head, targets, self.config.loss_chunk)


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` (logits in float32). With ``chunk``
    tokens at a time, each chunk's logits are computed, reduced to its loss sum and dropped, and
    recomputed in backward (activation checkpointing): the logits of one chunk, not of the whole
    batch, are alive at any time. ``chunk = 0``: all at once, the plain loss."""
    h, t = hidden.flatten(0, -2), targets.flatten()
    if chunk <= 0 or chunk >= t.numel():
        return F.cross_entropy(head(h).float(), t)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, t.numel(), chunk):
        total = total + checkpoint(_loss_sum, head, h[start:start + chunk], t[start:start + chunk],
                                   use_reentrant=False)
    return total / t.numel()


def _loss_sum(head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def num_parameters(model: nn.Module) -> int:
    """Parameter count; tied weights count once (``parameters()`` yields each tensor once)."""
    return sum(p.numel() for p in model.parameters())


PRESETS: dict[str, LlamaConfig] = {
    "debug": LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128),
    "tiny": LlamaConfig(vocab_size=256, dim=256, n_layers=4, n_heads=4, max_seq_len=256),  # CPU
    # The paper's sizes (FineWeb, GPU); vocab 32000 (LLaMA 2 tokenizer), untied embeddings.
    "134m": LlamaConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "500m": LlamaConfig(vocab_size=32000, dim=1280, n_layers=21, n_heads=20, max_seq_len=1024),  # 498M
    # LLaMA 3.2 1B's shape (GQA 32/8, SwiGLU hidden 8192) with the 32000 vocab
    "1b": LlamaConfig(vocab_size=32000, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                      hidden_dim=8192, max_seq_len=1024),
}


def llama(preset: str = "debug", **overrides) -> Llama:
    """A Llama from a preset, any LlamaConfig field overridden (``vocab_size=65``...)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown LLaMA preset {preset!r}; valid: {sorted(PRESETS)}")
    return Llama(replace(PRESETS[preset], **overrides))
