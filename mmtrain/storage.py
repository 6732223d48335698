"""Where a run's checkpoints live: in the run directory (the default) or under any fsspec URL
(`s3://`, `gs://`, ...) given as `checkpoint_storage`, reached with the run's storage options.

Ray Train writes there through a pyarrow filesystem wrapping the same fsspec filesystem, so
its uploads and our reads (completeness checks, restore, export) agree on credentials,
endpoint and retries. Local paths and URLs take one code path; only the copy to a node-local
folder, which DeepSpeed needs to read a checkpoint, is skipped for local ones. The rest of
the run (metrics, tokenizer, audit) stays in the run directory, which every node must see.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable

import fsspec
from fsspec.utils import get_protocol

from pipelines.errors import UserError
from pipelines.retry import with_retry_defaults

from .config import ConfigError

STORAGE_NAME = "train"  # Ray Train's run folder inside the checkpoint storage
WRITE_CHECK = ".mmtrain-write-check"


def is_local(url: str) -> bool:
    return get_protocol(url) in ("file", "local")


def normalized(checkpoint_storage: str) -> str:
    """An absolute local path (workers run in other directories) or the URL as given."""
    if not checkpoint_storage:
        return ""
    if is_local(checkpoint_storage):
        return fsspec.core.url_to_fs(checkpoint_storage)[1]
    return checkpoint_storage.rstrip("/")


def base(run_dir: str, checkpoint_storage: str = "") -> str:
    """Ray Train's storage path: the run directory unless the run names other storage."""
    return normalized(checkpoint_storage) or os.path.abspath(run_dir)


def checkpoint_root(run_dir: str, checkpoint_storage: str = "") -> str:
    """The folder (path or URL) that holds the run's checkpoint_NNNNNNNNN folders."""
    return join(base(run_dir, checkpoint_storage), STORAGE_NAME)


def join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def filesystem(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url, **with_retry_defaults(url, storage_options))


