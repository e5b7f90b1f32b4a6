"""Measurement: figures read from live tensors and from the operating system, never estimated."""

from .comm import ByteCounter, counting_allreduce_hook
from .inference import InferenceCost, count_parameters, inference_cost
from .memory import optimizer_state_bytes, peak_rss_bytes, reset_peak_rss, tensor_bytes

__all__ = ["ByteCounter", "InferenceCost", "count_parameters", "counting_allreduce_hook", "inference_cost",
           "optimizer_state_bytes", "peak_rss_bytes", "reset_peak_rss", "tensor_bytes"]
