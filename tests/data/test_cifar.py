import tarfile

import pytest
import torch

from subnetdp.data import cifar
from subnetdp.data.cifar import load_cifar, write_fake_cifar


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("extracted", [False, True])
def test_fake_cifar_roundtrip(tmp_path, num_classes, extracted):
    tarball = write_fake_cifar(tmp_path, num_classes=num_classes, train_per_batch=4, test=6)
    assert tarball.name == f"cifar-{num_classes}-python.tar.gz"
    if extracted:
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp_path / "x", filter="data")
        root = tmp_path / "x"
    else:
        root = tmp_path
    x, y = load_cifar("train", num_classes, root=root)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) < num_classes
    xt, yt = load_cifar("test", num_classes, root=root)
    assert xt.shape == (6, 3, 32, 32) and yt.shape == (6,)
    # both forms hold the same data
    if extracted:
        x2, y2 = load_cifar("train", num_classes, root=tmp_path)
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_official_member_names(tmp_path):
    with tarfile.open(write_fake_cifar(tmp_path, 10)) as tar:
        names = set(tar.getnames())
    assert names == {f"cifar-10-batches-py/{n}" for n in
                     ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                      "test_batch", "batches.meta"]}
    with tarfile.open(write_fake_cifar(tmp_path, 100)) as tar:
        assert set(tar.getnames()) == {"cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"}


def test_missing_and_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SUBNETDP_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as e:
        load_cifar("train", 10)
    assert str(tmp_path / "env" / "cifar-10") in str(e.value)
    assert str(tmp_path / "home" / ".cache" / "subnetdp" / "cifar-10") in str(e.value)
    with pytest.raises(ValueError, match="10 or 100"):
        load_cifar("train", 20)

    mirror = write_fake_cifar(tmp_path / "mirror", 10).parent
    monkeypatch.setattr(cifar, "BASE_URL", mirror.as_uri() + "/")
    from subnetdp.data.download import file_digest
    md5 = file_digest(mirror / "cifar-10-python.tar.gz", "md5")
    monkeypatch.setitem(cifar.VARIANTS, 10, cifar.VARIANTS[10][:5] + (md5,))
    x, _ = load_cifar("test", 10, download=True)
    assert x.shape == (20, 3, 32, 32)
    assert (tmp_path / "env" / "cifar-10" / "cifar-10-python.tar.gz").is_file()
