"""An output location has one owner: never one of the inputs, never someone else's folder, and
never two running jobs at once.

- `check_no_overlap`: the output may not be, contain, or lie inside an input location (a
  folder, the fixed part of a glob, a file), compared after absolutizing and resolving
  symlinks (local) or normalizing the key (object stores). `preprocess D --output D` would
  otherwise write `shard-000000.tar` over an input of the same name, and the next listing
  of D would take our output for input.
- `check_ours`: a location that holds anything but our own files (`_job.json`, a lock) is
  someone else's: refused, never mixed into.
- `OutputLock`: a running job holds `_lock/NNNNNNNN.json`. Taking the lock means creating
  the next generation's file exclusively (`OutputStore.create_exclusive`: a hard link
  locally, a PUT with `If-None-Match: *` on S3), so of any number of jobs that race for it
  exactly one wins, on every store, without any rename or delete. The holder rewrites its
  file every `HEARTBEAT_SECONDS` (a lease) and marks it released when it ends.

Whether the holder of an unreleased lock is dead: on the same host (hostname), its pid no
longer runs or runs a process that started at another time (pid reuse), which /proc tells
at once (so a re-run after `kill -9` takes over immediately); from another host (a shared
NFS folder, an object store), its lease has not been renewed for `LEASE_SECONDS`: that
compares the holder's clock with ours, so clocks must agree to well within a minute (NTP).
A dead holder's lock is taken over by creating the next generation, and the run says so.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Callable

from braceexpand import braceexpand

from .errors import UserError
from .processes import process_runs, process_start
from .storage import OutputStore, filesystem, is_local, protocol_of

log = logging.getLogger(__name__)

LOCK_DIR = "_lock"
LEASE_SECONDS = 120.0
HEARTBEAT_SECONDS = 20.0
_GLOB_CHARS = "*?["


class OutputConflict(UserError):
    """The output location holds a different job's output, or someone else's files."""


class OutputBusy(OutputConflict):
    """Another running job holds the output's lock."""


# --- where things are ------------------------------------------------------------------

def _location(url: str, storage_options: dict) -> tuple[str, str]:
    """(filesystem family, absolute normalized path) of a local path or URL."""
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        return "file", os.path.realpath(path)
    return protocol_of(fs), posixpath.normpath("/" + path.strip("/"))


def _fixed_part(path: str) -> str:
    """The folder a glob lists: its path up to the first component with a wildcard."""
    parts = path.split("/")
    for i, p in enumerate(parts):
        if any(c in p for c in _GLOB_CHARS):
            return "/".join(parts[:i]) or "/"
    return path


def _inside(a: str, b: str) -> bool:
    """a is b or lies below it."""
    return a == b or a.startswith(b.rstrip("/") + "/")


def check_no_overlap(inputs: list[str], shards: list[str], output: str, storage_options: dict | None) -> None:
    opts = storage_options or {}
    out = _location(output, opts)
    for raw in inputs:
        for pattern in braceexpand(raw):
            if pattern.startswith(("http://", "https://")):
                continue  # never a place we write to
            family, path = _location(pattern, opts)
            where = _fixed_part(path)
            if family == out[0] and (_inside(out[1], where) or _inside(where, out[1])):
                raise OutputConflict(
                    f"--output {output} overlaps the input {pattern}: write the output to a separate "
                    f"location, neither inside an input folder nor containing an input")
    for shard in shards:  # what the patterns found, symlinks resolved
        family, path = _location(shard, opts)
        if family == out[0] and _inside(path, out[1]):
            raise OutputConflict(f"--output {output} contains the input shard {shard}: write the output "
                                 f"to a separate location")


def check_ours(store: OutputStore, job_file: str, job: str = "preprocess") -> None:
    """Refuse a location with files that are not a `job` output's (its `job_file`, a lock)."""
    if store.local and os.path.exists(store.root) and not os.path.isdir(store.root):
        raise OutputConflict(f"{store.url} is a file; --output must name a folder (new or empty)")
    if store.exists(job_file):
        return
    ours = {LOCK_DIR}
    foreign = [n for n in store.entries() if n not in ours and not n.startswith(f"{job_file}.tmp-")]
    if foreign:
        raise OutputConflict(
            f"{store.url} is not empty and holds no {job} output ({len(foreign)} other entries, e.g. "
            f"{foreign[0]!r}); choose a new or empty --output")


# --- the lock --------------------------------------------------------------------------

