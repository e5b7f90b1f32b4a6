"""One run at a time in a run folder: an exclusive lock on ``DIR/.lock`` while a run writes there.

    with lock_run_folder(out):        # RunFolderLocked, naming the holder, if another run has it
        ...                           # train

The lock is an ``fcntl.flock`` on the file, so the kernel releases it when its holder exits or is
killed: a file left behind by a dead run (its pid, host and start time still in it) blocks
nothing. It is taken by the `subnetdp train --workers N` launcher before it starts torchrun (it tells
its workers through ``LOCKED_BY_LAUNCHER``), or by rank 0 of a job the user started with torchrun,
or by a ``--simulate`` process.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from .config import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
# set by the launcher for its workers: the resolved run folder it holds the lock of
LOCKED_BY_LAUNCHER = "SUBNETDP_RUN_FOLDER_LOCKED"


class RunFolderLocked(ConfigError):
    """Another run (alive) holds the run folder's lock (a ConfigError: `train` shows it as one line)."""


class RunFolderLock:
    """The held lock of one run folder; ``release`` (idempotent) removes the file and unlocks."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            # removed while still held: a run that opened the old file finds it replaced and retries
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = -1


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since', '?')}"


def _locked_error(out: Path, path: Path) -> RunFolderLocked:
    return RunFolderLocked(f"{out} is in use by another run: {_holder(path)} (lock file {path}); "
                           "wait for it to finish or stop it, or choose another --out")


def check_unlocked(out: Path) -> None:
    """Raise ``RunFolderLocked`` if another run holds ``out``'s lock (its launcher's workers
    excepted); creates and changes nothing."""
    path = out / LOCK_NAME
    if fcntl is None or locked_by_launcher(out):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or none we may read): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked_error(out, path) from None
    finally:
        os.close(fd)


def acquire(out: Path) -> RunFolderLock | None:
    """Lock ``out`` (created if missing) for this process, or raise ``RunFolderLocked`` at once
    naming the holder. None where the platform has no ``flock`` (nothing is locked)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    if fcntl is None:
        return None
    tries = 10  # a check_unlocked elsewhere holds it for an instant
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            tries -= 1
            if tries == 0:
                raise _locked_error(out, path) from None
            time.sleep(0.02)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it as we opened it: lock the new one
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode() + b"\n")
    return RunFolderLock(path, fd)


def locked_by_launcher(out: Path) -> bool:
    """Whether this process is a worker whose launcher holds the lock of ``out``."""
    held = os.environ.get(LOCKED_BY_LAUNCHER)
    return held is not None and held == str(out.resolve())


@contextlib.contextmanager
def lock_run_folder(out: Path) -> Iterator[RunFolderLock | None]:
    """``acquire`` for the duration of the block."""
    lock = acquire(out)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
