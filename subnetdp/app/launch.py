"""Starting worker processes, and never leaving them behind: the torchrun command line that
starts N workers with one thread each, and running that process tree so that it never outlives its
launcher (signals forwarded, stragglers killed, workers dying with their parent, the workers'
errors reported last).

Used by `subnetdp train --workers`, `bench`, `demo` (``run_process_tree``: one tree) and `sweep`
(``ProcessTrees``: several side by side); nothing here knows SDP.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

# torchrun, but stopped by a signal it exits with 128 + the signal instead of a traceback
_TORCHRUN_QUIET_STOP = """import sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main
try:
    main()
except SignalException as e:
    sys.exit(128 + int(e.sigval))
"""


def torchrun_command(nproc: int, module: str, *args: str, quiet_stop: bool = False) -> list[str]:
    """The command that runs ``python -m module args`` in ``nproc`` local worker processes
    under torchrun (one standalone job on this machine). ``quiet_stop``: stopped by a signal,
    torchrun exits with 128 + the signal without a traceback."""
    launcher = ["-c", _TORCHRUN_QUIET_STOP] if quiet_stop else ["-m", "torch.distributed.run"]
    return [sys.executable, *launcher, "--standalone", f"--nproc-per-node={nproc}", "-m", module, *args]


def worker_env(omp_threads: int | None, keep_if_set: bool = False) -> dict[str, str]:
    """This process's environment for worker processes, with OMP_NUM_THREADS = ``omp_threads``
    (several workers share the cores: one thread each keeps them from fighting). ``keep_if_set``
    leaves a value the user exported alone; None changes nothing."""
    env = dict(os.environ)
    if omp_threads is not None and not (keep_if_set and "OMP_NUM_THREADS" in env):
        env["OMP_NUM_THREADS"] = str(omp_threads)
    return env


# ---------------------------------------------------------------------------------------------
# running a process tree: nothing outlives its launcher

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)  # this part is for POSIX; importing it works anywhere
# set by the launcher for its workers: a file where a failing worker appends its error, one line
FAILURE_FILE = "SUBNETDP_FAILURE_FILE"
_PR_SET_PDEATHSIG = 1


def _prctl() -> Any:
    """libc's prctl, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM, prctl: Any = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux
    ``prctl(PR_SET_PDEATHSIG)``); if the parent went meanwhile, send it now. False where the
    platform cannot (nothing changes). ``prctl``: the function, looked up beforehand (between
    fork and exec nothing should be loaded)."""
    prctl = prctl or _prctl()
    if prctl is None:
        return False
    parent = os.getppid()  # (pid 1 may be a real parent: torchrun as a container's entry point)
    ok = prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    if ok and os.getppid() != parent:  # orphaned while the prctl took effect
        os.kill(os.getpid(), sig)
    return ok


def note_failure(message: str) -> None:
    """Append ``message`` as one line to the launcher's failure file (``FAILURE_FILE``), if this
    process has a launcher; the launcher shows the first one as its last line."""
    path = os.environ.get(FAILURE_FILE)
    if not path:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (" ".join(message.split()) + "\n").encode(errors="replace"))
        finally:
            os.close(fd)


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every process, from /proc (empty where there is none)."""
    table = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()  # the name may hold spaces and ')'
            except (OSError, IndexError):
                continue
            table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pid: int, table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """Every process below ``pid`` (children, their children, ...): pid -> start time. Linux only
    (elsewhere empty). ``table``: a ``_process_table()`` read beforehand, for several pids."""
    table = _process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p not in found:
            found[p] = table[p][1]
            todo.extend(children.get(p, []))
    return found


def kill_processes(known: dict[int, int], sig: int = _SIGKILL) -> None:
    """Send ``sig`` (default SIGKILL) to each of ``known`` (pid -> start time) still alive as the
    same process (not another one that got its pid since)."""
    table = _process_table()
    for pid, start in known.items():
        if pid in table and table[pid][1] == start:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)


@dataclass
class TreeResult:
    """How a process tree run by ``run_process_tree`` ended."""

    returncode: int                    # the root's (negative: killed by that signal)
    stopped_by: int | None = None      # the stop signal the launcher received and forwarded
    failures: list[str] = field(default_factory=list)  # the workers' notes (note_failure), oldest first


