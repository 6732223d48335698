"""Read WebDataset tar shards as a stream of samples, keeping every error with its sample.

Why not `webdataset.tar_file_iterator` or `ray.data.read_webdataset`: both stop silently
at a truncated or corrupt tar (Python's `tarfile` ends iteration without an exception
on a bad header or a missing end-of-archive block), both pass names like `../x` through
as keys, and neither says which sample a failure belongs to. We keep webdataset's
key/extension rule (`base_plus_ext`) so keys mean the same thing everywhere, and add:
damage detection, name safety, duplicate keys, gzip members, per-sample error records.

A shard is read as a stream (`tarfile` mode "r|" or "r|gz", gzip detected from the
bytes): only one sample's members are held at a time, and what a shard can make the reader
hold or do is bounded by `ReadLimits` (from `DataConfig`), each limit checked on a header's
size fields before anything is read (headers themselves: `tarheaders.py`). Nothing in a
shard's bytes raises: whatever `tarfile` raises on them becomes a record against the
sample or the shard.
"""
from __future__ import annotations

import hashlib
import re
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from . import reasons
from .config import AUDIO_EXTS, IMAGE_EXTS, TEXT_EXTS
from .reasons import SampleError, SampleFiltered
from .retry import NOT_FOUND, StoreError, open_retrying, store_error_kind
from .storage import filesystem
from .tarheaders import GuardedTarInfo, ReadLimits, ShardDamage, printable, quoted, unsafe_reason


# webdataset's key/extension rule (`webdataset.tariterators.base_plus_ext`, the same regex as
# in webdataset 1.0): the key is everything before the first dot of the last path part. A copy
# rather than an import: importing anything from `webdataset` imports torch, which would add its
# start-up time and memory to every Ray worker that reads shards, for one regex.
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def base_plus_ext(path: str) -> tuple[str, str] | tuple[None, None]:
    """("dir/k1.mel.npy") -> ("dir/k1", "mel.npy"); (None, None) without an extension."""
    match = _BASE_PLUS_EXT.match(path)
    if not match:
        return None, None
    return match.group(1), match.group(2)


def gzip_member_ext(ext: str) -> tuple[str, bool]:
    """("txt.gz") -> ("txt", True): a member KEY.EXT.gz is KEY.EXT gzip-compressed, inflated on read."""
    gz = ext == "gz" or ext.endswith(".gz")
    return (ext[:-3].rstrip(".") if gz else ext), gz


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


_CHUNK = 1 << 20  # member data is read, inflated and skipped in pieces of this size
# what `tarfile`'s "r|*" would decompress besides gzip (its own magic checks): shards are
# plain or gzip tars, and these formats have no bound on what one read call inflates to
_OTHER_COMPRESSION = ((b"BZh", b"1AY&SY", "bzip2"), (b"\xfd7zXZ", b"", "xz"), (b"\x5d\x00\x00\x80", b"", "lzma"),
                      (b"\x28\xb5\x2f\xfd", b"", "zstd"))
_GZIP_NAME_MAX = 4096  # a .tar.gz header's file name or comment, NUL included
_GZIP_HEADER_PEEK = 12 + 65535 + 2 * _GZIP_NAME_MAX  # fixed part, FEXTRA, file name, comment


def iter_tar_samples(
    url: str,
    *,
    storage_options: dict | None = None,
    limits: ReadLimits | None = None,
) -> Iterator[RawSample]:
    """Every sample of one shard, in order; errors come as samples with `error` set.

    A damaged shard yields every sample completed before the damage, then one record
    with the damage (`TRUNCATED_SHARD`, or `TAR_HEADER_TOO_LARGE` for an extended header
    over its limits) for the sample that was being read (or for the shard). Nothing in a
    shard's bytes raises: `limits` (default: `DataConfig()`'s) bound what it can make the
    reader hold or do.

    Transient store faults (throttling, a connection dropped mid-body) are retried under
    the reader, resuming at the same byte, so they change nothing in what is yielded (see
    `retry.py`). If the store keeps failing or refuses access, `retry.StoreError` is raised:
    that is the job's problem, never recorded as a damaged shard or an unreadable sample.
    """
    try:
        fs, path = filesystem(url, storage_options)
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
        yield from _iter_stream(f, url, limits)


