"""CIFAR-10 / CIFAR-100 from the official "python version" archives (50000 train / 10000 test
32x32 RGB images).

    from subnetdp.data.cifar import load_cifar
    images, labels = load_cifar("train", num_classes=100, download=True)  # uint8 [50000, 3, 32, 32]

Looked for, when ``root`` is not given, in ``$SUBNETDP_DATA/cifar-10`` (or ``cifar-100``) and
``~/.cache/subnetdp/cifar-10``: either the tarball (``cifar-10-python.tar.gz``) or the folder it
extracts to (``cifar-10-batches-py``). ``download=True`` fetches the tarball (md5-checked).

The batches are Python pickles, as the dataset is published; unpickling runs code, so only read
archives you trust (the official ones, or ``write_fake_cifar``'s, which tests use).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

# (Not `from . import download`: the package exports the function download under that name.)
from .download import DATA_ENV, cache_dir, search_dirs
from .download import download as fetch

BASE_URL = "https://www.cs.toronto.edu/~kriz/"
# Per variant: tarball, folder inside it, train members, test member, label key, md5 of the tarball.
VARIANTS = {
    10: ("cifar-10-python.tar.gz", "cifar-10-batches-py",
         tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels",
         "c58f30108f718f92721af3b95e74349a"),
    100: ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", b"fine_labels",
          "eb9058c3a382ffc7106e4002c42a8d85"),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


def _variant(num_classes: int) -> tuple:
    if num_classes not in VARIANTS:
        raise ValueError(f"CIFAR num_classes must be 10 or 100, got {num_classes}")
    return VARIANTS[num_classes]


def _decode(batches: list[dict], label_key: bytes, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    except KeyError as e:
        raise ValueError(f"{where}: batch has no {e.args[0]!r} entry (not the CIFAR python version?)") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{where}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def load_cifar(split: str, num_classes: int = 10, root: str | Path | None = None,
               download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] (fine labels for CIFAR-100) of ``split``
    ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR split must be 'train' or 'test', got {split!r}")
    tarball, inner, train_members, test_member, label_key, md5 = _variant(num_classes)
    members = train_members if split == "train" else (test_member,)
    name = f"cifar-{num_classes}"
    dirs = search_dirs(name, root)
    for folder in dirs:
        extracted = folder / inner
        if all((extracted / m).is_file() for m in members):  # the extracted folder reads fastest
            batches = [pickle.loads((extracted / m).read_bytes(), encoding="bytes") for m in members]
            return _decode(batches, label_key, str(extracted))
        if (folder / tarball).is_file():
            return _read_tarball(folder / tarball, inner, members, label_key)
    if not download:
        looked = "\n".join(f"  {d}" for d in dirs)
        raise FileNotFoundError(
            f"CIFAR-{num_classes} not found: looked for {tarball} or its extracted folder {inner}/ "
            f"in\n{looked}\nTo get it: set download=True (config: [data] download = true) to fetch {BASE_URL}{tarball} "
            f"into {Path(root).expanduser() if root else cache_dir(name)}, or put the tarball "
            f"in a folder and pass it as root (or set ${DATA_ENV}).")
    folder = Path(root).expanduser() if root is not None else cache_dir(name)
    path = fetch(BASE_URL + tarball, folder / tarball, md5=md5)
    return _read_tarball(path, inner, members, label_key)


def _read_tarball(path: Path, inner: str, members: tuple[str, ...],
                  label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    batches = []
    with tarfile.open(path, "r:*") as tar:
        for m in members:
            try:
                f = tar.extractfile(f"{inner}/{m}")
            except KeyError:
                f = None
            if f is None:
                raise FileNotFoundError(f"{path} has no member {inner}/{m}")
            batches.append(pickle.load(f, encoding="bytes"))
    return _decode(batches, label_key, str(path))


def write_fake_cifar(path: Path, num_classes: int = 10, train_per_batch: int = 20, test: int = 20,
                     seed: int = 0) -> Path:
    """Write a small random CIFAR archive in the official layout into the folder ``path`` and return
    the tarball's path (``path/cifar-10-python.tar.gz`` or ``cifar-100-python.tar.gz``).

    CIFAR-10 gets five ``data_batch_i`` of ``train_per_batch`` images each; CIFAR-100 one ``train``
    of ``5 * train_per_batch``; both a test batch of ``test`` images and the meta pickle. Pixel
    values and labels are random (seeded); CIFAR-100 label names are placeholders."""
    tarball, inner, train_members, test_member, label_key, _ = _variant(num_classes)
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    def batch(n: int, label: str, index: int) -> dict:
        d = {b"batch_label": label.encode(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"fake_{index}_{i}.png".encode() for i in range(n)]}
        fine = rng.integers(0, num_classes, n).tolist()
        if num_classes == 10:
            d[b"labels"] = fine
        else:
            d[b"fine_labels"] = fine
            d[b"coarse_labels"] = [c // 5 for c in fine]
        return d

    files: dict[str, dict] = {}
    if num_classes == 10:
        for i, m in enumerate(train_members, 1):
            files[m] = batch(train_per_batch, f"training batch {i} of 5", i)
        files[test_member] = batch(test, "testing batch 1 of 1", 0)
        files["batches.meta"] = {b"num_cases_per_batch": train_per_batch, b"num_vis": 3072,
                                 b"label_names": [c.encode() for c in CIFAR10_CLASSES]}
    else:
        files["train"] = batch(5 * train_per_batch, "training batch 1 of 1", 1)
        files["test"] = batch(test, "testing batch 1 of 1", 0)
        files["meta"] = {b"fine_label_names": [f"class_{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"superclass_{i}".encode() for i in range(20)]}
    out = path / tarball
    with tarfile.open(out, "w:gz") as tar:
        for name, obj in files.items():
            blob = pickle.dumps(obj, protocol=2)  # the official files are Python 2 pickles
            info = tarfile.TarInfo(f"{inner}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return out
