"""Data sources. Each worker reads its own shard; the global batch is N x the per-worker batch."""

from .synthetic import SyntheticImages

__all__ = ["SyntheticImages"]