def _iter_stream(fileobj, url: str, limits: ReadLimits | None = None) -> Iterator[RawSample]:
    return _ShardReader(fileobj, url, limits or ReadLimits.from_config()).samples()


class _SourceFile:
    """The shard's bytes on their way to tarfile. The first bytes can be looked at before
    tarfile sees them (to choose the decompressor), and an exception of the store is kept:
    it is the job's problem, re-raised as it is, never taken for damage in the shard."""

    def __init__(self, f):
        self._f, self._head, self.error = f, b"", None

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            chunk = self._read(n - len(self._head))
            if not chunk:
                break
            self._head += chunk
        return self._head[:n]

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._read(n)
        cut = len(self._head) if n is None or n < 0 else n
        data, self._head = self._head[:cut], self._head[cut:]
        return data

    def _read(self, n: int) -> bytes:
        try:
            return self._f.read(n)
        except Exception as e:
            self.error = e
            raise


class _ShardReader:
    """One pass over one shard: groups members into samples, checks every limit before it
    reads, and turns whatever the tar stream makes `tarfile` raise into a record."""

    def __init__(self, fileobj, url: str, limits: ReadLimits):
        self.source, self.url, self.limits = _SourceFile(fileobj), url, limits
        self.position = 0           # records yielded so far
        self.count = 0              # members of the current sample
        self.seen: set[bytes] = set()  # digests of the keys so far: 16 bytes each, whatever a key's length

    def samples(self) -> Iterator[RawSample]:
        current: RawSample | None = None
        try:
            tf = self._open()
            while (info := self._next(tf)) is not None:
                problem = None if info.isdir() else unsafe_reason(info, self.limits)
                key, ext = (None, None) if info.isdir() or problem else base_plus_ext(info.name)
                if problem or (key is None and not info.isdir()):
                    if current is not None:
                        yield current
                        current = None
                    error = SampleError(reasons.UNSAFE_MEMBER_NAME, problem) if problem else SampleError(
                        reasons.MEMBER_WITHOUT_EXTENSION, f"{quoted(info.name)} has no extension")
                    shown = printable(info.name)
                    record = self._new(shown, error)
                    record.names.append(shown)
                    yield record
                elif key is not None:
                    if current is None or key != current.key:
                        if current is not None:
                            yield current
                        current = self._start(key)
                    self.count += 1
                    if self.count <= self.limits.sample_members + 1:  # the names of a huge sample stay few
                        current.names.append(info.name)
                    if current.error is None:  # once rejected, a sample's members are skipped unread
                        current.error = self._read_member(tf, info, current, ext.lower())
                self._skip_to_next_header(tf)
            self._check_end(tf)
        except ShardDamage as e:
            detail = e.detail if e.reason == reasons.SHARD_UNREADABLE else \
                f"damaged after {self.position} record(s): {e.detail}"
            if current is not None:
                current.error = SampleError(e.reason, detail)
                yield current
            else:
                yield self._new("", SampleError(e.reason, detail))
            return
        if current is not None:
            yield current

    def _new(self, key: str, error: SampleError | None = None) -> RawSample:
        sample = RawSample(key, self.url, self.position, error=error)
        self.position += 1
        return sample

    def _start(self, key: str) -> RawSample:
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
        dup = SampleError(reasons.DUPLICATE_KEY, f"key {key!r} appears again later in the shard") \
            if digest in self.seen else None
        self.seen.add(digest)
        self.count = 0
        return self._new(key, dup)

    @contextmanager
    def _tar_errors(self):
        """Whatever tarfile raises on the shard's bytes is damage in the shard (a header
        parse gone wrong, a short read, bad compressed data, a RecursionError, a
        MemoryError...); the store's own exceptions go to the job unchanged."""
        try:
            yield
        except ShardDamage:
            raise
        except Exception as e:
            if self.source.error is not None:
                raise self.source.error
            if isinstance(e, StoreError):  # refused or down: the job's error, never the shard's
                raise
            too_large = isinstance(e, (RecursionError, MemoryError))
            raise ShardDamage(reasons.TAR_HEADER_TOO_LARGE if too_large else reasons.TRUNCATED_SHARD,
                              _one_line(e)) from e

    def _open(self) -> tarfile.TarFile:
        with self._tar_errors():
            head = self.source.peek(10)
            for magic, at4, name in _OTHER_COMPRESSION:
                if head.startswith(magic) and head[4:4 + len(at4)] == at4:
                    raise ShardDamage(reasons.SHARD_UNREADABLE,
                                      f"{name}-compressed: a shard is a tar file, plain or gzip-compressed")
            gz = head.startswith(b"\x1f\x8b")
            if gz:
                _check_gzip_header(self.source.peek(_GZIP_HEADER_PEEK))
            # encoding fixed (not the worker's locale): a name that is not UTF-8 arrives
            # surrogate-escaped and is refused by name
            return tarfile.open(fileobj=self.source, mode="r|gz" if gz else "r|",
                                tarinfo=GuardedTarInfo.with_limits(self.limits),
                                encoding="utf-8", errors="surrogateescape")

    def _next(self, tf: tarfile.TarFile) -> tarfile.TarInfo | None:
        with self._tar_errors():
            info = tf.next()
        tf.members.clear()  # streaming mode would otherwise keep every header in memory
        if info is not None and info.size < 0:
            raise ShardDamage(reasons.TRUNCATED_SHARD, f"header at byte {info.offset} has a negative size")
        return info

    def _skip_to_next_header(self, tf: tarfile.TarFile) -> None:
        """Advance to the next header in pieces, stopping at the end of the stream.

        tarfile's own skip (`_Stream.seek`) loops once per 10 KiB up to the offset that the
        size field claims, even past the end of the data: a size of 2**80 would never end."""
        with self._tar_errors():
            remaining = tf.offset - tf.fileobj.tell()
            while remaining > 0:
                chunk = tf.fileobj.read(min(remaining, _CHUNK))
                if not chunk:
                    raise tarfile.ReadError("unexpected end of data")
                remaining -= len(chunk)

    def _check_end(self, tf: tarfile.TarFile) -> None:
        """A shard ends at an all-zero block followed by nothing but zeros. tarfile stops at
        the first all-zero block: samples behind a zero-filled block mid-shard, or in a second
        tar appended to the first, would be lost without a word."""
        stop = getattr(tf, "stop_reason", None)
        if stop is not None:
            raise ShardDamage(reasons.TRUNCATED_SHARD, f"tar stream ends without an end-of-archive block ({stop})")
        with self._tar_errors():
            at = tf.fileobj.tell()
            while chunk := tf.fileobj.read(_CHUNK):
                if chunk.count(0) != len(chunk):
                    raise ShardDamage(reasons.TRUNCATED_SHARD,
                                      f"data after the end-of-archive block at byte {at} is not read "
                                      "(a zero-filled block mid-shard, or tars concatenated)")
                at += len(chunk)

    def _read_member(self, tf: tarfile.TarFile, info: tarfile.TarInfo, sample: RawSample,
                     ext: str) -> SampleError | None:
        """Read one member into `sample.members`, or say why not. Every limit is checked on
        the header's size before reading; a gzip member is inflated to at most its limit + 1
        bytes, in pieces, whatever it would inflate to."""
        lim, name = self.limits, quoted(info.name)
        ext, gz = gzip_member_ext(ext)
        if self.count > lim.sample_members:
            return SampleError(reasons.SAMPLE_TOO_LARGE,
                               f"more than {lim.sample_members} members (data.max_sample_members)")
        if ext in sample.members:
            return SampleError(reasons.DUPLICATE_KEY, f"{sample.key}.{ext} appears twice")
        if info.size > lim.member_bytes:
            return SampleError(reasons.MEMBER_TOO_LARGE,
                               f"{name} is {info.size} bytes > {lim.member_bytes} (data.max_member_bytes)")
        held = sum(len(v) for v in sample.members.values())
        caps = [(lim.member_bytes, reasons.MEMBER_TOO_LARGE, "data.max_member_bytes")]
        if ext in TEXT_EXTS:
            caps.append((lim.text_bytes, reasons.CAPTION_TOO_LONG, "data.text.max_bytes"))
        caps.append((lim.sample_bytes - held, reasons.SAMPLE_TOO_LARGE, "data.max_sample_bytes"))
        cap, reason, setting = min(caps, key=lambda c: c[0])  # the first of equal caps: member, text, sample
        if not gz and info.size > cap:
            return _too_large(reason, f"{name} is {info.size} bytes", cap, lim, setting)
        with self._tar_errors(), tf.extractfile(info) as f:
            if not gz:
                data = f.read(info.size)
            else:
                try:
                    data = _inflate(f, cap)
                except (OSError, EOFError, zlib.error) as e:
                    if self.source.error is not None:
                        raise
                    return SampleError(reasons.MEMBER_DECOMPRESS_ERROR, f"{name}: {_one_line(e)}")
                if data is None:
                    return _too_large(reason, f"{name} inflates to", cap, lim, setting)
        sample.members[ext] = data
        return None


