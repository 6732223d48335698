"""Read WebDataset tar shards as a stream of samples, keeping every error with its sample.

Why not `webdataset.tar_file_iterator` or `ray.data.read_webdataset`: both stop silently
at a truncated or corrupt tar (Python's `tarfile` ends iteration without an exception
on a bad header or a missing end-of-archive block), both pass names like `../x` through
as keys, and neither says which sample a failure belongs to. We keep webdataset's
key/extension rule (`base_plus_ext`) so keys mean the same thing everywhere, and add:
damage detection, name safety, duplicate keys, gzip members, per-sample error records.

A shard is read as a stream (`tarfile` mode "r|*", gzip detected from the bytes): only
one sample's members are held at a time.
"""
from __future__ import annotations

import gzip
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import fsspec

from . import reasons
from .config import AUDIO_EXTS, IMAGE_EXTS, TEXT_EXTS
from .reasons import SampleError
from .retry import NOT_FOUND, open_retrying, store_error_kind, with_retry_defaults


# webdataset's key/extension rule (`webdataset.tariterators.base_plus_ext`, the same regex as
# in webdataset 1.0): the key is everything before the first dot of the last path part. A copy
# rather than an import: importing anything from `webdataset` imports torch, ~1.3 s of start-up
# and ~130 MB in every Ray worker that reads shards, for one regex.
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def base_plus_ext(path: str) -> tuple[str, str] | tuple[None, None]:
    """("dir/k1.mel.npy") -> ("dir/k1", "mel.npy"); (None, None) without an extension."""
    match = _BASE_PLUS_EXT.match(path)
    if not match:
        return None, None
    return match.group(1), match.group(2)


@dataclass
class RawSample:
    """One sample as found in a shard: members keyed by lowercased extension.

    `position` counts records in the shard (0, 1, ...) so that "which came first" has a
    deterministic answer (duplicate handling, data position on resume).
    """

    key: str
    source: str
    position: int
    members: dict[str, bytes] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # member names as stored, for the record
    error: SampleError | None = None


class _RecordingTarInfo(tarfile.TarInfo):
    """Remembers why `tarfile` stopped: only an all-zero block (`EOFHeaderError`) is a
    normal end.

    `TarFile.next()` swallows a bad checksum, a short header and a missing end-of-archive
    block (`EmptyHeaderError`: no bytes at all) and just ends the iteration; this subclass
    keeps the reason on the TarFile.
    """

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            tf._stop_reason = f"{type(e).__name__}: {e}"  # type: ignore[attr-defined]
            raise


def unsafe_reason(info: tarfile.TarInfo) -> str | None:
    """Why a member must not be used, or None. Anything that could point outside the
    sample (links, devices, absolute or parent paths) is refused, never resolved."""
    name = info.name
    if not info.isreg():
        return f"{name!r} is not a regular file (type {info.type!r})"
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return f"{name!r} is an absolute or non-POSIX path"
    parts = name.split("/")
    if ".." in parts or any(p == "" for p in parts[:-1]):
        return f"{name!r} climbs out of the shard or has an empty path part"
    if posixpath.normpath(name) != name:
        return f"{name!r} is not a normalized path"
    return None


def iter_tar_samples(
    url: str,
    *,
    storage_options: dict | None = None,
    max_member_bytes: int = 256 * 1024 * 1024,
) -> Iterator[RawSample]:
    """Every sample of one shard, in order; errors come as samples with `error` set.

    A damaged shard yields every sample completed before the damage, then one record
    with `TRUNCATED_SHARD` for the sample that was being read (or for the shard).

    Transient store faults (throttling, a connection dropped mid-body) are retried under
    the reader, resuming at the same byte, so they change nothing in what is yielded (see
    `retry.py`). If the store keeps failing, `ReadRetriesExhausted` is raised: an outage is
    the job's problem, never recorded as a damaged shard or an unreadable sample.
    """
    try:
        fs, path = fsspec.core.url_to_fs(url, **with_retry_defaults(url, storage_options))
        f = open_retrying(fs, path, name=url)
    except Exception as e:
        # only "not found" is this shard's problem; a refused credential or a store that stays
        # down is the job's (a StoreError, one line), and anything else is a bug: both propagate,
        # so nothing is recorded against the shard and a re-run reads it
        if store_error_kind(e) != NOT_FOUND:
            raise
        yield RawSample("", url, 0, error=SampleError(reasons.SHARD_UNREADABLE, _one_line(e)))
        return
    with f:
        yield from _iter_stream(f, url, max_member_bytes)


