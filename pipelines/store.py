"""An output location (local folder or object-store prefix) with all-or-nothing writes.

Local disk: write `NAME.tmp-<uuid>`, fsync, rename. The rename is atomic, so a reader (or
a re-run) sees either nothing or the whole file; a kill leaves only `*.tmp-*` files,
which `remove_temporaries` deletes on the next run.

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
import uuid
from contextlib import contextmanager
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .retry import open_retrying, with_retry_defaults

TMP_MARK = ".tmp-"


class OutputStore:
    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.storage_options = storage_options or {}
        self.fs, root = fsspec.core.url_to_fs(url, **with_retry_defaults(url, self.storage_options))
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.local = protocol in ("file", "local")
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def makedirs(self, name: str = "") -> None:
        if self.local:
            os.makedirs(self.path(name) if name else self.root, exist_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        """Names (relative to the root) of the files below `prefix`."""
        base = self.path(prefix) if prefix else self.root
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(p[len(root):] if p.startswith(root) else p for p in found)

    @contextmanager
    def open_atomic(self, name: str) -> Iterator[io.RawIOBase]:
        final = self.path(name)
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}{TMP_MARK}{uuid.uuid4().hex[:12]}"
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
            return pq.read_table(f, use_threads=False)  # see retry.read_parquet_retrying

    def remove_temporaries(self) -> int:
        """Delete what killed runs left behind; returns how many files."""
        if not self.local or not os.path.isdir(self.root):
            return 0
        n = 0
        for dirpath, _, files in os.walk(self.root):
            for fn in files:
                if TMP_MARK in fn:
                    os.remove(os.path.join(dirpath, fn))
                    n += 1
        return n