def holder_state(record: dict, now: float | None = None) -> str:
    """'released', 'dead' or 'alive' (module doc)."""
    if record.get("released"):
        return "released"
    if record.get("host") == socket.gethostname():
        return "alive" if process_runs(int(record.get("pid", -1)), record.get("pid_started")) else "dead"
    lease = float(record.get("lease_seconds", LEASE_SECONDS))
    return "dead" if (now or time.time()) - float(record.get("renewed", 0)) > lease else "alive"


def describe(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started", 0))))
    return f"pid {record.get('pid')} on {record.get('host')}, started {started}"


class OutputLock:
    """Held by the driver of a running job; see the module doc."""

    def __init__(self, store: OutputStore, name: str, record: dict, took_over: dict | None):
        self.store, self.name, self.record, self.took_over = store, name, record, took_over
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread = threading.Thread(target=self._heartbeat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()

    def _read(self) -> dict:
        self.store.fs.invalidate_cache(self.store.path(self.name))
        return json.loads(self.store.read_bytes(self.name))

    def _heartbeat(self) -> None:
        while not self._stop.wait(float(self.record["lease_seconds"]) / 6):
            try:
                if self._read().get("owner") != self.record["owner"]:
                    self._lost = f"{self.store.url}: another job replaced this job's lock ({self.name})"
                    return
                self.record["renewed"] = time.time()
                self.store.write_json(self.name, self.record)
            except Exception as e:  # noqa: BLE001  (a lease renewal is retried at the next beat)
                log.warning("%s: renewing the lock %s failed: %s", self.store.url, self.name, e)

    def ensure_held(self) -> None:
        """Raise if another job took the lock over (a store without exclusive create)."""
        if self._lost:
            raise OutputBusy(self._lost)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._lost:
            return
        self.record.update(released=True, renewed=time.time())
        try:
            self.store.write_json(self.name, self.record)
        except Exception as e:  # noqa: BLE001  (the job's own error, if any, is the one to report)
            # unreleased, the lock is taken over by the next run once this process is gone
            log.warning("%s: releasing the lock %s failed: %s", self.store.url, self.name, e)


def _generations(store: OutputStore) -> list[str]:
    store.fs.invalidate_cache(store.path(LOCK_DIR))
    return sorted(n for n in store.list(LOCK_DIR)
                  if n.startswith(f"{LOCK_DIR}/") and n.endswith(".json") and n[len(LOCK_DIR) + 1:-5].isdigit())


def acquire(store: OutputStore, fingerprint: str, *, say: Callable[[str], None] | None = None,
            lease_seconds: float = LEASE_SECONDS, job: str = "preprocess") -> OutputLock:
    """Take the output's lock, or raise `OutputBusy` in one line if a live job holds it."""
    record = {
        "owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
        "pid_started": process_start(os.getpid()), "started": time.time(), "renewed": time.time(),
        "lease_seconds": lease_seconds, "released": False, "fingerprint": fingerprint,
    }
    for _ in range(20):  # each pass loses only to a job that took the lock meanwhile
        gens = _generations(store)
        previous = None
        if gens:
            try:
                previous = json.loads(store.read_bytes(gens[-1]))
            except FileNotFoundError:
                continue  # cleaned up meanwhile by the job that superseded it
            except (ValueError, UnicodeDecodeError):
                raise OutputConflict(f"{store.path(gens[-1])} is not a lock of ours; if no job writes to "
                                     f"{store.url}, delete it") from None
            if not isinstance(previous, dict):
                raise OutputConflict(f"{store.path(gens[-1])} is not a lock of ours")
            state = holder_state(previous)
            if state == "alive":
                raise OutputBusy(f"{store.url} is being written by another {job} ({describe(previous)}); "
                                 f"wait for it to finish or stop it")
            number = int(gens[-1][len(LOCK_DIR) + 1:-5]) + 1
        else:
            number = 1
        name = f"{LOCK_DIR}/{number:08d}.json"
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        if not store.create_exclusive(name, data):
            continue
        took_over = previous if previous is not None and not previous.get("released") else None
        if took_over is not None:
            message = (f"taking over {store.url}: the {job} that held it ({describe(took_over)}) "
                       f"is gone")
            (say or log.warning)(message)
        for old in gens[:-1]:  # generations before the one just superseded: nobody reads them
            try:
                store.fs.rm(store.path(old))
            except FileNotFoundError:
                pass
        return OutputLock(store, name, record, took_over)
    raise OutputBusy(f"{store.url}: could not take the lock (other jobs keep taking it)")
