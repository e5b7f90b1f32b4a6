"""Fashion-MNIST (Zalando): 60000 train / 10000 test grayscale 28x28 images of 10 clothing classes.

    from subnetdp.data.fashion_mnist import load_fashion_mnist
    images, labels = load_fashion_mnist("train")   # uint8 [60000, 28, 28], int64 [60000]

The four IDX files (``train-images-idx3-ubyte`` etc., gzipped or not) are looked for, when ``root``
is not given, in ``$SUBNETDP_DATA/fashion-mnist``, ``~/.cache/subnetdp/fashion-mnist`` and
``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu: ``apt install dataset-fashion-mnist``).
With ``download=True`` missing files are fetched from the official site and md5-checked.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

# (Not `from . import download`: the package exports the function download under that name.)
from .download import DATA_ENV, cache_dir, search_dirs
from .download import download as fetch

NAME = "fashion-mnist"
SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)  # the Debian package dataset-fashion-mnist
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# md5 of the official .gz files (what a download is checked against).
MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
# md5 of the decompressed files. Debian recompressed the .gz files (its .gz md5s differ from the
# ones above) but their contents are these, i.e. the same data.
RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read an IDX file (gzipped or not, told apart by its first bytes) whose magic number must be
    ``magic``; returns a uint8 array shaped as the header says."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX file ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number is {found}, expected {magic} "
                         f"({IMAGES_MAGIC} for images, {LABELS_MAGIC} for labels)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} ({header + int(np.prod(shape))} bytes "
                         f"in all) but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(split: str, root: str | Path | None = None,
                       download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of ``split`` ("train" or "test")."""
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(FILES)}, got {split!r}")
    names = FILES[split]
    dirs = search_dirs(NAME, root, SYSTEM_DIRS)
    for folder in dirs:
        paths = [_find(folder, n) for n in names]
        if all(paths):
            break
    else:
        if not download:
            looked = "\n".join(f"  {d}" for d in dirs)
            raise FileNotFoundError(
                f"Fashion-MNIST {split} split not found: looked for {names[0]}[.gz] and "
                f"{names[1]}[.gz] in\n{looked}\nTo get it: install the Debian/Ubuntu package "
                f"(sudo apt install dataset-fashion-mnist), or set download=True (config: [data] download = true) to "
                f"fetch it into {Path(root).expanduser() if root else cache_dir(NAME)}, or put "
                f"the files in a folder and pass it as root (or set ${DATA_ENV}).")
        folder = Path(root).expanduser() if root is not None else cache_dir(NAME)
        paths = [_find(folder, n) or fetch(f"{BASE_URL}{n}.gz", folder / f"{n}.gz", md5=MD5[n])
                 for n in names]
    images = read_idx(paths[0], IMAGES_MAGIC)
    labels = read_idx(paths[1], LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
