"""Storage, for both planes: how a URL and options become a filesystem, and an output
location with all-or-nothing writes.

`filesystem(url, options)` is the one way into fsspec: it adds our retry defaults (see
`retry.with_retry_defaults`), and `protocol_of`, `is_local`, `join` and `canonical_url` are the
one spelling of what a URL is. Nothing else in the project calls `fsspec.core.url_to_fs`.
`listing(url, options)` and `files_below(fs, path)` are the one way to see what a location
holds (sizes by relative name), always fresh: other processes write where we list.

`OutputStore` is an output location (local folder or object-store prefix).
Local disk: write `NAME.tmp-<tag>-<uuid>`, fsync, rename. The rename is atomic, so a reader
(or a re-run) sees either nothing or the whole file; a kill leaves only `*.tmp-*` files,
which `remove_temporaries(tag)` deletes on the next run. The tag names the job (the
preprocess job's fingerprint), so a job deletes its own temporaries only, never those of
another job writing beside or below it.

Object stores (s3://, gs://): a PUT or a completed multipart upload is atomic by itself,
so we write the final name directly and, on an exception, `discard()` the upload instead
of closing it (fsspec's `__exit__` would otherwise complete a half-written object). A
killed process leaves at most an incomplete multipart upload, which is invisible (a
bucket lifecycle rule reclaims it).

Reads go through `retry.open_retrying`, so a throttled or dropped read of a part or a
manifest is retried instead of failing the commit (see `retry.py`).
"""
from __future__ import annotations

import io
import json
import os
import re
import uuid
from contextlib import contextmanager
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .retry import open_retrying, read_parquet_file, with_retry_defaults

TMP_MARK = ".tmp-"
_TAG = re.compile(r"^[0-9A-Za-z_]{1,32}$")
LOCAL_PROTOCOLS = ("file", "local")


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `url`, with the user's options and our retry defaults."""
    try:
        fsspec.get_filesystem_class(fsspec.utils.get_protocol(url))
    except (ValueError, ImportError) as e:  # an unknown scheme, or its package missing: the user's to fix
        raise UserError(f"{url}: {e}") from None
    return fsspec.core.url_to_fs(url, **with_retry_defaults(url, storage_options))


def protocol_of(fs_or_url: fsspec.AbstractFileSystem | str) -> str:
    """The protocol's first name ("file", "s3", "gs", "http", ...) of a filesystem or a URL."""
    if isinstance(fs_or_url, str):
        return fsspec.utils.get_protocol(fs_or_url)
    protocol = fs_or_url.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


def is_local(fs_or_url: fsspec.AbstractFileSystem | str) -> bool:
    return protocol_of(fs_or_url) in LOCAL_PROTOCOLS


def join(root: str, *names: str) -> str:
    """`root/name/...` for paths and URLs alike (object-store keys always use `/`)."""
    return "/".join([root.rstrip("/"), *names])


