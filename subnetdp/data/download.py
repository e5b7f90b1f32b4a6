"""Fetch one file over HTTP(S) (or ``file://``) with a progress bar, atomically, checksum-verified;
and where the dataset readers look for their files.

    from subnetdp.data.download import download
    path = download("https://example.org/data.tar.gz", Path("~/.cache/x/data.tar.gz").expanduser(),
                    md5="...")

Only the standard library's urllib is used, so there is nothing extra to install.
Datasets live in ``$SUBNETDP_DATA/<name>`` when that variable is set, else ``~/.cache/subnetdp/<name>``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

from tqdm import tqdm

_CHUNK = 1 << 20
DATA_ENV = "SUBNETDP_DATA"


def cache_dir(name: str) -> Path:
    """Where a download of dataset ``name`` goes: ``$SUBNETDP_DATA/<name>`` or ``~/.cache/subnetdp/<name>``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() / name if env else Path.home() / ".cache" / "subnetdp" / name


def search_dirs(name: str, root: str | Path | None = None, system: tuple[str, ...] = ()) -> list[Path]:
    """Folders to look in for dataset ``name``, in order: ``root`` and ``root/<name>`` when given
    (nothing else then: an explicit folder should not silently fall back to another copy);
    otherwise ``$SUBNETDP_DATA/<name>``, ``~/.cache/subnetdp/<name>``, then the ``system`` folders."""
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / name]
    dirs = []
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]).expanduser() / name)
    dirs.append(Path.home() / ".cache" / "subnetdp" / name)
    dirs.extend(Path(s) for s in system)
    return dirs


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes (``algorithm``: anything hashlib knows, e.g. "md5", "sha256")."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    The bytes go to a temporary file in ``dest``'s folder that replaces ``dest`` only once it is
    complete and its checksums match, so an interrupted or corrupt download never looks finished.
    On a checksum mismatch the temporary file is removed and ValueError says what was expected.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=60)
            except OSError as e:  # URLError is an OSError
                raise OSError(f"could not download {url}: {e}") from e
            with response:
                total = response.headers.get("Content-Length")
                with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                          unit_divisor=1024, desc=dest.name, leave=False) as bar:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
        for algorithm, expected in (("sha256", sha256), ("md5", md5)):
            if expected is not None:
                actual = file_digest(tmp, algorithm)
                if actual.lower() != expected.lower():
                    raise ValueError(f"{algorithm} mismatch for {url}: expected {expected}, got "
                                     f"{actual}; the download was discarded (not written to {dest})")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
