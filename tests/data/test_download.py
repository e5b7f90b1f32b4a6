import hashlib

import pytest

from subnetdp.data.download import cache_dir, download, search_dirs


def test_download_file_url_with_checksums(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello subnetdp" * 1000)
    dest = tmp_path / "out" / "copy.bin"
    got = download(src.as_uri(), dest, sha256=hashlib.sha256(src.read_bytes()).hexdigest(),
                   md5=hashlib.md5(src.read_bytes()).hexdigest())
    assert got == dest and dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]  # no temporary left behind


def test_download_checksum_mismatch_removes_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    dest = tmp_path / "out" / "copy.bin"
    with pytest.raises(ValueError, match="md5 mismatch.*expected 0+"):
        download(src.as_uri(), dest, md5="0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_download_missing_source_names_url(tmp_path):
    url = (tmp_path / "nope.bin").as_uri()
    with pytest.raises(OSError, match="could not download .*nope.bin"):
        download(url, tmp_path / "out.bin")
    assert list(tmp_path.iterdir()) == []


def test_data_dirs_follow_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SUBNETDP_DATA", raising=False)
    assert cache_dir("x") == tmp_path / "home" / ".cache" / "subnetdp" / "x"
    monkeypatch.setenv("SUBNETDP_DATA", str(tmp_path / "data"))
    assert cache_dir("x") == tmp_path / "data" / "x"
    assert search_dirs("x", system=("/sys/x",))[0] == tmp_path / "data" / "x"
    assert search_dirs("x", root=tmp_path) == [tmp_path, tmp_path / "x"]