def canonical_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The name we give a file: an absolute path on local disk, a full URL elsewhere."""
    return os.path.abspath(path) if is_local(fs) else fs.unstrip_protocol(path)


def listing(url: str, storage_options: dict | None = None) -> dict[str, int]:
    """Size of every file below `url`, by its path relative to `url` ({} if there is none): one
    listing call on an object store instead of one request per file."""
    fs, path = filesystem(url, storage_options)
    return files_below(fs, path)


def files_below(fs: fsspec.AbstractFileSystem, base: str) -> dict[str, int]:
    """`listing` on a filesystem already at hand."""
    # other processes (shard tasks, training ranks, Ray Train) write here: a listing cached by
    # fsspec (s3fs keeps one per folder) would hide their files, from this listing and from
    # later reads through the same filesystem
    fs.invalidate_cache(base)
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    finally:
        fs.invalidate_cache(base)
    prefix = base.rstrip("/") + "/"
    return {p[len(prefix):]: int(info["size"]) for p, info in found.items()
            if info["type"] == "file" and p.startswith(prefix)}


class OutputStore:
    def __init__(self, url: str, storage_options: dict | None = None, tag: str | None = None):
        self.url = url
        self.storage_options = storage_options or {}
        self.fs, root = filesystem(url, self.storage_options)
        self.protocol = protocol_of(self.fs)
        self.local = is_local(self.fs)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        if tag is not None and not _TAG.match(tag):
            raise ValueError(f"a temporary-file tag must be 1-32 letters, digits or _, not {tag!r}")
        # whose temporaries this store writes (see remove_temporaries); untagged: its own only
        self.tag = tag or uuid.uuid4().hex[:12]

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def makedirs(self, name: str = "") -> None:
        if self.local:
            os.makedirs(self.path(name) if name else self.root, exist_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        """Names (relative to the root) of the files below `prefix`."""
        if not prefix:
            return sorted(files_below(self.fs, self.root))
        return sorted(join(prefix, name) for name in files_below(self.fs, self.path(prefix)))

    def entries(self) -> list[str]:
        """Names of what the root holds, one level down (files and folders); [] if it is absent."""
        if self.local:
            return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write `name` only if nothing has that name yet; False if something does.

        Local disk: the complete content goes to a temporary file that is hard-linked to the
        final name: `link` fails if the name exists (atomic on every NFS version, which O_EXCL is
        not), and a reader never sees a half-written file. S3: a PUT with `If-None-Match: *`
        (s3fs `mode="create"`; AWS S3 and moto 5 honour it). Other stores: check, write, read
        back our bytes (unique to the caller): two writers that race within one round trip may
        both win, so callers verify again later (the lock's heartbeat does).
        """
        final = self.path(name)
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}{TMP_MARK}{self.tag}-{uuid.uuid4().hex[:12]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        if self.protocol in ("s3", "s3a"):
            try:
                self.fs.pipe_file(final, data, mode="create")
                return True
            except FileExistsError:
                return False
        if self.fs.exists(final):
            return False
        self.write_bytes(name, data)
        self.fs.invalidate_cache(final)
        return self.read_bytes(name) == data

    @contextmanager
    def open_atomic(self, name: str) -> Iterator[io.RawIOBase]:
        final = self.path(name)
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}{TMP_MARK}{self.tag}-{uuid.uuid4().hex[:12]}"
            f = open(tmp, "wb")
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(tmp, final)
            except BaseException:
                f.close()
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
        else:
            f = self.fs.open(final, "wb")
            try:
                yield f
                f.close()  # inside: an upload whose last part or completion fails is discarded too
            except BaseException:
                if hasattr(f, "discard"):
                    f.discard()
                # marked closed, or its __del__ closes it, which completes the upload (fsspec's
                # default discard() keeps the buffer) or, on s3fs, prints a traceback
                f.closed = True
                raise

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open_atomic(name) as f:
            f.write(data)

    def open_read(self, name: str) -> io.RawIOBase:
        """A read-only file that rides out transient store faults (seekable, for parquet)."""
        self.fs.invalidate_cache(self.path(name))  # it may have been written by another process
        return open_retrying(self.fs, self.path(name), name=f"{self.url}/{name}")

    def read_bytes(self, name: str) -> bytes:
        with self.open_read(name) as f:
            return f.read()

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False).encode())

    def read_json(self, name: str):
        return json.loads(self.read_bytes(name))

    def write_parquet(self, name: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(name, buf.getvalue())

    def read_parquet(self, name: str) -> pa.Table:
        with self.open_read(name) as f:
            return read_parquet_file(f)

    def remove_temporaries(self, folders: tuple[str, ...] = ("", "_parts", "_lock")) -> int:
        """Delete the temporaries that killed writers with this store's tag left in `folders`
        (not below them: another job may write into a subfolder); returns how many files."""
        if not self.local:
            return 0  # object stores have no temporaries (module doc)
        mark = f"{TMP_MARK}{self.tag}-"
        n = 0
        for folder in folders:
            d = self.path(folder) if folder else self.root
            if not os.path.isdir(d):
                continue
            for fn in os.listdir(d):
                p = os.path.join(d, fn)
                if mark in fn and os.path.isfile(p) and not os.path.islink(p):
                    os.remove(p)
                    n += 1
        return n
