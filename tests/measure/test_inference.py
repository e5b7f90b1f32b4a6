"""inference_cost: exact FLOPs and parameter counts on known models, timings that are figures (no
ordering between models is asserted: wall-clock on a shared CPU is noisy), the training mode
restored, Hugging Face-style outputs and a custom forward."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from subnetdp.measure import InferenceCost, count_parameters, inference_cost

FAST = {"repeats": 3, "warmup": 1}


class TinyLM(nn.Module):
    """Embedding and output head tied (one tensor), returning an object with ``.logits`` as
    Hugging Face models do."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.embed(tokens)))


def test_flops_of_linear_layers_are_two_per_multiply_add_per_example() -> None:
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    example = torch.randn(3, 5)  # fewer rows than the batch: repeated
    cost = inference_cost(model, example, batch=8, **FAST)
    assert cost.flops_per_example == 2 * 5 * 7 + 2 * 7 * 3
    assert cost.params == 5 * 7 + 7 + 7 * 3 + 3 == count_parameters(model)
    assert cost.batch == 8


def test_flops_per_example_do_not_depend_on_the_batch() -> None:
    model = nn.Linear(16, 4)
    example = torch.randn(32, 16)  # more rows than the batch: sliced
    assert {inference_cost(model, example, batch=b, **FAST).flops_per_example for b in (1, 5, 32)} == {2 * 16 * 4}


def test_timings_are_positive_finite_figures_at_this_thread_count() -> None:
    cost = inference_cost(nn.Linear(8, 8), torch.randn(4, 8), batch=4, **FAST)
    assert isinstance(cost, InferenceCost)
    for value in (cost.latency_ms, cost.ms_per_example):
        assert value > 0 and math.isfinite(value)
    assert cost.threads == torch.get_num_threads()


def test_tied_weights_are_counted_once_and_hf_style_outputs_are_measured() -> None:
    model = TinyLM(vocab=11, dim=6)
    assert count_parameters(model) == 11 * 6
    tokens = torch.randint(0, 11, (2, 5))
    cost = inference_cost(model, tokens, batch=4, **FAST)
    assert cost.params == 11 * 6
    assert cost.flops_per_example == 2 * 5 * 6 * 11  # the head on 5 tokens; the embedding is a lookup


def test_the_training_mode_of_every_module_is_restored() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # frozen statistics, as fine-tuning may leave it
    before = {name: m.training for name, m in model.named_modules()}
    stats = model[1].running_mean.clone()
    inference_cost(model, torch.randn(6, 4), batch=6, **FAST)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.equal(model[1].running_mean, stats)  # measured in eval mode: statistics untouched
    model.eval()
    inference_cost(model, torch.randn(6, 4), batch=6, **FAST)
    assert not any(m.training for m in model.modules())


def test_a_custom_forward_is_what_is_measured() -> None:
    model = nn.Linear(3, 2)
    calls = []

    def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        assert not m.training and torch.is_inference_mode_enabled()
        return m(x) + m(x)  # twice the matmuls

    cost = inference_cost(model, torch.randn(2, 3), batch=5, repeats=4, warmup=2, forward=forward)
    assert cost.flops_per_example == 2 * (2 * 3 * 2)
    # one counted forward at the batch, then warmup + repeats at batch 1 and at the batch
    assert calls == [5] + [1] * 6 + [5] * 6


def test_bad_arguments_are_refused() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="at least one row"):
        inference_cost(model, torch.randn(0, 3))
    with pytest.raises(ValueError, match="batch and repeats"):
        inference_cost(model, torch.randn(2, 3), batch=0)
