"""One `train` at a time per run directory: RUN/train.lock.

Two drivers on one run would interleave their audits and metrics and each empty the other's
checkpoints as "abandoned" (CheckpointStore.discard_newer). So a driver holds the lock from before
it writes anything into the run until it ends, on success or error. A second `train` is
refused in one line; the lock of a driver that died (kill -9, a lost node) is taken over by
the next `train`, which says so.

Why a lock file and not flock/fcntl: the run directory may be on NFS or another shared
filesystem, where advisory locks are missing or unreliable, and a driver re-run may be on
another machine. The file is created with O_EXCL (atomic on local filesystems and NFSv3+) and
holds the owner: host, pid, the process's start time, a random token. Whether the owner lives:
- on the same host (same hostname, kernel boot and PID namespace): its pid exists with the
  same start time. Exact and immediate, so a re-run after kill -9 takes over at once;
- from another host the pid means nothing, so the owner touches the file (its mtime) every
  HEARTBEAT_S from a thread, and the lock is stale once untouched for STALE_AFTER_S (6
  periods: a driver busy or swapping for a minute keeps it). This compares the file's mtime
  with our clock, so it assumes clocks agree within a few seconds (NTP), as clusters do.

Taking over is a rename of the stale file to a name of our own, then a check that what we
moved is what we judged stale (if another re-run took over in between, its fresh lock is
put back); then the ordinary O_EXCL create, which only one process can win.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from datetime import datetime, timezone

from pipelines.errors import ConfigError
from pipelines.processes import process_runs, process_start

from .credentials import redacted_argv

LOCK_NAME = "train.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 6 * HEARTBEAT_S


class RunLocked(ConfigError):
    """Another live `train` holds the run directory (one line, exit 2)."""


def _host_identity() -> dict:
    """What makes a pid meaningful: the host name, the kernel boot (a reboot reuses pids)
    and the PID namespace (containers on one kernel share the boot and often the name)."""
    ident = {"host": socket.gethostname()}
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            ident["boot"] = f.read().strip()
        ident["pidns"] = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux: the boot time stands in for the boot id
        import psutil

        ident["boot"] = str(psutil.boot_time())
    return ident


def _describe(owner: dict) -> str:
    since = datetime.fromtimestamp(owner.get("since", 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {since}"


class RunLock:
    """`with RunLock(run_dir, log):` holds RUN/train.lock for the block (see module doc)."""

    def __init__(self, run_dir: str, log=print):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.log = log
        self.token = secrets.token_hex(16)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- acquire / release ----------------------------------------------------------------
    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(5):  # each round either wins, refuses, or removed a stale lock
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return
            seen = self._read_raw(self.path)
            if seen is None:
                continue  # released between our create and our read
            owner, age = _parse(seen[0]), time.time() - seen[1]
            why_dead = self._why_dead(owner, age)
            if why_dead is None:
                raise RunLocked(
                    f"another train is running on {self.run_dir} ({_describe(owner) if owner else 'starting up'}); "
                    f"wait for it to end or stop it (a lock whose driver is gone is taken over; from another host "
                    f"after {STALE_AFTER_S:.0f} s without its heartbeat)")
            if self._remove_stale(seen[0]):
                self.log(f"taking over the lock on {self.run_dir}: the train that held it "
                         f"({_describe(owner) if owner else 'unreadable lock file'}) is gone ({why_dead})")
        raise RunLocked(f"could not take the lock on {self.run_dir}: other train commands keep taking it; "
                        f"run one at a time")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._mine():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # --- internals ------------------------------------------------------------------------
    def _create(self) -> bool:
        owner = {**_host_identity(), "pid": os.getpid(), "started": process_start(os.getpid()),
                 "token": self.token, "since": time.time(), "command": " ".join(redacted_argv(sys.argv))[:500]}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    @staticmethod
    def _read_raw(path: str) -> tuple[bytes, float] | None:
        try:
            with open(path, "rb") as f:
                return f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None

    def _why_dead(self, owner: dict | None, age: float) -> str | None:
        """Why the lock's owner is certainly gone, or None if it may be alive."""
        if owner is None:  # empty or garbled: its creator died before writing, or is writing now
            return f"its lock file is unreadable and {age:.0f} s old" if age > STALE_AFTER_S else None
        same_host = all(owner.get(k) == v for k, v in _host_identity().items())
        if same_host:
            pid = int(owner.get("pid", -1))
            if not process_runs(pid):
                return "its process no longer exists"
            if not process_runs(pid, owner.get("started")):
                return "its pid now belongs to another process"
            return None
        if age > STALE_AFTER_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _remove_stale(self, judged: bytes) -> bool:
        """Removes the lock file if it still is the one judged stale; False if it changed."""
        aside = f"{self.path}.stale-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = self._read_raw(aside)
        if moved is not None and moved[0] != judged:  # another re-run's fresh lock: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True

    def _mine(self) -> bool:
        seen = self._read_raw(self.path)
        owner = _parse(seen[0]) if seen else None
        return owner is not None and owner.get("token") == self.token

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(HEARTBEAT_S):
            if self._mine():
                try:
                    os.utime(self.path)
                except OSError:
                    pass  # the next beat tries again; a missed one or two is within STALE_AFTER_S
            elif not warned:
                warned = True
                self.log(f"warning: the lock on {self.run_dir} was taken by another train (this driver looked "
                         f"gone to it): stop one of them")


def holder(run_dir: str) -> dict | None:
    """Who holds RUN/train.lock, for `show`: None without a lock file; else the owner's host,
    pid, start (`since`) and command line (redacted when written), and `alive`: False with
    `why_dead` when the owner is certainly gone (a killed driver leaves its lock), True when it
    may be running, judged as the next `train` would judge it."""
    seen = RunLock._read_raw(os.path.join(run_dir, LOCK_NAME))
    if seen is None:
        return None
    owner = _parse(seen[0])
    why = RunLock(run_dir)._why_dead(owner, time.time() - seen[1])
    info = {k: owner.get(k) for k in ("host", "pid", "since", "command")} if owner else {}
    return {**info, "alive": why is None, "why_dead": why}


def _parse(data: bytes) -> dict | None:
    try:
        owner = json.loads(data)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) and "token" in owner else None
