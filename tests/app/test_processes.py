"""Stopping, killing and failing `subnetdp train`: real signals to real process trees.

Nothing here may outlive its test: every process a test starts is tracked (its whole tree, from
/proc, as it grows) and SIGKILLed by PID in a finally. Linux only (/proc, prctl, flock).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from subnetdp.app import lock as run_lock

from _runs import ENV, _config, cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: /proc, prctl, flock")

TIMEOUT = 5  # run.timeout: seconds before a collective with a dead or stuck peer raises
STOPPED_WITHIN = 15  # seconds for a whole tree to go (a few on an idle machine; this one is shared)
LONG = ["--set", "run.steps=100000", "--set", "run.eval_interval=0", "--set", "run.checkpoint_interval=5",
        "--set", f"run.timeout={TIMEOUT}", "--set", "eval.recalibrate_norm_batches=0"]
CLI = [sys.executable, "-m", "subnetdp.app.cli", "train"]


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time, state) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(name)] = (int(fields[1]), int(fields[19]), fields[0].decode())
    return table


class Tree:
    """A command started in a session of its own, its output captured, and every process of its
    tree remembered (pid -> start time) from the moment it starts: `kill` ends them all by PID."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                     start_new_session=True)
        self.known: dict[int, int] = {}
        self.parents: dict[int, int] = {}
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._follow, daemon=True)
        self._watch.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(0.1)

    def scan(self) -> None:
        table = _proc_table()
        todo = [self.proc.pid, *self.known]
        while todo:
            pid = todo.pop()
            for child, (parent, start, _) in table.items():
                if parent == pid and child not in self.known:
                    self.known[child], self.parents[child] = start, parent
                    todo.append(child)

    def alive(self) -> list[int]:
        """The tree's processes still running (zombies count as gone)."""
        table = _proc_table()
        return [pid for pid, start in list(self.known.items())
                if pid in table and table[pid][1] == start and table[pid][2] != "Z"]

    def workers(self) -> dict[int, int]:
        """rank -> pid of the tree's live worker processes."""
        found = {}
        for pid in self.alive():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
            if rank:
                found[int(rank[0])] = pid
        return found

    def torchrun(self) -> int:
        """The torchrun process: the parent of the workers."""
        parents = {self.parents[pid] for pid in self.workers().values()}
        assert len(parents) == 1, parents
        return parents.pop()

    def communicate(self, timeout: float) -> tuple[int | None, str, str, float]:
        """Wait for the command: (exit code or None if it still ran, stdout, stderr, seconds)."""
        t0 = time.monotonic()
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, "", "", time.monotonic() - t0
        return self.proc.returncode, out, err, time.monotonic() - t0

    def gone_within(self, seconds: float) -> list[int]:
        """Wait up to ``seconds`` for the whole tree to end; the processes still alive then."""
        deadline = time.monotonic() + seconds
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.alive()

    def kill(self) -> None:
        self._stop.set()
        self._watch.join()
        self.scan()
        table = _proc_table()
        for pid, start in [(self.proc.pid, None), *self.known.items()]:
            if pid in table and start in (None, table[pid][1]):
                try:
                    os.kill(pid, signal.SIGCONT)  # a stopped process takes SIGKILL too, but be sure
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def _wait_for_training(tree: Tree, out: Path, checkpoint: bool = False, timeout: float = 240) -> None:
    """Until metrics.jsonl has a line (and, with ``checkpoint``, a checkpoint is complete)."""
    from subnetdp.app.train.checkpoint import latest
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert tree.proc.poll() is None, tree.proc.communicate()[1][-3000:]
        if (metrics.exists() and metrics.read_text().strip()
                and (not checkpoint or latest(out / "checkpoints", verify=False) is not None)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no training after {timeout}s")


def _unlocked_within(out: Path, seconds: float) -> None:
    """The run folder's lock is free within ``seconds``. Not at once: a killed multi-threaded
    worker shows as a zombie as soon as its main thread is gone, and its other threads (gloo's)
    may still hold its open files, the lock among them, for a moment."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            run_lock.check_unlocked(out)
            return
        except run_lock.RunFolderLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _run_cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """`subnetdp train ARGS` in this process (for commands refused before they start anything)."""
    t0 = time.monotonic()
    result = cli("train", *args)
    return result, time.monotonic() - t0


# ---------------------------------------------------------------------------------------------
# the lock, in one process


def test_lock_names_its_holder_and_a_dead_holders_file_blocks_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "since": "yesterday"}))
    run_lock.check_unlocked(out)  # a file a killed run left: not held
    held = run_lock.acquire(out)
    try:
        info = json.loads((out / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["since"]
        for attempt in (run_lock.check_unlocked, run_lock.acquire):
            with pytest.raises(run_lock.RunFolderLocked, match=re.escape(
                    f"in use by another run: pid {os.getpid()} on host {info['host']} since {info['since']}")):
                attempt(out)
        monkeypatch.setenv(run_lock.LOCKED_BY_LAUNCHER, str(out.resolve()))
        run_lock.check_unlocked(out)  # a worker of the launcher that holds it
    finally:
        held.release()
    assert not (out / ".lock").exists()
    monkeypatch.delenv(run_lock.LOCKED_BY_LAUNCHER)
    with run_lock.lock_run_folder(out):
        pass


# ---------------------------------------------------------------------------------------------
# item 5: stopping the launcher, or killing torchrun, stops everything


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_launcher_stops_torchrun_and_every_worker(tmp_path, sig):
    config, out = _config(tmp_path), tmp_path / "run"
    tree = Tree([*CLI, str(config), "--workers", "2", "--out", str(out), "--no-progress", *LONG])
    try:
        _wait_for_training(tree, out, checkpoint=sig == signal.SIGTERM)
        assert len(tree.workers()) == 2
        if sig == signal.SIGTERM:  # while it runs, the folder is locked, with or without --resume
            for extra in ([], ["--resume"], ["--workers", "1", "--simulate"]):
                second, seconds = _run_cli(str(config), "--workers", "2", "--out", str(out), "--no-progress", *extra)
                assert second.returncode == 2, second.stderr[-3000:]
                assert _last_line(second.stderr).startswith(f"error: {out} is in use by another run: pid "
                                                             f"{tree.proc.pid} on host "), second.stderr[-3000:]
                assert seconds < 60
        os.kill(tree.proc.pid, sig)
        rc, _, err, seconds = tree.communicate(timeout=STOPPED_WITHIN)
        assert rc == 128 + sig, (rc, err[-3000:])
        assert seconds < STOPPED_WITHIN
        assert tree.gone_within(2) == []
        last = _last_line(err)
        assert last.startswith(f"stopped by {sig.name}: torchrun and its 2 workers are stopped; "), err[-3000:]
        assert "Traceback" not in err, err[-5000:]  # torchrun's few lines about stopping its workers, then this
        _unlocked_within(out, STOPPED_WITHIN)
        assert not (out / ".lock").exists()
        if sig == signal.SIGTERM:  # the resume it suggests works: nothing pruned its checkpoint meanwhile
            step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
            assert "checkpoint of step " in last and last.endswith(f"with: subnetdp train --out {out} --resume"), last
            # that command (on the run's own 2 workers), made a little longer
            resumed = subprocess.run([*CLI, "--out", str(out), "--no-progress", "--resume",
                                      "--set", f"run.steps={step + 2}"],
                                     capture_output=True, text=True, env=ENV, timeout=240, start_new_session=True)
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            assert json.loads((out / "summary.json").read_text())["resumed_from"]
            assert not (out / ".lock").exists()
        else:  # its checkpoint, if one was written yet, or start again
            assert f"with: subnetdp train --out {out} --resume" in last or \
                f": subnetdp train {config} --workers 2 --out {out} " + " ".join(LONG) in last, last
    finally:
        tree.kill()


@pytest.mark.slow
def test_torchrun_killed_under_the_launcher_takes_its_workers_along(tmp_path):
    config, out = _config(tmp_path), tmp_path / "run"
    tree = Tree([*CLI, str(config), "--workers", "2", "--out", str(out), "--no-progress", *LONG])
    try:
        _wait_for_training(tree, out)
        os.kill(tree.torchrun(), signal.SIGKILL)
        rc, _, err, seconds = tree.communicate(timeout=STOPPED_WITHIN)
        assert rc == 128 + signal.SIGKILL, (rc, err[-3000:])
        assert tree.gone_within(2) == []
        assert _last_line(err).startswith("error: torchrun was killed by SIGKILL; its 2 workers are stopped; ")
        _unlocked_within(out, STOPPED_WITHIN)
    finally:
        tree.kill()


@pytest.mark.slow
def test_a_sigkilled_launcher_takes_torchrun_and_its_workers_along(tmp_path):
    config, out = _config(tmp_path), tmp_path / "run"
    tree = Tree([*CLI, str(config), "--workers", "2", "--out", str(out), "--no-progress", *LONG])
    try:
        _wait_for_training(tree, out)
        assert len(tree.workers()) == 2
        os.kill(tree.proc.pid, signal.SIGKILL)  # no handler runs: torchrun gets SIGTERM from the kernel
        assert tree.gone_within(STOPPED_WITHIN) == []
        _unlocked_within(out, STOPPED_WITHIN)  # released by the kernel; the file left behind blocks nothing
    finally:
        tree.kill()
        for left in Path(tempfile.gettempdir()).glob(f"subnetdp-failures-{tree.proc.pid}-*"):
            left.unlink()  # the launcher could not remove its (empty) failure file


@pytest.mark.slow
def test_workers_of_the_users_own_torchrun_die_with_it_and_rank_0_holds_the_lock(tmp_path):
    config, out = _config(tmp_path), tmp_path / "run"
    tree = Tree([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                 "-m", "subnetdp.app.cli", "train", str(config), "--out", str(out), "--no-progress", *LONG])
    try:
        _wait_for_training(tree, out)
        workers = tree.workers()
        assert sorted(workers) == [0, 1], (workers, tree.known)
        second, _ = _run_cli(str(config), "--workers", "2", "--simulate", "--out", str(out), "--no-progress",
                             "--resume")
        assert second.returncode == 2, second.stderr[-3000:]
        assert _last_line(second.stderr).startswith(f"error: {out} is in use by another run: pid {workers[0]} on host "
                                                    ), (workers, second.stderr[-3000:])
        os.kill(tree.proc.pid, signal.SIGKILL)  # torchrun itself: no handler, no clean-up
        assert tree.gone_within(STOPPED_WITHIN) == []
        _unlocked_within(out, STOPPED_WITHIN)  # its holder is dead: the kernel released it
    finally:
        tree.kill()


# ---------------------------------------------------------------------------------------------
# item 6: a dead or stuck peer's error is what the user sees last, within one timeout


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "stuck"])
def test_a_dead_or_stuck_peer_ends_the_run_with_its_collective_error(tmp_path, how):
    config, out = _config(tmp_path), tmp_path / "run"
    tree = Tree([*CLI, str(config), "--workers", "2", "--out", str(out), "--no-progress", *LONG])
    try:
        _wait_for_training(tree, out)
        os.kill(tree.workers()[1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        rc, _, err, seconds = tree.communicate(timeout=TIMEOUT + STOPPED_WITHIN)
        assert rc not in (0, None), (rc, err[-3000:])
        assert seconds < TIMEOUT + STOPPED_WITHIN
        assert tree.gone_within(2) == []
        last = _last_line(err)
        assert last.startswith("error: CollectiveError: rank 0: ") and "over workers [0, 1]" in last, err[-5000:]
        if how == "stuck":
            assert f"did not complete within {TIMEOUT}s" in last or f"timed out after {TIMEOUT}s" in last
        _unlocked_within(out, STOPPED_WITHIN)
    finally:
        tree.kill()


# ---------------------------------------------------------------------------------------------
# issue 17, item 6: a stopped or killed `subnetdp sweep` takes its cells along


SWEEP = """
[sweep]
name = "long"
base = "config.toml"
launch = "simulate"
workers = [2]
seeds = [0]
set = ["run.steps=100000", "run.eval_interval=0", "run.checkpoint_interval=3", "eval.recalibrate_norm_batches=0"]
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_stopped_or_killed_sweep_takes_its_cells_along_and_the_rerun_resumes(tmp_path, sig):
    _config(tmp_path)
    sweep, out = tmp_path / "sweep.toml", tmp_path / "out"
    sweep.write_text(SWEEP)
    command = [sys.executable, "-m", "subnetdp.app.cli", "sweep", str(sweep), "--out", str(out), "--no-progress"]
    cell = out / "cells" / "base" / "n2" / "s0"
    tree = Tree(command)
    try:
        _wait_for_training(tree, cell, checkpoint=True)
        assert tree.alive()  # the cell's `subnetdp train --workers 2 --simulate`, below the sweep
        os.kill(tree.proc.pid, sig)
        if sig == signal.SIGTERM:
            rc, _, err, seconds = tree.communicate(timeout=STOPPED_WITHIN)
            assert rc == 128 + sig, (rc, err[-3000:])
            assert _last_line(err).startswith("stopped by SIGTERM: 1 running cell stopped (base/n2/s0), 0 done, "
                                              "0 not started; rerun the same command to continue "), err[-3000:]
            assert "Traceback" not in err, err[-3000:]
        assert tree.gone_within(STOPPED_WITHIN) == [], tree.known  # SIGKILL: the kernel's SIGTERM (pdeathsig)
        _unlocked_within(cell, STOPPED_WITHIN)
    finally:
        tree.kill()
    step = json.loads((cell / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    rerun = subprocess.run([*command, "--set", f"run.steps={step + 2}"], capture_output=True, text=True, env=ENV,
                           timeout=240, start_new_session=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "done   base/n2/s0 (" in rerun.stdout and ", resumed)" in rerun.stdout, rerun.stdout[-3000:]
    assert json.loads((cell / "summary.json").read_text())["resumed_from"] >= 3


DEMO_SETS = ["data.name=synthetic-images", "data.train_size=256", "data.test_size=64", "model.width=4",
             "eval.recalibrate_norm_batches=0", "run.eval_interval=0", "run.log_interval=1"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_stopped_or_killed_demo_takes_its_run_along(tmp_path, sig):
    """`subnetdp demo` ran `subnetdp train --workers` with subprocess.run: killed, or stopped (then it
    died alone), it left the run training, holding its folder's lock."""
    command = [sys.executable, "-m", "subnetdp.app.cli", "demo", "--workers", "2", "--steps", "100000", "--out",
               str(tmp_path), "--no-progress"]
    for item in DEMO_SETS:
        command += ["--set", item]
    tree = Tree(command)
    try:
        _wait_for_training(tree, tmp_path / "ddp")
        assert len(tree.workers()) == 2
        os.kill(tree.proc.pid, sig)
        if sig == signal.SIGTERM:
            rc, _, err, _ = tree.communicate(timeout=STOPPED_WITHIN)
            assert rc == 128 + sig, (rc, err[-3000:])
            assert _last_line(err) == ("stopped by SIGTERM: the demo's DDP run is stopped, with its workers; run "
                                       "the demo again to start over"), err[-3000:]
        assert tree.gone_within(STOPPED_WITHIN) == [], tree.known
        _unlocked_within(tmp_path / "ddp", STOPPED_WITHIN)
    finally:
        tree.kill()
        for left in Path(tempfile.gettempdir()).glob(f"subnetdp-failures-{tree.proc.pid}-*"):
            left.unlink()  # a SIGKILLed demo could not remove its (empty) failure file


@pytest.mark.slow
def test_a_stopped_bench_takes_torchrun_and_its_workers_along(tmp_path):
    """`subnetdp bench` ran torchrun with subprocess.run: stopped, it died alone."""
    tree = Tree([sys.executable, "-m", "subnetdp.app.cli", "bench", "--workers", "2", "--strategies", "ddp,fsdp",
                 "--width", "4", "--batch-size", "4", "--steps", "100000", "--out", str(tmp_path)])
    try:
        deadline = time.monotonic() + 240
        while len(tree.workers()) < 2:
            assert tree.proc.poll() is None and time.monotonic() < deadline, tree.proc.communicate()[1][-3000:]
            time.sleep(0.2)
        os.kill(tree.proc.pid, signal.SIGTERM)
        rc, _, err, _ = tree.communicate(timeout=STOPPED_WITHIN)
        assert rc == 128 + signal.SIGTERM, (rc, err[-3000:])
        assert _last_line(err).startswith("stopped by SIGTERM: torchrun and its 2 workers (ddp) are stopped; "), err
        assert tree.gone_within(2) == [], tree.known
        assert not (tmp_path / "raw" / "fsdp").exists()  # the strategies left are not started
    finally:
        tree.kill()


def test_process_trees_stop_then_kill_what_ignores_sigterm_and_start_only_in_their_thread():
    from subnetdp.app.launch import ProcessTrees

    stubborn = ("import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "subprocess.Popen(['sleep', '60']); time.sleep(60)")
    with ProcessTrees(grace_s=0.5) as trees:
        errors: list[BaseException] = []

        def elsewhere() -> None:
            try:
                trees.start(["true"], ENV)
            except RuntimeError as exc:
                errors.append(exc)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert "PR_SET_PDEATHSIG" in str(errors[0])  # a pool thread that ends would take its processes along
        proc = trees.start([sys.executable, "-c", stubborn], ENV)
        deadline = time.monotonic() + 30
        while not trees.known[proc.pid]:  # its `sleep 60`
            assert time.monotonic() < deadline
            trees.poll()
            time.sleep(0.05)
        family = {proc.pid: _proc_table()[proc.pid][1], **trees.known[proc.pid]}
        trees.stop()
        stopped = time.monotonic()
        while trees.running:
            assert trees.poll() in ([], [proc]) and time.monotonic() - stopped < 10
            time.sleep(0.05)
        assert proc.returncode == -signal.SIGKILL and time.monotonic() - stopped >= 0.5  # after the grace
    table = _proc_table()
    assert not [p for p, start in family.items() if p in table and table[p][1] == start and table[p][2] != "Z"]
