"""Measurement: figures read from live tensors and from the operating system, never estimated."""

from .memory import optimizer_state_bytes, peak_rss_bytes, tensor_bytes

__all__ = ["optimizer_state_bytes", "peak_rss_bytes", "tensor_bytes"]
