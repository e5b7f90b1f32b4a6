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


def train_simulated(sim, optimizers: list, steps: range, kind: str = "mlp", stride: int = 100) -> None:
    """Train a SubnetworkSimulator's workers: worker r's batch of step s is ``batch_for(kind,
    stride * s + r)``, as the multi-process tests' rank r uses it."""
    for step in steps:
        for rank, worker in enumerate(sim.workers):
            x, y = batch_for(kind, stride * step + rank)
            loss_of(kind, worker, x, y).backward()
        sim.sync_gradients()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        sim.sync_weights()


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


def kept_columns(full: torch.Tensor, part: torch.Tensor) -> list[int]:
    """The indices of ``full``'s columns that ``part``'s columns are, in ``part``'s order (each
    column of ``part`` must be bitwise equal to one of ``full``'s)."""
    if part.shape[1] == 0:
        return []
    same = (full.detach().T[None, :, :] == part.detach().T[:, None, :]).all(-1)  # [part cols, full cols]
    assert bool(same.any(1).all()), "a held column is none of the full model's columns"
    return same.int().argmax(1).tolist()


def zero_missing_columns(model: nn.Module, worker: nn.Module) -> tuple[nn.Module, dict[str, list[int]]]:
    """The reference for a forward-masked neuron-level worker (scale 'none'), from public API only:
    a copy of the full ``model`` in which every 2-D weight that the worker holds with fewer input
    columns (an output projection whose hidden neurons were sliced out) has the columns it does not
    hold set to zero. Which columns a worker holds is read from its own weights (``worker.module``,
    same parameter names), matched to the full model's columns by value. Returns the reference and
    the held column indices per sliced weight."""
    import copy

    ref = copy.deepcopy(model)
    held = dict(worker.module.named_parameters())
    kept: dict[str, list[int]] = {}
    for name, weight in ref.named_parameters():
        part = held.get(name)
        if weight.dim() != 2 or part is None or part.shape[1] == weight.shape[1]:
            continue
        assert part.shape[0] == weight.shape[0], f"{name}: both dimensions sliced"
        kept[name] = kept_columns(weight, part)
        drop = torch.ones(weight.shape[1], dtype=torch.bool)
        drop[kept[name]] = False
        with torch.no_grad():
            weight[:, drop] = 0
    return ref, kept


def assert_each_neuron_has_k_holders(sim, model: nn.Module) -> None:
    """Forward-masked neuron level, public API only: every hidden neuron of every sliced output
    projection (one of its columns) is held by exactly ``sim.plan.k`` workers, and each worker
    trains the parameter count its plan says."""
    kept_by_worker = [zero_missing_columns(model, worker)[1] for worker in sim.workers]
    names = set().union(*kept_by_worker)
    assert names, "no weight was sliced"
    for name in sorted(names):
        width = model.get_parameter(name).shape[1]
        count = torch.zeros(width, dtype=torch.long)
        for worker, kept in zip(sim.workers, kept_by_worker):
            part = dict(worker.module.named_parameters()).get(name)
            held = kept.get(name, list(range(width)) if part is not None and part.shape[1] == width else [])
            count[held] += 1
        assert (count == sim.plan.k).all(), (name, count.tolist())
    for r, worker in enumerate(sim.workers):
        assert sum(p.numel() for p in worker.parameters()) == sim.plan.worker_params[r], f"worker {r}"


