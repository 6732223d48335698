"""CheckpointStore: the folder (a local path or an fsspec URL) that holds a run's
checkpoint_NNNNNNNNN folders, with its filesystem and storage options, made once.

Checkpoints are named by their full path or URL (`store.url + "/checkpoint_..."`), as Ray
Train and the log lines show them. Local folders and object stores take one code path; only
the copy to a node-local folder, which DeepSpeed needs to read a checkpoint, is skipped for
local ones. Every read that fails for another reason than a missing file raises
CheckpointUnreadable (errors.py), and every name a listing or a record gives is checked before
it is joined into a local path (keys.py).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable

from pipelines.errors import ConfigError
from pipelines.storage import filesystem, files_below, is_local, join

from .errors import guarded
from .keys import check_key, inside
from .layout import (ABANDONED, CKPT_RE, TRAIN_STATE, TrainState, done_record, order, say_incomplete,
                     step_of)
from .records import Record, parse_record, size_problem

WRITE_CHECK = ".mmtrain-write-check"


class CheckpointStore:
    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, path = filesystem(self.url, self.storage_options)
        self.path = path.rstrip("/")
        self.local = is_local(self.fs)

    @classmethod
    def containing(cls, checkpoint: str, storage_options: dict | None = None) -> "CheckpointStore":
        """The store of the folder `checkpoint` is in (for a checkpoint named on its own)."""
        if is_local(checkpoint):
            checkpoint = filesystem(checkpoint)[1]  # an absolute path: a relative one has no parent to name
        return cls(checkpoint.rstrip("/").rsplit("/", 1)[0], storage_options)

    @classmethod
    def writable(cls, url: str, storage_options: dict | None) -> "CheckpointStore":
        """The store at `url`, after writing and removing a marker there: a bucket that does not
        exist, a wrong endpoint or missing credentials fail here in one line, not in Ray Train's
        first save."""
        try:
            store = cls(url, storage_options)
            if store.local:  # object stores have no folders; s3fs's makedirs would create a bucket
                store.fs.makedirs(store.path, exist_ok=True)
            store.fs.pipe_file(join(store.path, WRITE_CHECK), b"")
            store.fs.rm_file(join(store.path, WRITE_CHECK))
        except Exception as e:
            raise ConfigError(f"cannot write checkpoints to {url}: {type(e).__name__}: {e}".replace("\n", " ")[:400]
                              + "; check --checkpoint-storage and --storage-options") from None
        return store

    def fs_path(self, url: str) -> str:
        """`url` (this folder or a path below it) as a path of the store's filesystem."""
        path = self.fs._strip_protocol(url).rstrip("/")
        if path != self.path and not path.startswith(self.path + "/"):
            raise ValueError(f"{url} is not in the checkpoint store {self.url}")
        return path

    # files

    def listing(self, url: str) -> dict[str, int]:
        """Size of every file under `url`, by path relative to it ({} if there is none): one
        listing call on an object store instead of one request per file. A key that would
        escape `url` when joined into a local path is refused (UnsafeKey)."""
        return guarded(url, self._sizes, url)

    def _sizes(self, url: str) -> dict[str, int]:
        return {check_key(url, name): size for name, size in files_below(self.fs, self.fs_path(url)).items()}

    def read_bytes(self, checkpoint: str, name: str) -> bytes | None:
        """The file's bytes, None if it does not exist; CheckpointUnreadable on any other error."""
        try:
            return guarded(join(checkpoint, name), self.fs.cat_file, join(self.fs_path(checkpoint), name))
        except FileNotFoundError:
            return None

    def read_record(self, checkpoint: str, name: str) -> Record | None:
        """A record of the checkpoint, None if missing or unparseable."""
        data = self.read_bytes(checkpoint, name)
        return None if data is None else parse_record(data, checkpoint)

    def all_records(self, checkpoint: str) -> Record:
        """Every record under done/ (each rank's, the universal conversion's), merged."""
        merged: Record = {}
        for name in sorted(self.listing(join(checkpoint, "done"))):
            merged.update(self.read_record(checkpoint, f"done/{name}") or {})
        return merged

    def download(self, url: str, local_dir: str, wanted: Callable[[str], bool]) -> None:
        """The files under `url` whose relative path `wanted` accepts, into `local_dir`, leaving
        out those already there with the right size (a retry, or what this process made)."""
        def have(name: str, size: int) -> bool:
            local = inside(local_dir, name)
            return os.path.exists(local) and os.path.getsize(local) == size

        names = [n for n, size in self._sizes(url).items() if wanted(n) and not have(n, size)]
        targets = [inside(local_dir, n) for n in names]
        for t in targets:
            os.makedirs(os.path.dirname(t), exist_ok=True)
        if names:
            self.fs.get([join(self.fs_path(url), n) for n in names], targets)

    def upload(self, local_dir: str, url: str) -> dict[str, int]:
        """Every file of `local_dir` to `url`; returns their sizes by relative path."""
        sizes = {os.path.relpath(os.path.join(root, n), local_dir): os.path.getsize(os.path.join(root, n))
                 for root, _, names in os.walk(local_dir) for n in names}
        if sizes:
            self.fs.put([os.path.join(local_dir, n) for n in sizes], [join(self.fs_path(url), n) for n in sizes])
        return sizes

    @contextmanager
    def local_copy(self, url: str, wanted: Callable[[str], bool], work: str | None = None):
        """Yields a local folder with the files of `url` that `wanted` accepts: `url` itself when
        it is local, else `work` (a node-local folder, a temporary one by default), removed after."""
        if self.local:
            yield self.fs_path(url)
            return
        work = work or tempfile.mkdtemp(prefix="mmtrain-checkpoint-")
        try:
            self.download(url, work, wanted)
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # checkpoints

    def folders(self) -> list[str]:
        """Names of every checkpoint folder in the store, abandoned ones included."""
        self.fs.invalidate_cache(self.path)
        if not self.fs.isdir(self.path):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        return [n for n in names if CKPT_RE.match(n)]

    def list(self) -> list[str]:
        """The checkpoints in the store, oldest first, without the folders of abandoned saves."""
        def live() -> list[str]:
            return [n for n in self.folders() if not self.fs.exists(join(self.path, n, ABANDONED))]

        return [join(self.url, n) for n in sorted(guarded(self.url, live), key=order)]

    def problem(self, checkpoint: str) -> str | None:
        """Why the checkpoint is incomplete, or None if it is complete as far as its listing
        shows (sizes; hashes are checked by `restore.fetch` on what is loaded). Raises
        CheckpointUnreadable when a file cannot be read for another reason than its absence."""
        data = self.read_bytes(checkpoint, TRAIN_STATE)
        if data is None:
            return f"{TRAIN_STATE} is missing"
        try:
            world = TrainState.from_json(data).world_size
        except (ValueError, TypeError):
            world = None
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            return f"{TRAIN_STATE} is unparseable"
        files = self.listing(checkpoint)
        for r in range(world):
            record = self.read_record(checkpoint, done_record(r))
            if record is None:
                return f"rank {r} of {world} did not finish its part ({done_record(r)} is missing or unparseable)"
            why = size_problem(files, record, f"rank {r}")
            if why:
                return why
        return None

    def is_complete(self, checkpoint: str) -> bool:
        return self.problem(checkpoint) is None

    def latest_complete(self, log=print, *, newest: str | None = None, before: str | None = None) -> str | None:
        """The newest complete checkpoint (no newer than `newest`, older than `before`, if
        given); incomplete newer ones are named, with the reason, and skipped."""
        for path in reversed(self.list()):
            if newest is not None and step_of(path) > step_of(newest):
                continue
            if before is not None and order(path) >= order(before):
                continue
            why = self.problem(path)
            if why is None:
                return path
            log(say_incomplete(path, why))
        return None

    def select(self, registered: str | None, log=print) -> str | None:
        """The checkpoint to resume from: the one Ray Train registered last if it is complete,
        else the newest complete one before it. With nothing registered (a run whose Ray Train
        snapshot is gone), the newest complete one in the store."""
        if registered is not None and self.problem(registered) is None:
            return registered
        return self.latest_complete(log, newest=registered)

    def discard_newer(self, step: int | None, log=print) -> None:
        """Checkpoint folders newer than the one resumed from (at `step`) belong to an abandoned
        attempt (an interrupted save, or one registered and damaged later). Their files go; the
        folder stays, empty but for a marker: Ray Train may still list it and delete it when it
        rotates it out (its delete fails the whole run if the folder is gone), and the new
        attempt's saves of those steps take other names (`checkpoint_name`). The marker is
        written first: in an object store a folder is only its objects, so it must never be
        empty. With nothing resumed (`step` None: no complete checkpoint was found) nothing is
        abandoned: the run starts over beside every folder, and its saves take other names."""
        if step is None:
            return
        for path in self.list():
            if step_of(path) > step:
                log(f"removing {os.path.basename(path)}: written by an interrupted attempt after the "
                    f"checkpoint this run resumes from")
                folder = self.fs_path(path)
                self.fs.pipe_file(join(folder, ABANDONED),
                                  f"abandoned: a later attempt resumed from step {step}\n".encode())
                self.fs.invalidate_cache(folder)
                for entry in self.fs.ls(folder, detail=False):
                    if entry.rstrip("/").rsplit("/", 1)[-1] != ABANDONED:
                        self.fs.rm(entry, recursive=True)

    def saved_state(self, checkpoint: str) -> TrainState:
        data = self.read_bytes(checkpoint, TRAIN_STATE)
        if data is None:
            raise FileNotFoundError(join(checkpoint, TRAIN_STATE))
        return TrainState.from_json(data)

    def needs_universal(self, checkpoint: str, world_size: int) -> bool:
        """ZeRO 1-3 partition optimizer states (stage 3: parameters too) by rank, so DeepSpeed can
        load them only at the world size that wrote them; stage 0 keeps whole states per file."""
        saved = self.saved_state(checkpoint)
        return saved.world_size != world_size and saved.zero_stage >= 1
