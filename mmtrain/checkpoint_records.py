"""What a checkpoint's `done/` records say about its files, and checking files against them.

`done/rank_N` (written last by rank N) and `done/ds_universal` (written last by a universal
conversion) map every file of that part to its size and sha256, computed by us in the
staging folder right after the files were written:

    {"format": 2, "files": {"ds/mp_rank_00_model_states.pt": {"size": 1234, "sha256": "..."}, ...}}

Reading a checkpoint has three outcomes, kept apart on purpose:
- complete;
- incomplete, with a reason: a record or train_state.json is missing or unparseable, a file
  is missing or has another size than recorded (checked on the listing, cheap), or a file a
  rank is about to load has another hash (checked on the copy it loads). The run falls back
  to the previous complete checkpoint;
- unreadable (`CheckpointUnreadable`): any other error while reading (403, 503 after retries,
  NFS ESTALE). Nothing is known about the checkpoint, so the resume stops with one line and
  deletes nothing: an outage must never turn good checkpoints into abandoned ones.

Records of the first format (`{name: size}`, before hashes) still load, size-checked only:
refusing them would strand every run checkpointed before, and they are no weaker against a
writer of the storage than hashed ones, since a record sits beside the files it describes.
The hashes catch a file replaced or damaged after its record was written (a same-size copy
of another file, a bad disk, a sync tool), which sizes alone miss; they are not a signature.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

from pipelines.errors import UserError
from pipelines.retry import ReadRetriesExhausted, is_transient

from . import storage

FORMAT = 2
HASH = "sha256"  # OpenSSL's, about 1.2 GB/s per core here (blake2b: 0.9)

Record = dict[str, tuple[int, str | None]]  # file -> (size, sha256 or None in a size-only record)


class CheckpointUnreadable(UserError):
    """A checkpoint file could not be read for a reason other than its absence (one line,
    exit 2): the store or filesystem failed, so the checkpoint's state is unknown."""


def file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def record_of(local_dir: str, names: list[str] | None = None) -> dict:
    """The record of the files under `local_dir` (all of them, or `names`), hashed now."""
    if names is None:
        names = [os.path.relpath(os.path.join(root, n), local_dir) for root, _, files in os.walk(local_dir)
                 for n in files]
    return {"format": FORMAT, "files": {n: {"size": os.path.getsize(os.path.join(local_dir, n)),
                                            HASH: file_hash(os.path.join(local_dir, n))} for n in sorted(names)}}


def guarded(url: str, fn: Callable, *args):
    """fn(*args), with a failure of the store or filesystem (not a missing file) raised as
    CheckpointUnreadable naming `url`."""
    try:
        return fn(*args)
    except (FileNotFoundError, storage.UnsafeKey):
        raise
    except (OSError, ReadRetriesExhausted) as e:
        raise unreadable(url, e) from None
    except Exception as e:
        if is_transient(e):
            raise unreadable(url, e) from None
        raise


def read_bytes(directory: str, name: str, storage_options: dict | None) -> bytes | None:
    """The file's bytes, None if it does not exist; CheckpointUnreadable on any other error."""
    def cat() -> bytes:
        fs, path = storage.filesystem(directory, storage_options)
        return fs.cat_file(storage.join(path, name))

    try:
        return guarded(storage.join(directory, name), cat)
    except FileNotFoundError:
        return None


def guarded_listing(directory: str, storage_options: dict | None) -> dict[str, int]:
    return guarded(directory, storage.listing, directory, storage_options)


def unreadable(url: str, e: BaseException) -> CheckpointUnreadable:
    what = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
    return CheckpointUnreadable(f"cannot read {url} ({what}); the checkpoint may be fine, so nothing was "
                                f"deleted or skipped: re-run when the storage answers (check credentials, "
                                f"permissions and --storage-options)")


def parse_record(data: bytes, url: str) -> Record | None:
    """The record in `data` (either format), None if it is not one. Its names are checked
    (storage.check_key): they are joined into local paths."""
    try:
        raw = json.loads(data)
        if isinstance(raw, dict) and raw.get("format") == FORMAT:
            files = {n: (int(v["size"]), str(v[HASH])) for n, v in raw["files"].items()}
        elif isinstance(raw, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
            files = {n: (v, None) for n, v in raw.items()}
        else:
            return None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    for name in files:
        storage.check_key(url, name)
    return files


def read_record(directory: str, name: str, storage_options: dict | None) -> Record | None:
    """A record of the checkpoint, None if missing or unparseable."""
    data = read_bytes(directory, name, storage_options)
    return None if data is None else parse_record(data, directory)


def size_problem(files: dict[str, int], record: Record, who: str) -> str | None:
    for name, (size, _) in record.items():
        if name not in files:
            return f"{name} ({who}) is missing"
        if files[name] != size:
            return f"{name} ({who}) has {files[name]} bytes, {size} were written"
    return None


def all_records(directory: str, storage_options: dict | None) -> Record:
    """Every record under done/ (each rank's, the universal conversion's), merged."""
    merged: Record = {}
    for name in sorted(guarded_listing(storage.join(directory, "done"), storage_options)):
        merged.update(read_record(directory, f"done/{name}", storage_options) or {})
    return merged


def local_problem(local_dir: str, expected: Record, wanted: Callable[[str], bool], tags: tuple[str, ...]) -> str | None:
    """Why the local files a rank is about to load cannot be trusted, or None. Every file
    that `wanted` accepts, and every file in a DeepSpeed folder in `tags` (DeepSpeed finds
    some of its files by pattern), must be in a record; the wanted ones must match its size
    and hash. Files outside both are never read, so never hashed."""
    present = [os.path.relpath(os.path.join(root, n), local_dir) for root, _, names in os.walk(local_dir)
               for n in names]
    for name in present:
        if name.split("/", 1)[0] in tags and name not in expected:
            return f"{name} is not in any done record (not written by this run's save)"
    for name in sorted(present):
        if not wanted(name):
            continue
        if name not in expected:
            return f"{name} is not in any done record (not written by this run's save)"
        size, digest = expected[name]
        path = storage.inside(local_dir, name)
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} were written"
        if digest is not None and file_hash(path) != digest:
            return f"{name} does not match the {HASH} it was written with"
    missing = sorted(n for n in expected if wanted(n) and n not in present)
    return f"{missing[0]} is missing" if missing else None