def _check_gzip_header(head: bytes) -> None:
    """tarfile reads a .tar.gz's gzip header file name and comment one byte per call, each
    call copying its 10 KiB buffer, so a long name costs CPU in proportion to its length times
    that buffer. Refuse a name or comment over `_GZIP_NAME_MAX` bytes (RFC 1952 layout; gzip
    writes a file name)."""
    if len(head) < 12:
        return  # too short to be anything: tarfile says so
    flags, end = head[3], 10
    if flags & 4:  # FEXTRA: a length, then that many bytes
        end += 2 + int.from_bytes(head[10:12], "little")
    for flag in (8, 16):  # FNAME, FCOMMENT: NUL-terminated
        if flags & flag:
            nul = head.find(b"\0", end, end + _GZIP_NAME_MAX)
            if nul < 0:
                raise ShardDamage(reasons.TAR_HEADER_TOO_LARGE,
                                  f"the gzip header's file name or comment is over {_GZIP_NAME_MAX} bytes")
            end = nul + 1


def _too_large(reason: str, what: str, cap: int, lim: ReadLimits, setting: str) -> SampleError:
    if reason == reasons.SAMPLE_TOO_LARGE:
        return SampleError(reason, f"{what} > the {cap} bytes left of {lim.sample_bytes} per sample ({setting})")
    cls = SampleFiltered if reason == reasons.CAPTION_TOO_LONG else SampleError
    return cls(reason, f"{what} > {cap} bytes ({setting})")