def ray_storage(run_dir: str, checkpoint_storage: str, storage_options: dict | None) -> dict:
    """name, storage_path and storage_filesystem for Ray Train's RunConfig. Ray would resolve
    a URL with pyarrow's own filesystems, which know neither fsspec's options nor all of its
    protocols; given a filesystem, Ray wants the path without its scheme."""
    url = base(run_dir, checkpoint_storage)
    if is_local(url):
        return {"name": STORAGE_NAME, "storage_path": url}
    import pyarrow.fs

    fs, path = filesystem(url, storage_options)
    return {"name": STORAGE_NAME, "storage_path": path,
            "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


def check_writable(root: str, storage_options: dict | None) -> None:
    """Writes and removes a marker under `root`: a bucket that does not exist, a wrong
    endpoint or missing credentials fail here in one line, not in Ray Train's first save."""
    try:
        fs, path = filesystem(root, storage_options)
        if is_local(root):
            fs.makedirs(path, exist_ok=True)  # object stores have no folders; s3fs would create a bucket
        fs.pipe_file(join(path, WRITE_CHECK), b"")
        fs.rm_file(join(path, WRITE_CHECK))
    except Exception as e:
        raise ConfigError(f"cannot write checkpoints to {root}: {type(e).__name__}: {e}".replace("\n", " ")[:400]
                          + "; check --checkpoint-storage and --storage-options") from None


def run_checkpoints(run_dir: str, storage_options: dict | None = None) -> tuple[str, dict]:
    """(checkpoint root, storage options) of a finished or running run, from its
    RUN/run_config.json: options given here win over the ones the run was trained with
    (saved without credentials: those come from here or the environment)."""
    path = os.path.join(run_dir, "run_config.json")
    saved = json.load(open(path)) if os.path.exists(path) else {}
    return (checkpoint_root(run_dir, saved.get("checkpoint_storage", "")),
            storage_options or saved.get("storage_options") or {})


def settled(run_dir: str, checkpoint_storage: str) -> str:
    """A run's checkpoint storage is chosen by its first train command: a later one may leave
    it out (and gets the run's), but not change it, or it would silently start over."""
    given = normalized(checkpoint_storage)
    path = os.path.join(run_dir, "run_config.json")
    if not os.path.exists(path):
        return given
    saved = json.load(open(path)).get("checkpoint_storage", "")
    if given and given != saved:
        keep = f"--checkpoint-storage {saved}" if saved else "no --checkpoint-storage"
        raise ConfigError(f"{run_dir} keeps its checkpoints in {checkpoint_root(run_dir, saved)}; pass {keep} or "
                          f"use a new --run-dir (a run's checkpoint storage cannot change)")
    return saved


class UnsafeKey(UserError):
    """An object whose key would land outside the folder it is copied into (one line, exit 2)."""


def check_key(url: str, name: str) -> str:
    """`name` (a path relative to `url`) if it stays inside `url`'s folder when joined into a
    local path. Object keys are free strings: `a/../../x`, `/etc/x` or `a\\b` are valid keys
    that os.path.join would take out of the folder, so they are refused before any join."""
    parts = name.split("/")
    why = ("it is absolute" if name.startswith("/") else
           "it has a backslash" if "\\" in name else
           "it has a '..', '.' or empty part" if any(p in ("", ".", "..") for p in parts) else
           "it has a control character" if any(ord(c) < 32 for c in name) else None)
    if why:
        raise UnsafeKey(f"refusing {join(url, name)!r}: {why}, so it would escape {url}; remove that object "
                        f"(nothing of the checkpoint was loaded or deleted)")
    return name


def listing(url: str, storage_options: dict | None) -> dict[str, int]:
    """Size of every file under `url`, by path relative to it ({} if there is none): one
    listing call on an object store instead of one request per file. A key that would escape
    `url` when joined into a local path is refused (check_key)."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)  # other processes (every rank, Ray Train) write here
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    prefix = path.rstrip("/") + "/"
    return {check_key(url, p[len(prefix):]): int(info["size"]) for p, info in found.items()
            if info["type"] == "file" and p.startswith(prefix)}


def inside(local_dir: str, name: str) -> str:
    """os.path.join(local_dir, name), refusing a name that leaves local_dir (a second guard
    behind check_key, for names that come from elsewhere than a listing)."""
    root = os.path.realpath(local_dir)
    target = os.path.realpath(os.path.join(root, check_key(local_dir, name)))
    if os.path.commonpath([root, target]) != root:
        raise UnsafeKey(f"refusing {name!r}: it resolves outside {local_dir}")
    return target


def download(url: str, local_dir: str, storage_options: dict | None, wanted: Callable[[str], bool]) -> None:
    """The files under `url` whose relative path `wanted` accepts, into `local_dir`, leaving
    out those already there with the right size (a retry, or what this process made)."""
    def have(name: str, size: int) -> bool:
        local = inside(local_dir, name)
        return os.path.exists(local) and os.path.getsize(local) == size

    fs, path = filesystem(url, storage_options)
    names = [n for n, size in listing(url, storage_options).items() if wanted(n) and not have(n, size)]
    targets = [inside(local_dir, n) for n in names]
    for t in targets:
        os.makedirs(os.path.dirname(t), exist_ok=True)
    if names:
        fs.get([join(path, n) for n in names], targets)


def upload(local_dir: str, url: str, storage_options: dict | None) -> dict[str, int]:
    """Every file of `local_dir` to `url`; returns their sizes by relative path."""
    fs, path = filesystem(url, storage_options)
    sizes = {os.path.relpath(os.path.join(root, n), local_dir): os.path.getsize(os.path.join(root, n))
             for root, _, names in os.walk(local_dir) for n in names}
    if sizes:
        fs.put([os.path.join(local_dir, n) for n in sizes], [join(path, n) for n in sizes])
    return sizes


@contextmanager
def local_copy(url: str, storage_options: dict | None, wanted: Callable[[str], bool], work: str | None = None):
    """Yields a local folder with the files of `url` that `wanted` accepts: `url` itself when
    it is local, else `work` (a node-local folder, a temporary one by default), removed after."""
    if is_local(url):
        yield filesystem(url, None)[1]
        return
    work = work or tempfile.mkdtemp(prefix="mmtrain-checkpoint-")
    try:
        download(url, work, storage_options, wanted)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
