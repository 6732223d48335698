"""Reads from object stores that survive transient faults (throttling, dropped connections).

What the libraries already do (s3fs 2026.9 / aiobotocore 3.10; tests/faulty_s3.py produces
each of these faults):
- botocore retries a failed *call* (503 SlowDown, 500, throttling, connection errors) before
  any body byte is read: 5 attempts by default.
- s3fs wraps every call in `_error_wrapper` (5 attempts, 0.1 s .. 0.8 s apart), and
  `S3File._fetch_range` wraps call + body read the same way, so a body dropped mid-way
  (aiohttp `ClientPayloadError`) is fetched again. A 503 gets 5 x 5 attempts (~35 s).

Where that falls short, and why this module exists:
- Dropped bodies get 5 attempts within ~2 s, fixed: five drops in a row on one range (a
  load balancer or gateway restarting) and the read fails.
- What then escapes is aiohttp's `ClientPayloadError` (or a botocore error), not an
  `OSError`: it passes through our tar reader and kills the whole Ray task (the preprocess
  job, the training run). A 503 that outlasts its retries comes out as `OSError(EBUSY)`,
  which the tar reader would record as a damaged shard (`truncated_shard`): an outage made
  into a permanent quarantine, or, in training, samples silently missing from the epoch.
- fsspec's HTTP filesystem (http(s):// shards) retries nothing at all.

So we retry one level up, on the file: a read that fails transiently reopens the file and
seeks back to the offset it had reached. The caller (a streaming `tarfile`) sees one
unbroken byte stream: no sample lost, none read twice. After a bounded number of attempts
the error is one line, raised as `ReadRetriesExhausted`, deliberately *not* an `OSError` so
that no reader mistakes an unreachable store for a damaged shard.

A store error is not a data error. `store_error_kind` is the one classification every part
of the data plane uses: only "not found" may be recorded against a shard (`shard_unreadable`);
a refused credential or permission (403, 401, expired token), a 5xx that outlasts the
retries, a connection that cannot be made, a disk I/O error are the store's failures, raised
as `StoreError` (one line, naming the object), so that the job stops with nothing marked
done and a re-run, once the store or the credentials are fixed, processes the shard.
"""
from __future__ import annotations

import errno
import http.client
import io
import logging
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable

import fsspec

from .errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5          # reads of one chunk, the first included
    base_delay: float = 0.5    # seconds before the first retry, doubled each time
    max_delay: float = 10.0

    def delay(self, retry: int) -> float:
        # jitter: many tasks hitting a throttled store must not retry in lockstep
        return random.uniform(0.5, 1.0) * min(self.max_delay, self.base_delay * 2 ** retry)


DEFAULT_POLICY = RetryPolicy()

# botocore's retry settings for S3, used unless the user gives their own. "standard" is AWS's
# recommended mode (botocore's default is "legacy"): it also retries 502/504 and codes such as
# RequestTimeout, backs off with jitter, and draws retries from a quota so that a store that
# keeps failing is not hammered by every task at once.
S3_RETRIES = {"mode": "standard", "max_attempts": 5}


class StoreError(UserError):
    """The store failed (access refused, outage), not the data: the job stops with this one
    line, nothing is recorded against the shard, and a re-run processes it."""


class ReadRetriesExhausted(StoreError):
    """The store kept failing transiently; the input itself may be fine (re-run to resume)."""


class ObjectChanged(OSError):
    """The object was replaced while being read: its bytes can't be spliced (a data error)."""


