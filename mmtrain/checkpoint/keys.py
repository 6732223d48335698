"""Object keys that are safe to join into a local path. Keys are free strings in an object
store: `a/../../x`, `/etc/x` or `a\\b` are valid keys that os.path.join would take out of the
folder a checkpoint is copied into, so every name from a listing or a record passes here first."""
from __future__ import annotations

import os

from pipelines.storage import join

from .errors import UnsafeKey


def check_key(url: str, name: str) -> str:
    """`name` (a path relative to `url`) if it stays inside `url`'s folder when joined into a
    local path; UnsafeKey otherwise, before any join."""
    parts = name.split("/")
    why = ("it is absolute" if name.startswith("/") else
           "it has a backslash" if "\\" in name else
           "it has a '..', '.' or empty part" if any(p in ("", ".", "..") for p in parts) else
           "it has a control character" if any(ord(c) < 32 for c in name) else None)
    if why:
        raise UnsafeKey(f"refusing {join(url, name)!r}: {why}, so it would escape {url}; remove that object "
                        f"(nothing of the checkpoint was loaded or deleted)")
    return name


def inside(local_dir: str, name: str) -> str:
    """os.path.join(local_dir, name), refusing a name that leaves local_dir (a second guard
    behind check_key, for names that come from elsewhere than a listing)."""
    root = os.path.realpath(local_dir)
    target = os.path.realpath(os.path.join(root, check_key(local_dir, name)))
    if os.path.commonpath([root, target]) != root:
        raise UnsafeKey(f"refusing {name!r}: it resolves outside {local_dir}")
    return target