def _inflate(f, limit: int) -> bytes | None:
    """The content of a gzip member (gzip streams in a row, zero padding between them, are one
    content, as for `gzip.decompress`), or None if it is over `limit` bytes. At most
    limit + 1 bytes are inflated, 1 MiB per call at most. zlib parses the
    gzip header itself: `gzip.GzipFile` reads a header's file name one Python call per byte."""
    parts, n = [], 0
    d, pending, fresh, streams = zlib.decompressobj(31), b"", True, 0
    while n <= limit:
        if not pending:
            pending = f.read(_CHUNK)
            if not pending:
                if not fresh:
                    raise EOFError("the data ends inside a gzip stream")
                return b"".join(parts)
        if fresh and streams:
            pending = pending.lstrip(b"\0")
            if not pending:
                continue
        fresh = False
        piece = d.decompress(pending, min(_CHUNK, limit + 1 - n))
        parts.append(piece)
        n += len(piece)
        pending = d.unconsumed_tail
        if d.eof:
            pending = d.unused_data + pending
            d, fresh, streams = zlib.decompressobj(31), True, streams + 1
    return None


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:300]


# modality column -> member extensions, in order of preference
RAW_MODALITIES: dict[str, tuple[str, ...]] = {"image": IMAGE_EXTS, "text": TEXT_EXTS, "audio": AUDIO_EXTS}


def split_modalities(
    members: dict[str, bytes], modalities: dict[str, tuple[str, ...]]
) -> tuple[dict[str, tuple[str, bytes]], list[tuple[str, bytes]]]:
    """Pick each modality's member (first extension by preference); the rest are extras
    (which of them travel into clean output is `DataConfig.extra_exts`' business)."""
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