def train_and_check_assembly(model: nn.Module, fresh: nn.Module, container: str, loss, batches: list,
                             x: torch.Tensor, steps: int = 4, **sdp) -> dict[str, torch.Tensor]:
    """Four simulated workers train a few Adam steps on fixed ``batches`` (one each; ``loss(model,
    batch)``): each worker's loss on its batch goes down by more than 0.5, every parameter of the
    assembled model changed and it loads strictly into ``fresh``, and the assembled model, cut back
    to a worker's subnetwork, computes on ``x`` what that worker computes (missing blocks become
    Identity; missing neurons are zeroed). Returns the assembled state."""
    import copy

    from subnetdp import SubnetworkSimulator
    initial = copy.deepcopy(model)
    sim = SubnetworkSimulator(model, world_size=4, coverage=0.5, **sdp)
    opts = [torch.optim.Adam(w.parameters(), lr=1e-2) for w in sim.workers]
    with torch.no_grad():
        before = [loss(w, b).item() for w, b in zip(sim.workers, batches)]
    for _ in range(steps):
        for worker, batch in zip(sim.workers, batches):
            loss(worker, batch).backward()
        sim.sync_gradients()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        after = [loss(w, b).item() for w, b in zip(sim.workers, batches)]
    assert all(a < b - 0.5 for a, b in zip(after, before)), (before, after)
    full = sim.full_state_dict()
    fresh.load_state_dict(full, strict=True)
    for name, p in initial.named_parameters():
        assert not torch.equal(full[name], p), f"{name} was not trained"
    for r, worker in enumerate(sim.workers):
        if "neurons" in sdp:
            ref, _ = zero_missing_columns(fresh, worker)
        else:
            ref, held = copy.deepcopy(fresh), set(sim.plan.held_units(r))
            blocks = ref.get_submodule(container)
            for i in range(len(blocks)):
                if f"{container}.{i}" not in held:
                    blocks[i] = nn.Identity()
        with torch.no_grad():
            torch.testing.assert_close(worker(x), ref(x), msg=f"worker {r}")
    return full


def train_steps(sim, batch, loss, steps: int = 2, train_mode: bool = False) -> None:
    """Each worker r trains on batch(100 * step + r); gradients synced, Adam, weights synced.
    ``train_mode``: the workers in train mode (norm statistics move), else as they are."""
    opts = [torch.optim.Adam(w.parameters(), lr=1e-2) for w in sim.workers]
    for step in range(steps):
        for r, worker in enumerate(sim.workers):
            if train_mode:
                worker.train()
            loss(worker, batch(100 * step + r)).backward()
        sim.sync_gradients()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        sim.sync_weights()


# ---------------------------------------------------------------------------------------------
# Model families for neuron-level and block-level compatibility (tests/engine/test_model_families.py,
# scripts/models_table.py). Each builder returns (model, batch(seed), loss(model, batch)); the models
# are tiny, randomly initialised, in eval mode with dropout 0 and eager attention, built in code.


def _lm_batch(vocab: int, n: int = 4, length: int = 9):
    def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
        return tokens[:, :-1], tokens[:, 1:]
    return batch


def _image_batch(channels: int, size: int, classes: int, n: int = 4):
    def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, channels, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)
    return batch


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def _cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = _logits(model(x))
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def family_resnet18(seed: int = 0):
    from subnetdp.models import resnet18
    torch.manual_seed(seed)
    return resnet18(num_classes=10, in_channels=1, width=4).eval(), _image_batch(1, 16, 10), _cross_entropy


def family_vit(seed: int = 0):
    from subnetdp.models import vit
    torch.manual_seed(seed)
    model = vit("tiny32", image_size=16, dim=32, depth=2, heads=4, num_classes=10)
    return model.eval(), _image_batch(3, 16, 10), _cross_entropy


def family_llama(seed: int = 0):
    from subnetdp.models import llama
    torch.manual_seed(seed)
    return llama("debug").eval(), _lm_batch(256), _cross_entropy


def family_hf_llama(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_llama(layers=2).eval(), _lm_batch(64), _cross_entropy


def family_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval(), _lm_batch(64), _cross_entropy


def family_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)

    def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 64, (4, 8), generator=g), torch.randint(0, 3, (4,), generator=g)
    return BertForSequenceClassification(config).eval(), batch, _cross_entropy


def family_hf_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return ViTForImageClassification(config).eval(), _image_batch(3, 16, 10), _cross_entropy


class PlainMLP(nn.Module):
    """A stack of Linear + ReLU layers with no skip connection: neither residual (block level) nor
    holding a recognised neuron pattern (neuron level)."""

    def __init__(self, dim: int = 16, depth: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(5, dim)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def family_plain_mlp(seed: int = 0):
    torch.manual_seed(seed)

    def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)
    return PlainMLP().eval(), batch, _cross_entropy
