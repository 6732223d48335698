"""Where a run's checkpoints live: in the run directory (the default) or under any fsspec URL
(`s3://`, `gs://`, ...) given as `checkpoint_storage`, reached with the run's storage options.

Ray Train writes there through a pyarrow filesystem wrapping the same fsspec filesystem, so
its uploads and our reads (completeness checks, restore, export) agree on credentials,
endpoint and retries. The rest of the run (metrics, tokenizer, audit) stays in the run
directory, which every node must see.
"""
from __future__ import annotations

import json
import os

from pipelines.errors import ConfigError
from pipelines.storage import filesystem, is_local, join

from .store import CheckpointStore

STORAGE_NAME = "train"  # Ray Train's run folder inside the checkpoint storage


def normalized(checkpoint_storage: str) -> str:
    """An absolute local path (workers run in other directories) or the URL as given."""
    if not checkpoint_storage:
        return ""
    if is_local(checkpoint_storage):
        return filesystem(checkpoint_storage)[1]
    return checkpoint_storage.rstrip("/")


def base(run_dir: str, checkpoint_storage: str = "") -> str:
    """Ray Train's storage path: the run directory unless the run names other storage."""
    return normalized(checkpoint_storage) or os.path.abspath(run_dir)


def checkpoint_root(run_dir: str, checkpoint_storage: str = "") -> str:
    """The folder (path or URL) that holds the run's checkpoint_NNNNNNNNN folders."""
    return join(base(run_dir, checkpoint_storage), STORAGE_NAME)


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


def run_store(run_dir: str, storage_options: dict | None = None) -> CheckpointStore:
    """The checkpoint store of a finished or running run, from its RUN/run_config.json: options
    given here win over the ones the run was trained with (saved without credentials: those
    come from here or the environment)."""
    saved = _saved_config(run_dir)
    return CheckpointStore(checkpoint_root(run_dir, saved.get("checkpoint_storage", "")),
                           storage_options or saved.get("storage_options") or {})


def settled(run_dir: str, checkpoint_storage: str) -> str:
    """A run's checkpoint storage is chosen by its first train command: a later one may leave
    it out (and gets the run's), but not change it, or it would silently start over."""
    given = normalized(checkpoint_storage)
    if not os.path.exists(os.path.join(run_dir, "run_config.json")):
        return given
    saved = _saved_config(run_dir).get("checkpoint_storage", "")
    if given and given != saved:
        keep = f"--checkpoint-storage {saved}" if saved else "no --checkpoint-storage"
        raise ConfigError(f"{run_dir} keeps its checkpoints in {checkpoint_root(run_dir, saved)}; pass {keep} or "
                          f"use a new --run-dir (a run's checkpoint storage cannot change)")
    return saved


def _saved_config(run_dir: str) -> dict:
    """RUN/run_config.json ({} if there is none yet); a damaged one is the user's to fix."""
    path = os.path.join(run_dir, "run_config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it or use a new --run-dir") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} must hold a JSON object; restore it or use a new --run-dir")
    return saved