def run_process_tree(cmd: Sequence[str], env: dict[str, str], grace_s: float = 5.0,
                     poll_s: float = 0.25, stdout: Any = None, stderr: Any = None) -> TreeResult:
    """Run ``cmd`` (torchrun) in its own session, so that only this process decides what it
    gets, and make sure nothing it started outlives it:

    * SIGINT, SIGTERM or SIGHUP to this process is forwarded to it as SIGTERM (torchrun then stops
      its workers); what is still alive ``grace_s`` later is SIGKILLed, and at once on a second signal;
    * once a worker has noted an error (``note_failure``), what is still alive ``grace_s`` later is
      SIGKILLed (torchrun would give a stuck peer 30 s after SIGTERM);
    * when it exits (or is killed), what it started and left behind is SIGKILLed (its process
      group and every descendant seen meanwhile: torchrun starts each worker in a session of its own);
    * it dies with this process (``prctl(PR_SET_PDEATHSIG, SIGTERM)``), even of SIGKILL.

    Workers find a file to note their errors in under ``FAILURE_FILE``; they come back as
    ``failures``. ``stdout``, ``stderr``: as subprocess.Popen's (default: this process's). POSIX;
    the signals are handled only when called from the main thread."""
    # named after this process: if it is SIGKILLed, the (empty) file it leaves says whose it was
    fd, failure_file = tempfile.mkstemp(prefix=f"subnetdp-failures-{os.getpid()}-", suffix=".txt")
    os.close(fd)
    received: list[int] = []
    forwarded: list[int] = []
    proc: subprocess.Popen | None = None
    known: dict[int, int] = {}

    def kill_tree() -> None:
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, _SIGKILL)
        kill_processes(known)

    def forward() -> None:  # as SIGTERM: torchrun passes it on, and SIGINT makes every worker print a traceback
        if proc is None or forwarded or proc.returncode is not None:
            return
        forwarded.append(received[0])
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGTERM)

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        forward()

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS} if main_thread else {}
    prctl = _prctl()
    try:
        if not received:
            proc = subprocess.Popen(list(cmd), env={**env, FAILURE_FILE: failure_file}, start_new_session=True,
                                    preexec_fn=(lambda: die_with_parent(signal.SIGTERM, prctl)) if prctl else None,
                                    stdout=stdout, stderr=stderr)
        deadline = None
        while proc is not None and proc.poll() is None:
            known.update(descendants(proc.pid))
            if received:
                forward()
            if deadline is None and (received or os.path.getsize(failure_file)):
                deadline = time.monotonic() + grace_s
            if deadline is not None and (time.monotonic() > deadline or len(received) > 1):
                kill_tree()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(poll_s)
        with contextlib.suppress(OSError):  # gone: so must be everything it started
            if proc is not None:
                os.killpg(proc.pid, _SIGKILL)
        kill_processes(known)
        with open(failure_file, errors="replace") as f:
            failures = [line.strip() for line in f if line.strip()]
        return TreeResult(proc.returncode if proc is not None else -received[0],
                          received[0] if received else None, failures)
    finally:
        kill_tree()  # only does something after an error of our own
        for s, handler in previous.items():
            signal.signal(s, handler)
        with contextlib.suppress(OSError):
            os.unlink(failure_file)


# ---------------------------------------------------------------------------------------------
# several process trees side by side (a sweep's cells): none outlives its launcher either


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While inside, SIGINT, SIGTERM and SIGHUP do not end this process: each is appended to the
    list this yields, for the caller's loop to act on (stop its children, then leave). Only in the
    main thread, the only one that may set handlers; elsewhere nothing changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class ProcessTrees:
    """Commands that run side by side under one launcher (a sweep's cells), none of which, nor
    anything it starts, outlives the launcher:

    * each starts in a session of its own (a Ctrl-C in the terminal reaches only the launcher,
      which decides) and dies with the launcher (``prctl(PR_SET_PDEATHSIG, SIGTERM)``), even of
      SIGKILL: the kernel sends that signal when the *thread* that started the process exits, so
      ``start`` only runs in the thread that made this object, which must wait for its processes
      (the main thread, whose exit is the process's), never in a pool thread that may end first;
    * ``stop()`` sends SIGTERM to each command (which stops its own children: `subnetdp train`
      does); what is still alive ``grace_s`` later is SIGKILLed, and at once on a second ``stop()``;
    * what a command left behind when it ends (``poll``), and every process of every tree when the
      ``with`` block is left (an error of the launcher's own included), is SIGKILLed: the trees are
      followed from /proc as they grow. POSIX; following and PR_SET_PDEATHSIG need Linux."""

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.running: list[subprocess.Popen] = []
        self.known: dict[int, dict[int, int]] = {}  # a command's pid -> its processes seen: pid -> start time
        self.stops = 0
        self.deadline: float | None = None
        self._thread = threading.get_ident()
        self._prctl = _prctl()

    def start(self, cmd: Sequence[str], env: dict[str, str], **popen: Any) -> subprocess.Popen:
        """Start ``cmd`` (``popen``: stdout, stderr, stdin... as subprocess.Popen's)."""
        if threading.get_ident() != self._thread:
            raise RuntimeError("ProcessTrees.start from another thread than the one that made it: its "
                               "processes would die when that thread ends (PR_SET_PDEATHSIG)")
        if self.stops:
            raise RuntimeError("ProcessTrees.start after stop()")
        prctl = self._prctl
        proc = subprocess.Popen(list(cmd), env=env, start_new_session=True,
                                preexec_fn=(lambda: die_with_parent(signal.SIGTERM, prctl)) if prctl else None,
                                **popen)
        self.running.append(proc)
        self.known[proc.pid] = {}
        return proc

    def poll(self) -> list[subprocess.Popen]:
        """Follow the trees; the commands that ended since the last call (what they left behind is
        killed). Past the grace after ``stop()``, kills everything still there."""
        table = _process_table()
        ended = []
        for proc in list(self.running):
            self.known[proc.pid].update(descendants(proc.pid, table))
            if proc.poll() is not None:
                self._kill(proc)
                self.running.remove(proc)
                ended.append(proc)
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.kill()
        return ended

    def stop(self) -> None:
        """SIGTERM to each command (the first call); SIGKILL to every tree (a second call)."""
        self.stops += 1
        if self.stops > 1:
            self.kill()
            return
        self.deadline = time.monotonic() + self.grace_s
        for proc in self.running:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL every process of every tree."""
        for proc in self.running:
            self._kill(proc)

    def _kill(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(OSError):  # its group: the pid stays taken while the group lives
            os.killpg(proc.pid, _SIGKILL)
        kill_processes(self.known.get(proc.pid, {}))

    def __enter__(self) -> "ProcessTrees":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.poll()
        self.kill()
        for proc in self.running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
