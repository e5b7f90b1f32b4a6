"""What a model costs at inference, measured on the model itself: its parameters, the FLOPs of one
forward (``torch.utils.flop_counter``), and the wall-clock of one forward at batch 1 and at a
larger batch. An exported subnetwork and the assembled model are compared on these figures, so
each is counted the same way: in eval mode, under ``torch.inference_mode()``, on inputs built
from one example batch.

    cost = inference_cost(model, example_images, batch=64)
    cost.flops_per_example, cost.latency_ms, cost.ms_per_example
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

Forward = Callable[[nn.Module, torch.Tensor], Any]


@dataclass
class InferenceCost:
    """One model's inference figures; the timings depend on the machine and on ``threads``."""

    params: int                 # parameters, tied tensors counted once
    flops_per_example: float    # FlopCounterMode on one forward at `batch` examples, / batch
    latency_ms: float           # median wall-clock of one forward at batch 1, milliseconds
    ms_per_example: float       # median wall-clock of one forward at `batch` examples, / batch, ms
    batch: int
    threads: int                # torch.get_num_threads() during the timing


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``: ``parameters()`` yields a tensor shared by several modules (tied
    embeddings) once, so it is counted once, as it is stored once."""
    return sum(p.numel() for p in model.parameters())


def inference_cost(model: nn.Module, example: torch.Tensor, batch: int = 64, repeats: int = 20, warmup: int = 3,
                   forward: Forward | None = None) -> InferenceCost:
    """Measure ``model`` on inputs made of ``example``'s rows (images [B, C, H, W], tokens [B, T]):
    repeated along dim 0 when it has fewer than ``batch``. Timings are the median of ``repeats``
    forwards after ``warmup`` untimed ones (the first calls allocate and pick kernels). ``forward``
    calls the model (default ``model(x)``); its output, a tensor or an object with ``.logits``, is
    not read. The model's training mode (of every submodule) is restored afterwards."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch and repeats must be >= 1 and warmup >= 0, got {batch}, {repeats}, {warmup}")
    call = forward or _call
    device = _device_of(model, example)
    one, many = _rows(example, 1).to(device), _rows(example, batch).to(device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            flops = _flops(model, many, call)
            latency = _median_seconds(model, one, call, repeats, warmup, device)
            per_batch = _median_seconds(model, many, call, repeats, warmup, device)
    finally:
        for module, training in modes.items():
            module.training = training
    return InferenceCost(params=count_parameters(model), flops_per_example=flops / batch, latency_ms=latency * 1e3,
                         ms_per_example=per_batch * 1e3 / batch, batch=batch, threads=torch.get_num_threads())


def _call(model: nn.Module, x: torch.Tensor) -> Any:
    return model(x)


def _rows(example: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of ``example`` along dim 0: its first n, cycled when it has fewer."""
    if example.dim() == 0 or example.shape[0] == 0:
        raise ValueError(f"example must be a batch with at least one row along dim 0, got shape "
                         f"{tuple(example.shape)}")
    return example[torch.arange(n, device=example.device) % example.shape[0]].contiguous()


def _device_of(model: nn.Module, example: torch.Tensor) -> torch.device:
    """Where the model's weights are (its inputs go there), else where ``example`` is."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else example.device


def _flops(model: nn.Module, x: torch.Tensor, call: Forward) -> float:
    """FLOPs of one forward on ``x``, as torch's flop counter counts them (matmuls and
    convolutions: 2 per multiply-add; element-wise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        call(model, x)
    return float(counter.get_total_flops())


def _median_seconds(model: nn.Module, x: torch.Tensor, call: Forward, repeats: int, warmup: int,
                    device: torch.device) -> float:
    """Median wall-clock of one forward; on CUDA synchronised around each, so the kernels the
    forward queued are counted, not only their launch."""
    for _ in range(warmup):
        call(model, x)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        began = time.perf_counter()
        call(model, x)
        _synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
