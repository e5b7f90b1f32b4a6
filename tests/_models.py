"""Small models for tests, all plain PyTorch (or Hugging Face), none aware of SDP."""

from __future__ import annotations

import torch
from torch import nn


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class ResidualMLP(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16, depth: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(5, dim)
        self.blocks = nn.ModuleList(MLPBlock(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny_llama(layers: int = 4, tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


def batch_for(kind: str, seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    if kind == "resnet":
        return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)
    tokens = torch.randint(0, 64, (n, 9), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if kind == "llama":
        logits = out.logits
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return nn.functional.cross_entropy(out, y)


def make(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return ResidualMLP()
    if kind == "resnet":
        from subnetdp.models import resnet18
        return resnet18(num_classes=10, in_channels=1, width=4)
    return tiny_llama()


def assert_dropped_blocks_are_identity(model: nn.Module, container: str, x: torch.Tensor) -> None:
    """Each of 4 simulated workers at C = 0.5 computes the full model with the blocks it does not
    hold replaced by the identity (a dropped pre-norm layer passes its input through unchanged)."""
    import copy

    from subnetdp import SubnetworkSimulator
    sim = SubnetworkSimulator(model, world_size=4, blocks=container, coverage=0.5)
    for r, worker in enumerate(sim.workers):
        held = set(sim.plan.held_units(r))
        ref = copy.deepcopy(model)
        blocks = ref.get_submodule(container)
        for i in range(len(blocks)):
            if f"{container}.{i}" not in held:
                blocks[i] = nn.Identity()
        assert len(held) < len(blocks)
        torch.testing.assert_close(worker(x), ref(x), msg=f"worker {r}")
