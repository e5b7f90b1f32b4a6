import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from subnetdp.data import fashion_mnist
from subnetdp.data.fashion_mnist import load_fashion_mnist, read_idx

from _idx import write_fake_fashion, write_idx

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def no_system_data(tmp_path, monkeypatch):
    """Hide the real data: empty HOME, no $SUBNETDP_DATA, no Debian folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SUBNETDP_DATA", raising=False)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (str(tmp_path / "system"),))
    return tmp_path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x", a, 2051, gz), 2051), a)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "y", labels, 2049, gz), 2049), labels)


def test_read_idx_magic_mismatch(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros(3, np.uint8), 2049)
    with pytest.raises(ValueError, match="magic number is 2049, expected 2051"):
        read_idx(path, 2051)


def test_read_idx_truncated(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((2, 2, 2), np.uint8), 2051)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(path, 2051)


@pytest.mark.parametrize("gz", [False, True])
def test_load_from_root(tmp_path, gz):
    fake = write_fake_fashion(tmp_path / "fm", gz=gz)
    for split in ("train", "test"):
        x, y = load_fashion_mnist(split, root=tmp_path / "fm")
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape[1:] == (28, 28)
        assert np.array_equal(x.numpy(), fake[split][0]) and np.array_equal(y.numpy(), fake[split][1])
    # root may also be the folder above one named fashion-mnist
    write_fake_fashion(tmp_path / "above" / "fashion-mnist", gz=gz)
    assert len(load_fashion_mnist("test", root=tmp_path / "above")[0]) == 5


def test_search_order_env_first(no_system_data, monkeypatch):
    tmp = no_system_data
    write_fake_fashion(tmp / "home" / ".cache" / "subnetdp" / "fashion-mnist", n_train=7)
    assert len(load_fashion_mnist("train")[0]) == 7
    write_fake_fashion(tmp / "env" / "fashion-mnist", n_train=9)
    monkeypatch.setenv("SUBNETDP_DATA", str(tmp / "env"))
    assert len(load_fashion_mnist("train")[0]) == 9


def test_missing_data_error_lists_folders(no_system_data, monkeypatch):
    tmp = no_system_data
    monkeypatch.setenv("SUBNETDP_DATA", str(tmp / "env"))
    with pytest.raises(FileNotFoundError) as e:
        load_fashion_mnist("train")
    msg = str(e.value)
    for folder in (tmp / "env" / "fashion-mnist", tmp / "home" / ".cache" / "subnetdp" / "fashion-mnist",
                   tmp / "system"):
        assert str(folder) in msg
    assert "apt install dataset-fashion-mnist" in msg and "download = true" in msg


def test_download_from_local_mirror(no_system_data, monkeypatch):
    tmp = no_system_data
    fake = write_fake_fashion(tmp / "mirror", gz=True)
    md5 = {p.name[:-3]: hashlib.md5(p.read_bytes()).hexdigest() for p in (tmp / "mirror").iterdir()}
    monkeypatch.setattr(fashion_mnist, "BASE_URL", (tmp / "mirror").as_uri() + "/")
    monkeypatch.setattr(fashion_mnist, "MD5", md5)
    x, y = load_fashion_mnist("test", download=True)
    assert np.array_equal(y.numpy(), fake["test"][1])
    cache = tmp / "home" / ".cache" / "subnetdp" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    # A corrupted mirror is caught by the checksum and leaves nothing behind.
    monkeypatch.setitem(md5, "train-images-idx3-ubyte", "0" * 32)
    with pytest.raises(ValueError, match="md5 mismatch"):
        load_fashion_mnist("train", download=True)
    assert not (cache / "train-images-idx3-ubyte.gz").exists()


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_package():
    x, y = load_fashion_mnist("train", root=DEBIAN)
    assert x.shape == (60000, 28, 28) and y.shape == (60000,)
    xt, yt = load_fashion_mnist("test", root=DEBIAN)
    assert xt.shape == (10000, 28, 28) and int(yt.min()) == 0 and int(yt.max()) == 9
    assert torch.bincount(yt).tolist() == [1000] * 10
    # Debian recompressed the .gz files; their contents are the official ones.
    for name, md5 in fashion_mnist.RAW_MD5.items():
        raw = gzip.decompress((DEBIAN / f"{name}.gz").read_bytes())
        assert hashlib.md5(raw).hexdigest() == md5, name
