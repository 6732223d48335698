"""What a checkpoint's `done/` records say about its files, and checking files against them.

`done/rank_N` (written last by rank N) and `done/ds_universal` (written last by a universal
conversion) map every file of that part to its size and sha256, computed by us in the
staging folder right after the files were written:

    {"format": 2, "files": {"ds/mp_rank_00_model_states.pt": {"size": 1234, "sha256": "..."}, ...}}

A checkpoint is incomplete when a record is missing or unparseable, a file is missing or has
another size than recorded (checked on a listing, cheap: `size_problem`), or a file a rank is
about to load has another hash (checked on the copy it loads: `local_problem`).

Records of the first format (`{name: size}`, without hashes) still load, size-checked only:
refusing them would strand every run checkpointed before hashes, and they are no weaker against
a writer of the storage than hashed ones, since a record sits beside the files it describes.
The hashes catch a file replaced or damaged after its record was written (a same-size copy
of another file, a bad disk, a sync tool), which sizes alone miss; they are not a signature.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

from .keys import check_key, inside

FORMAT = 2
HASH = "sha256"  # hashlib runs it through OpenSSL: faster than blake2b on CPUs with SHA instructions

Record = dict[str, tuple[int, str | None]]  # file -> (size, sha256 or None in a size-only record)


def file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def local_files(local_dir: str) -> list[str]:
    """Every file under `local_dir`, by path relative to it."""
    return [os.path.relpath(os.path.join(root, n), local_dir) for root, _, names in os.walk(local_dir)
            for n in names]


def record_of(local_dir: str, names: list[str] | None = None) -> dict:
    """The record of the files under `local_dir` (all of them, or `names`), hashed now."""
    names = local_files(local_dir) if names is None else names
    return {"format": FORMAT, "files": {n: {"size": os.path.getsize(os.path.join(local_dir, n)),
                                            HASH: file_hash(os.path.join(local_dir, n))} for n in sorted(names)}}


def parse_record(data: bytes, url: str) -> Record | None:
    """The record in `data` (either format), None if it is not one. Its names are checked
    (keys.check_key): they are joined into local paths."""
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
        check_key(url, name)
    return files


def size_problem(files: dict[str, int], record: Record, who: str) -> str | None:
    """Why the listed sizes (`files`) disagree with `record`, or None."""
    for name, (size, _) in record.items():
        if name not in files:
            return f"{name} ({who}) is missing"
        if files[name] != size:
            return f"{name} ({who}) has {files[name]} bytes, {size} were written"
    return None


def local_problem(local_dir: str, expected: Record, wanted: Callable[[str], bool], tags: tuple[str, ...]) -> str | None:
    """Why the local files a rank is about to load cannot be trusted, or None. Every file
    that `wanted` accepts, and every file in a DeepSpeed folder in `tags` (DeepSpeed finds
    some of its files by pattern), must be in a record; the wanted ones must match its size
    and hash. Files outside both are never read, so never hashed."""
    present = local_files(local_dir)
    for name in present:
        if name.split("/", 1)[0] in tags and name not in expected:
            return f"{name} is not in any done record (not written by this run's save)"
    for name in sorted(present):
        if not wanted(name):
            continue
        if name not in expected:
            return f"{name} is not in any done record (not written by this run's save)"
        size, digest = expected[name]
        path = inside(local_dir, name)
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} were written"
        if digest is not None and file_hash(path) != digest:
            return f"{name} does not match the {HASH} it was written with"
    missing = sorted(n for n in expected if wanted(n) and n not in present)
    return f"{missing[0]} is missing" if missing else None
