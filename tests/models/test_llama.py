"""LLaMA: shapes, causality, RoPE, GQA, tied embeddings, preset sizes, fx tracing, and the SDP
engine wrapping it at block and neuron level."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from subnetdp.engine.simulator import SubnetworkSimulator
from subnetdp.models import Llama, LlamaConfig, llama, num_parameters
from subnetdp.models.llama import PRESETS, apply_rope

from _models import (
    assert_dropped_blocks_are_identity,
    assert_each_neuron_has_k_holders,
    train_and_check_assembly,
    zero_missing_columns,
)


def debug(**kw) -> Llama:
    torch.manual_seed(0)
    return llama("debug", **{"n_layers": 4, **kw})


def tokens(n: int = 2, t: int = 12, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_output_shape_and_vocab() -> None:
    assert debug()(tokens()).shape == (2, 12, 256)
    model = llama("tiny", vocab_size=65)
    assert model.tok_embeddings.num_embeddings == 65 and model(tokens(vocab=65)).shape == (2, 12, 65)
    with pytest.raises(ValueError, match="max_seq_len"):
        debug()(tokens(t=129))


def test_block_layout_and_fx_trace() -> None:
    model = debug()
    block = model.layers[0]
    assert [n for n, _ in block.named_children()] == ["attention_norm", "attn", "ffn_norm", "mlp"]
    attn = block.attn
    assert (attn.n_heads, attn.n_kv_heads, attn.head_dim) == (4, 2, 16)
    assert [n for n, _ in attn.named_children()] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert all(getattr(attn, n).bias is None for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert set(dict(attn.named_buffers())) == {"rope_cos", "rope_sin"}
    assert not any("rope" in k for k in model.state_dict())  # non-persistent
    assert block.mlp.up_proj.out_features == 192  # int(8*64/3) = 170 -> multiple of 64
    x = torch.randn(2, 10, 64)
    gm = torch.fx.symbolic_trace(block)
    torch.testing.assert_close(gm(x), block(x))
    torch.testing.assert_close(gm(x[:, :3]), block(x[:, :3]))  # traced T is not baked in


def test_causal() -> None:
    model = debug()
    a = tokens()
    b = a.clone()
    b[:, 7] = (b[:, 7] + 1) % 256
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :7], lb[:, :7])
    assert not torch.allclose(la[:, 7:], lb[:, 7:])


def test_rope_is_position_dependent_and_relative() -> None:
    attn = debug().layers[0].attn
    cos, sin = attn.rope_cos, attn.rope_sin
    q, k = torch.randn(16), torch.randn(16)
    at = lambda v, p: apply_rope(v.view(1, 1, 1, 16), cos[p], sin[p]).flatten()  # noqa: E731
    assert not torch.allclose(at(q, 0), at(q, 5))
    torch.testing.assert_close(at(q, 0), q)  # position 0 is not rotated
    torch.testing.assert_close(at(q, 3).norm(), q.norm())  # a rotation
    # scores depend only on the offset between positions
    torch.testing.assert_close(at(q, 7) @ at(k, 4), at(q, 5) @ at(k, 2))
    # the model sees order: a permuted (non-causal-equivalent) sequence changes the last logits
    model = debug()
    t = tokens(n=1)
    assert not torch.allclose(model(t)[0, -1], model(t.flip(1))[0, -1])


def test_gqa_matches_repeated_kv_heads() -> None:
    model = debug()
    attn = model.layers[0].attn
    assert attn.k_proj.out_features == 2 * 16 and attn.q_proj.out_features == 4 * 16
    x = torch.randn(2, 10, 64)
    B, T = 2, 10
    q = attn.q_proj(x).view(B, T, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, 2, 16).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, 2, 16).transpose(1, 2)
    cos, sin = attn.rope_cos[:T], attn.rope_sin[:T]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # q head i -> kv head i // 2
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, 64)
    torch.testing.assert_close(attn(x), attn.o_proj(out))
    mha = llama("debug", n_kv_heads=None)
    assert mha.layers[0].attn.n_kv_heads == 4 and mha(tokens()).shape == (2, 12, 256)


def test_tied_embeddings_share_storage() -> None:
    model = debug(tie_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert num_parameters(model) == num_parameters(debug()) - 256 * 64
    model(tokens()).sum().backward()
    assert model.tok_embeddings.weight.grad is model.lm_head.weight.grad


def test_init_scales_residual_outputs() -> None:
    model = llama("tiny")
    std = lambda p: p.detach().std().item()  # noqa: E731
    assert std(model.layers[0].mlp.up_proj.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.layers[0].attn.o_proj.weight) == pytest.approx(0.02 / 8 ** 0.5, rel=0.05)
    assert std(model.layers[0].mlp.down_proj.weight) == pytest.approx(0.02 / 8 ** 0.5, rel=0.05)


@pytest.mark.parametrize("name,size", [("134m", 134e6), ("500m", 500e6), ("1b", 1e9)])
def test_preset_parameter_counts(name: str, size: float) -> None:
    with torch.device("meta"):
        model = llama(name)
    assert model.tok_embeddings.num_embeddings == 32000 and model.config.max_seq_len == 1024
    assert abs(num_parameters(model) - size) / size < 0.15


def test_presets() -> None:
    assert set(PRESETS) == {"debug", "tiny", "134m", "500m", "1b"}
    assert llama("tiny", dim=128).layers[0].mlp.up_proj.out_features == 384  # derived width follows dim
    with pytest.raises(ValueError, match="134m"):
        llama("7b")
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(n_heads=4, n_kv_heads=3)


def _loss(model: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    logits = model(t[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))


def _train_and_assemble(model: Llama, **sdp) -> None:
    tie = model.config.tie_embeddings
    fresh = llama("debug", n_layers=4, tie_embeddings=tie)
    full = train_and_check_assembly(model, fresh, "layers", _loss, [tokens(t=9, seed=r) for r in range(4)],
                                    tokens(), **sdp)
    if tie:
        assert torch.equal(full["lm_head.weight"], full["tok_embeddings.weight"])
        assert fresh.lm_head.weight.data_ptr() == fresh.tok_embeddings.weight.data_ptr()


@pytest.mark.parametrize("tie", [False, True])
def test_engine_block_level(tie: bool) -> None:
    _train_and_assemble(debug(tie_embeddings=tie), blocks="layers")


@pytest.mark.parametrize("tie", [False, True])
def test_engine_neuron_level(tie: bool) -> None:
    _train_and_assemble(debug(tie_embeddings=tie), neurons="layers")


def test_engine_dropped_block_is_identity() -> None:
    assert_dropped_blocks_are_identity(debug(), "layers", tokens())


@pytest.mark.parametrize("world_size,coverage", [(4, 0.5), (8, 0.25)])  # 8 workers: some hold no heads
def test_engine_neuron_worker_is_full_model_without_its_missing_neurons(world_size: int,
                                                                       coverage: float) -> None:
    # a worker's sliced forward equals the full model with the output columns of the kv-head groups
    # and MLP neurons it does not hold set to zero (checks head order, GQA grouping and RoPE)
    model = debug()
    sim = SubnetworkSimulator(model, world_size=world_size, neurons="layers", coverage=coverage)
    x = tokens()
    for r, worker in enumerate(sim.workers):
        ref, _ = zero_missing_columns(model, worker)
        torch.testing.assert_close(worker(x), ref(x), msg=f"worker {r}")
    assert_each_neuron_has_k_holders(sim, model)


@pytest.mark.parametrize("chunk", [7, 16, 1000])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(chunk: int) -> None:
    plain = debug(vocab_size=97)
    chunked = copy.deepcopy(plain)
    chunked.config = LlamaConfig(**{**plain.config.__dict__, "loss_chunk": chunk})
    t = tokens(n=3, t=17, seed=1, vocab=97)
    x, y = t[:, :-1], t[:, 1:]
    reference = F.cross_entropy(plain(x).flatten(0, 1).float(), y.flatten())
    reference.backward()
    loss = chunked(x, targets=y)
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_never_holds_all_logits() -> None:
    from subnetdp.measure.live import LiveTensorTracker
    peaks = {}
    for chunk in (0, 32):
        torch.manual_seed(0)
        model = llama("debug", vocab_size=4096, loss_chunk=chunk)
        t = tokens(n=4, t=129, seed=2, vocab=4096)
        with LiveTensorTracker(list(model.parameters())) as tracker:
            model(t[:, :-1], targets=t[:, 1:]).backward()
        peaks[chunk] = tracker.report()["peak_bytes"]
    logits = 4 * 128 * 4096 * 4  # the batch's float32 logits: 8 MiB
    assert peaks[0] - peaks[32] > logits, peaks  # logits and their gradient, less one chunk's


def test_head_dim_gives_fewer_heads_of_the_same_size() -> None:
    from subnetdp.models import Llama, LlamaConfig
    config = LlamaConfig(vocab_size=16, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, max_seq_len=8)
    model = Llama(config)
    attn = model.layers[0].attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 32)
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 16)
    assert LlamaConfig(dim=64, n_heads=4).head_size == 16
    with pytest.raises(ValueError, match="head_dim"):
        LlamaConfig(dim=64, n_heads=3)
