"""Turn what the user typed (files, folders, globs, brace patterns, URLs) into shard URLs.

Listing goes through `storage.filesystem` (fsspec) so that local disk, s3://, gs:// and
http(s):// behave the same; brace patterns (`shard-{000000..000099}.tar`) are expanded with
`braceexpand`, the same package webdataset uses, before any filesystem is asked.
"""
from __future__ import annotations

from typing import Iterable

from braceexpand import braceexpand

from .errors import UserError
from .retry import NOT_FOUND, store_error_kind, store_failure
from .storage import canonical_url, filesystem, protocol_of

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = "*?["
# http(s) has no listing API worth trusting: a URL there is taken as one shard.
_UNLISTABLE = {"http", "https"}


class ShardListError(UserError):
    """The inputs name no shard, or name something that does not exist."""


def _listing(pattern: str, call):
    """`call()`, a listing or a lookup of `pattern`: "not found" is the user's error (one line);
    a refused credential or a store that stays down is a `StoreError` (one line); the rest
    (bugs) keeps its traceback."""
    try:
        return call()
    except Exception as e:
        kind = store_error_kind(e)
        if kind == NOT_FOUND:
            raise ShardListError(f"no such shard or folder: {pattern}") from None
        if kind is None:
            raise
        raise store_failure(e, f"cannot list {pattern}") from None


def is_shard_name(path: str) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    return name.endswith(SHARD_SUFFIXES) and not name.startswith((".", "_"))


def expand_shards(inputs: Iterable[str], storage_options: dict | None = None) -> list[str]:
    """Every shard the inputs name (by `storage.canonical_url`), sorted and without repeats.

    A folder contributes the shard files below it (recursively, skipping names that start
    with `_` or `.`, which is where our own outputs keep manifests and temporary files).
    """
    storage_options = storage_options or {}
    found: set[str] = set()
    for raw in inputs:
        if not raw:
            raise ShardListError("an empty string was given as an input path")
        for pattern in braceexpand(raw):
            found.update(_expand_one(pattern, storage_options))
    if not found:
        raise ShardListError(
            f"no shards (.tar, .tar.gz, .tgz) found in {', '.join(map(str, inputs))}"
        )
    return sorted(found)


def _expand_one(pattern: str, storage_options: dict) -> list[str]:
    fs, path = filesystem(pattern, storage_options)
    if protocol_of(fs) in _UNLISTABLE:
        return [pattern]
    if any(c in path for c in _GLOB_CHARS):
        matches = [p for p in _listing(pattern, lambda: fs.glob(path)) if is_shard_name(p)]
        if not matches:
            raise ShardListError(f"the pattern {pattern} matches no shard")
        return [canonical_url(fs, p) for p in matches]
    if _listing(pattern, lambda: fs.isdir(path)):
        shards = [p for p in _listing(pattern, lambda: fs.find(path)) if is_shard_name(p)]
        if not shards:
            raise ShardListError(f"the folder {pattern} holds no shard (.tar, .tar.gz, .tgz)")
        return [canonical_url(fs, p) for p in shards]
    if not _listing(pattern, lambda: fs.exists(path)):
        raise ShardListError(f"no such shard: {pattern}")
    if not path.lower().endswith(SHARD_SUFFIXES):
        raise ShardListError(f"{pattern} is not a shard (expected .tar, .tar.gz or .tgz)")
    return [canonical_url(fs, path)]


def shard_sizes(urls: list[str], storage_options: dict | None = None) -> dict[str, int | None]:
    """Byte sizes where the filesystem can tell cheaply (used for estimates, never trusted)."""
    sizes: dict[str, int | None] = {}
    for url in urls:
        try:
            fs, path = filesystem(url, storage_options)
            sizes[url] = int(fs.size(path))
        except Exception:  # an estimate only: a missing size must not fail the listing
            sizes[url] = None
    return sizes