def _iter_stream(fileobj, url: str, max_member_bytes: int) -> Iterator[RawSample]:
    seen: set[str] = set()
    current: RawSample | None = None
    position = 0

    def new_sample(key: str, error: SampleError | None = None) -> RawSample:
        nonlocal position
        sample = RawSample(key, url, position, error=error)
        position += 1
        return sample

    try:
        tf = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_RecordingTarInfo)
        tf._stop_reason = None  # type: ignore[attr-defined]
        for info in tf:
            tf.members = []  # streaming mode would otherwise keep every header in memory
            if info.isdir():
                continue
            problem = unsafe_reason(info)
            if problem:
                if current is not None:
                    yield current
                    current = None
                refused = new_sample(info.name, SampleError(reasons.UNSAFE_MEMBER_NAME, problem))
                refused.names.append(info.name)
                yield refused
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                if current is not None:
                    yield current
                    current = None
                bad = new_sample(info.name, SampleError(
                    reasons.MEMBER_WITHOUT_EXTENSION, f"{info.name!r} has no extension"))
                bad.names.append(info.name)
                yield bad
                continue
            ext = ext.lower()
            if current is None or key != current.key:
                if current is not None:
                    yield current
                dup = None
                if key in seen:
                    dup = SampleError(reasons.DUPLICATE_KEY, f"key {key!r} appears again later in the shard")
                seen.add(key)
                current = new_sample(key, dup)
            current.names.append(info.name)
            if current.error is not None:
                continue  # the sample is already rejected: don't spend time reading it
            if info.size > max_member_bytes:
                current.error = SampleError(
                    reasons.MEMBER_TOO_LARGE, f"{info.name!r} is {info.size} bytes > {max_member_bytes}")
                continue
            data = tf.extractfile(info).read()
            if ext == "gz" or ext.endswith(".gz"):
                ext = ext[:-3].rstrip(".")
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError, zlib.error) as e:
                    current.error = SampleError(reasons.MEMBER_DECOMPRESS_ERROR, f"{info.name!r}: {_one_line(e)}")
                    continue
            if ext in current.members:
                current.error = SampleError(reasons.DUPLICATE_KEY, f"{key}.{ext} appears twice")
                continue
            current.members[ext] = data
        stop = getattr(tf, "_stop_reason", None)
        if stop is not None:
            raise tarfile.ReadError(f"tar stream ends without an end-of-archive block ({stop})")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        detail = f"damaged after {position} record(s): {_one_line(e)}"
        if current is not None:
            current.error = SampleError(reasons.TRUNCATED_SHARD, detail)
            yield current
        else:
            yield new_sample("", SampleError(reasons.TRUNCATED_SHARD, detail))
        return
    if current is not None:
        yield current


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:300]


# modality column -> member extensions, in order of preference
RAW_MODALITIES: dict[str, tuple[str, ...]] = {"image": IMAGE_EXTS, "text": TEXT_EXTS, "audio": AUDIO_EXTS}


def split_modalities(
    members: dict[str, bytes], modalities: dict[str, tuple[str, ...]]
) -> tuple[dict[str, tuple[str, bytes]], list[tuple[str, bytes]]]:
    """Pick each modality's member (first extension by preference); the rest are extras,
    which are carried along, never dropped."""
    chosen: dict[str, tuple[str, bytes]] = {}
    used: set[str] = set()
    for name, exts in modalities.items():
        for ext in exts:
            if ext in members:
                chosen[name] = (ext, members[ext])
                used.add(ext)
                break
    extras = [(ext, data) for ext, data in members.items() if ext not in used]
    return chosen, extras