def _transient_types() -> tuple[type[BaseException], ...]:
    """The exception types of a dropped or timed-out transfer, from the libraries that are
    loaded. Looked up, never imported: an exception of a library's type can only exist once
    that library is imported, and importing aiohttp/botocore up front would cost every Ray
    worker start-up CPU even on local input."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, http.client.IncompleteRead]
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        types += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError]
    bx = sys.modules.get("botocore.exceptions")
    if bx is not None:
        # HTTPClientError covers ConnectionClosedError, ReadTimeoutError, ResponseStreamingError;
        # botocore's ConnectionError covers EndpointConnectionError and ConnectTimeoutError
        types += [bx.HTTPClientError, bx.IncompleteReadError, bx.ConnectionError]
    ux = sys.modules.get("urllib3.exceptions")
    if ux is not None:
        types += [ux.ProtocolError, ux.IncompleteRead]
    return tuple(types)


# errnos that s3fs gives to a server-side, retryable answer: 503 SlowDown / ServiceUnavailable
# -> EBUSY, 500 InternalError -> EREMOTEIO
_TRANSIENT_ERRNOS = {errno.EBUSY, getattr(errno, "EREMOTEIO", 121), errno.EAGAIN, errno.ETIMEDOUT}


def is_transient(e: BaseException) -> bool:
    """Worth trying again: the connection or the server hiccuped, not the request or the data."""
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(e, aiohttp.ClientResponseError):
        return e.status >= 500 or e.status == 429  # an HTTP status from fsspec's http filesystem
    if isinstance(e, _transient_types()):
        return True
    return isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS


# store_error_kind's answers
NOT_FOUND = "not_found"    # the object is not there: a data error (the shard is unreadable)
TRANSIENT = "transient"    # worth retrying; after the retries, the store is down
DENIED = "denied"          # credentials or permissions: the job stops, a re-run with access works
FAILED = "failed"          # any other failure of the store or disk (an I/O error, a 4xx we can't act on)

# botocore error codes (when an error reaches us untranslated by s3fs)
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "ExpiredToken", "ExpiredTokenException",
                 "InvalidAccessKeyId", "InvalidToken", "SignatureDoesNotMatch", "TokenRefreshRequired",
                 "RequestTimeTooSkewed", "AccountProblem", "401", "403"}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}


def store_error_kind(e: BaseException) -> str | None:
    """What a failure of a filesystem call says about the object: NOT_FOUND, TRANSIENT, DENIED,
    FAILED, or None when it is no store error at all (a bug, or a format error raised by a
    parser above the file: those are never this function's business)."""
    if isinstance(e, StoreError):
        return FAILED
    if isinstance(e, (ObjectChanged, io.UnsupportedOperation)):
        # the data changed under us (the reader records it against the shard), or a file
        # used in a way it does not support (a bug): neither is the store failing
        return None
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(e, aiohttp.ClientResponseError):
        if e.status in (404, 410):
            return NOT_FOUND
        if e.status in (401, 403, 407):
            return DENIED
        return TRANSIENT if e.status >= 500 or e.status == 429 else FAILED
    bx = sys.modules.get("botocore.exceptions")
    if bx is not None:
        if isinstance(e, bx.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _NOT_FOUND_CODES or status == 404:
                return NOT_FOUND
            if code in _DENIED_CODES or status in (401, 403):
                return DENIED
            return TRANSIENT if status >= 500 or status == 429 else FAILED
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
            return DENIED
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return NOT_FOUND
    if isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno in _DENIED_ERRNOS):
        return DENIED
    if is_transient(e):
        return TRANSIENT
    if isinstance(e, OSError):
        return FAILED
    return None


def store_failure(e: BaseException, what: str) -> StoreError:
    """The one-line `StoreError` for a failure of the store on `what` (a URL)."""
    if isinstance(e, StoreError):
        return e if what in str(e) else StoreError(f"{what}: {e}")
    hint = {DENIED: "access refused: check the credentials and permissions, then re-run",
            TRANSIENT: "the store is unreachable or failing: re-run when it is back"}.get(
        store_error_kind(e), "the store failed: re-run when it is fixed")
    return StoreError(f"{what}: {_one_line(e)} ({hint})")


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


class RetryingFile(io.RawIOBase):
    """A read-only file that reopens and seeks back on a transient error (see module doc).

    `opener()` returns a fresh file object positioned at 0. The object must not change
    between attempts: if the reopened file's size differs, splicing the two would corrupt
    the stream, so that is an error, not a retry.
    """

    def __init__(self, opener: Callable[[], io.IOBase], name: str, policy: RetryPolicy = DEFAULT_POLICY):
        super().__init__()
        self._opener, self.name, self._policy = opener, name, policy
        self._pos = 0
        self._size: int | None = None
        self._f = None  # the open file; None after a failure, until the next attempt reopens
        self._call("open", lambda f: None)

    def _open_at(self, pos: int):
        f = self._opener()
        size = getattr(f, "size", None)
        if self._size is None:
            self._size = size
        elif size is not None and size != self._size:
            f.close()
            raise ObjectChanged(f"{self.name} changed while being read ({self._size} -> {size} bytes)")
        if pos:
            f.seek(pos)
        return f

    def _call(self, what: str, fn):
        """fn(file), on the open file; after a transient error: back off, reopen, seek, again."""
        for attempt in range(self._policy.attempts):
            try:
                if self._f is None:
                    self._f = self._open_at(self._pos)
                return fn(self._f)
            except Exception as e:
                kind = store_error_kind(e)
                if kind in (DENIED, FAILED):
                    # e.g. a 403 mid-stream (a credential that expired during a long read):
                    # never an OSError to the tar reader, which would call the shard truncated
                    raise store_failure(e, f"{self.name}: {what} at byte {self._pos}") from None
                if kind != TRANSIENT:
                    raise  # not found (a data error), or not the store's doing
                self._drop()
                if attempt + 1 == self._policy.attempts:
                    raise ReadRetriesExhausted(
                        f"{self.name}: {what} at byte {self._pos} failed {self._policy.attempts} times, "
                        f"last {_one_line(e)}; the store is unreachable or throttling, try again later"
                    ) from e
                wait = self._policy.delay(attempt)
                log.warning("%s: %s at byte %d failed (%s), retry %d/%d in %.1f s", self.name, what,
                            self._pos, _one_line(e), attempt + 1, self._policy.attempts - 1, wait)
                time.sleep(wait)

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:
                pass  # its connection is already broken; closing is best effort

    def read(self, size: int = -1) -> bytes:
        data = self._call("read", lambda f: f.read(size))
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._call("seek", lambda f: f.seekable())

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._call("seek", lambda f: f.seek(offset, whence))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._drop()
            super().close()


def open_retrying(fs: fsspec.AbstractFileSystem, path: str, name: str | None = None,
                  policy: RetryPolicy = DEFAULT_POLICY) -> RetryingFile:
    """`fs.open(path, "rb")` that survives transient faults; `name` is used in messages."""
    return RetryingFile(lambda: fs.open(path, "rb"), name or path, policy)


def read_parquet_retrying(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None):
    """A parquet file (a manifest) read through `open_retrying`, by `read_parquet_file`."""
    with open_retrying(fs, path) as f:
        return read_parquet_file(f, columns)


def read_parquet_file(f, columns: list[str] | None = None):
    """A parquet table from a Python file object, read whole on this thread and parsed from
    memory Arrow owns. pyarrow 26 reads a Python file from its own threads too (its I/O pool,
    even with `use_threads=False, pre_buffer=False`), and such a thread waiting for the GIL
    while the interpreter exits aborts a process that did its work ("terminate called without
    an active exception", rc -6; apache/arrow#34314, #45017). A manifest is read whole anyway."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = f.read()
    owned = pa.allocate_buffer(len(data))  # no Python object for an Arrow thread to release
    pa.FixedSizeBufferWriter(owned).write(data)
    del data
    return pq.read_table(pa.BufferReader(owned), columns=columns, use_threads=False)


def with_retry_defaults(url: str, storage_options: dict | None) -> dict:
    """The user's storage options, plus our botocore retry settings for s3:// when the user
    set none (theirs always win)."""
    opts = dict(storage_options or {})
    if not url.startswith(("s3://", "s3a://")):
        return opts
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("retries", dict(S3_RETRIES))
    opts["config_kwargs"] = config
    return opts
