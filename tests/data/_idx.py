"""Small IDX / Fashion-MNIST fixtures for the data tests."""

import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = False) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_fake_fashion(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0):
    """The four Fashion-MNIST files with random content; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, 2051, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 2049, gz)
        out[split] = (images, labels)
    return out
