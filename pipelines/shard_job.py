"""Preprocess one source shard into one output shard plus its manifest and quarantine parts.

This is the unit of work, of retry and of resume: an output shard is finished exactly
when its `_parts/NAME.done.json` exists, which is written last, after the shard and its
parquet parts are in place. Everything is streamed (one sample in memory at a time) and
the tar is written with fixed metadata, so the same input always gives the same bytes:
a re-run after a kill produces byte-identical output.
"""
from __future__ import annotations

import io
import logging
import re
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa

from . import reasons
from .config import DataConfig
from .dataset import MANIFEST_SCHEMA, QUARANTINE_SCHEMA, part_names
from .reasons import SampleError
from .retry import store_error_kind, store_failure
from .source import RawSample, base_plus_ext, iter_tar_samples
from .stage_clock import StageClock, stage
from .storage import OutputStore
from .tarheaders import ReadLimits
from .transform import count_dropped_members, encode_members, manifest_fields, transform_sample

log = logging.getLogger(__name__)

def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """`pa.Table.from_pylist(rows, schema=schema)`, the same table, built without `pa.array`.

    Why: `pa.array` on a list (or an ndarray) asks pyarrow's pandas shim whether the input is
    a pandas object, and the shim's first question imports pandas (~0.2 CPU-s, ~400 modules)
    in every fresh Ray worker, for two 100-row parquet parts per shard; pandas is otherwise
    never used in a shard task. Columns of the types our schemas use (string, int32, int64,
    float32, list<string>) are assembled from their Arrow buffers; a column of another type,
    or with a value the fast path doesn't take as is (not exactly str / int / float / list,
    out of range, a lone surrogate), goes through `pa.array`, which then behaves (converts
    or raises) exactly as `from_pylist` would.
    """
    names = schema.names
    arrays = []
    for i, name in enumerate(names):
        values = [row.get(name) for row in rows]  # from_pylist: a missing key is a null
        typ = schema.field(i).type
        arr = _buffers_array(values, typ)
        arrays.append(arr if arr is not None else pa.array(values, type=typ))
    return pa.Table.from_arrays(arrays, schema=schema)


_NUMPY_OF = {pa.int64(): (np.int64, int), pa.int32(): (np.int32, int), pa.float32(): (np.float32, float)}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _validity(values: list) -> tuple[pa.Buffer | None, int]:
    valid = [v is not None for v in values]
    nulls = len(values) - sum(valid)
    if not nulls:
        return None, 0
    return pa.py_buffer(np.packbits(np.array(valid, dtype=bool), bitorder="little")), nulls


def _buffers_array(values: list, typ: pa.DataType) -> pa.Array | None:
    """The Arrow array of `values` (Python objects, None = null), or None to leave it to
    `pa.array`."""
    n = len(values)
    if typ == pa.string():
        if any(v is not None and type(v) is not str for v in values):
            return None
        try:
            data = [b"" if v is None else v.encode("utf-8") for v in values]
        except UnicodeEncodeError:  # a lone surrogate: pyarrow raises its own error for it
            return None
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(d) for d in data], out=offsets[1:])
        if offsets[-1] >= 2**31:
            return None
        validity, nulls = _validity(values)
        return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(offsets.astype(np.int32)),
                                              pa.py_buffer(b"".join(data))], null_count=nulls)
    if pa.types.is_list(typ) and typ.value_type == pa.string():
        if any(v is not None and type(v) is not list for v in values):
            return None
        flat = [x for v in values if v is not None for x in v]
        child = _buffers_array(flat, typ.value_type)
        if child is None or child.null_count:
            return None
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([0 if v is None else len(v) for v in values], out=offsets[1:])
        validity, nulls = _validity(values)
        return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(offsets.astype(np.int32))],
                                     null_count=nulls, children=[child])
    if typ in _NUMPY_OF:
        dtype, pytype = _NUMPY_OF[typ]
        if any(v is not None and type(v) is not pytype for v in values):
            return None
        filled = [0 if v is None else v for v in values]
        if pytype is int:
            info = np.iinfo(dtype)
            if filled and not (info.min <= min(filled) and max(filled) <= info.max):
                return None
        elif any(not -_FLOAT32_MAX <= v <= _FLOAT32_MAX for v in filled):
            return None  # inf, nan, or beyond float32: leave the corner cases to pyarrow
        validity, nulls = _validity(values)
        return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(np.array(filled, dtype=dtype))],
                                     null_count=nulls)
    return None


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-f]+>")


def quarantine_row(raw: RawSample, err: SampleError) -> dict:
    # library messages embed object addresses ("<_io.BytesIO object at 0x7f..>"): drop them so
    # the quarantine of a re-run is identical to the first run's
    detail = _ADDRESS.sub("<bytes>", err.detail)
    return {
        "key": raw.key, "source": raw.source, "position": raw.position,
        "reason": err.reason, "kind": err.kind, "detail": detail, "members": list(raw.names),
    }


def internal_error(e: Exception, raw: RawSample, source: str, logged: Counter) -> SampleError:
    """The quarantine record of an unexpected exception on one sample. Its traceback is logged
    the first time its type occurs in this shard; later ones are counted (see process_shard)."""
    name = type(e).__name__
    logged[name] += 1
    if logged[name] == 1:
        log.error("unexpected %s on sample %r of %s (quarantined as %s; a bug, please report)",
                  name, raw.key, source, reasons.INTERNAL_ERROR, exc_info=e)
    message = " ".join(str(e).split())[:300]
    return SampleError(reasons.INTERNAL_ERROR, f"{name}: {message}" if message else name)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed metadata: identical input gives identical bytes
    tar.addfile(info, io.BytesIO(data))


class _CountingWriter(io.RawIOBase):
    """Counts bytes on their way to the store (object stores can't be asked cheaply)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.n += len(b)
        return len(b)

    def tell(self) -> int:  # tarfile's "w" mode starts counting at fileobj.tell()
        return self.n


# Members are copied into the tar in one piece rather than tarfile's 16 KiB chunks (a mel
# member is ~160 KB). The output shard is written with tarfile's plain "w" mode, not the
# stream mode "w|": both write the very same bytes (headers, data, padding, end blocks,
# record padding), but "w|" pushes everything through a 10 KiB record buffer that it
# re-slices after every record (a copy of the rest of a member each time), a good part of
# the tar writing's CPU. "w" only needs `tell()` of the (fresh, empty) output file.
_COPY_BUFSIZE = 4 * 1024 * 1024


def process_shard(
    source: str,
    shard_name: str,
    store: OutputStore,
    cfg: DataConfig,
    storage_options: dict | None = None,
) -> dict:
    """Returns this shard's stats (also written to its `done` part), with the task's thread CPU
    per stage (`stage_clock.py`)."""
    with StageClock() as clock:
        stats = _process_shard(source, shard_name, store, cfg, storage_options)
    stats["stage_cpu_s"] = {k: round(v, 6) for k, v in clock.seconds().items()}
    store.write_json(part_names(shard_name)["done"], stats)
    return stats


def process_shards(shards: list[tuple[str, str]], url: str, storage_options: dict, tag: str | None,
                   cfg_dict: dict) -> list[dict]:
    """One Ray task's shards, (source, output name) each, in order: their stats. A task of
    several shards names the shard the store failed on itself, in the one-line StoreError: the
    driver can't ask a failing store which of them are done."""
    out, cfg = OutputStore(url, storage_options, tag=tag), DataConfig.from_dict(cfg_dict)
    results = []
    for source, name in shards:
        try:
            results.append(process_shard(source, name, out, cfg, storage_options))
        except Exception as e:
            if len(shards) > 1 and store_error_kind(e) is not None:
                raise store_failure(e, f"{source} -> {url}/{name}") from None
            raise
    return results


def _next_sample(samples):
    with stage("read"):
        return next(samples, None)


def _process_shard(source: str, shard_name: str, store: OutputStore, cfg: DataConfig,
                   storage_options: dict | None) -> dict:
    start = time.time()
    counts: Counter = Counter()
    manifest: list[dict] = []
    quarantine: list[dict] = []
    first_with_hash: dict[str, str] = {}  # within-shard dedup; cross-shard happens at commit
    logged: Counter = Counter()  # unexpected exceptions by type: the first of each is logged
    bytes_in = 0

    with store.open_atomic(shard_name) as f:
        out = _CountingWriter(f)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.copybufsize = _COPY_BUFSIZE
            samples = iter_tar_samples(source, storage_options=storage_options, limits=ReadLimits.from_config(cfg))
            while (raw := _next_sample(samples)) is not None:
                counts["read"] += 1
                bytes_in += sum(len(v) for v in raw.members.values())
                try:
                    sample = transform_sample(raw, cfg)
                    if cfg.dedup and sample.content_hash in first_with_hash:
                        raise SampleError(reasons.DUPLICATE_CONTENT,
                                          f"same content as {first_with_hash[sample.content_hash]!r} in this shard",
                                          kind=reasons.DUPLICATE)
                    members = encode_members(sample, cfg)
                    row = {**manifest_fields(sample), "output_shard": shard_name}
                except Exception as e:  # other than a SampleError, a bug met on this sample (MemoryError
                    # too): quarantined as such, never the job's end
                    err = e if isinstance(e, SampleError) else internal_error(e, raw, source, logged)
                    quarantine.append(quarantine_row(raw, err))
                    counts[f"{err.kind}:{err.reason}"] += 1
                    continue
                # Writing is outside the catch-all: a failing store is the job's error, and a member
                # half-written into the tar must never be followed by more.
                first_with_hash[sample.content_hash] = sample.key
                with stage("write"):
                    for ext, data in members.items():
                        add_member(tar, f"{sample.key}.{ext}", data)
                manifest.append(row)
                counts["written"] += 1
                count_dropped_members(counts, sample.dropped)
    for name, n in logged.items():
        if n > 1:
            log.error("%d more sample(s) of %s hit %s (traceback above, not repeated)", n - 1, source, name)
    parts = part_names(shard_name)
    with stage("write"):
        store.write_parquet(parts["manifest"], rows_to_table(manifest, MANIFEST_SCHEMA))
        store.write_parquet(parts["quarantine"], rows_to_table(quarantine, QUARANTINE_SCHEMA))
    return {
        "source": source, "shard": shard_name, "counts": dict(counts),
        "bytes_in": bytes_in, "bytes_out": out.n, "seconds": round(time.time() - start, 3),
    }


def rewrite_without(store: OutputStore, shard_name: str, drop_keys: set[str]) -> int:
    """Rewrite an output shard leaving out the samples in `drop_keys` (cross-shard duplicates
    found at commit). Idempotent: running it again on the result changes nothing."""
    dropped = 0
    # streaming in and out; the new file only replaces the old one when complete, so
    # reading the old one meanwhile is safe on local disk and on object stores alike
    with store.fs.open(store.path(shard_name), "rb") as src, store.open_atomic(shard_name) as f:
        with tarfile.open(fileobj=src, mode="r|") as tin, \
                tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tout:
            for info in tin:
                tin.members = []
                key, _ = base_plus_ext(info.name)
                if key in drop_keys:
                    dropped += 1
                    continue
                add_member(tout, info.name, tin.extractfile(info).read())
    return dropped


# parts read at once by the commit: a part is a few small reads, mostly waiting on the store
# (an object store's round trip, a disk's), which threads overlap
PARALLEL_READS = 16


def read_parts(store: OutputStore, shard_names: list[str]) -> Iterator[tuple[pa.Table, pa.Table, dict]]:
    """(manifest, quarantine, done) of every output shard named, in that order."""

    def read(name: str) -> tuple[pa.Table, pa.Table, dict]:
        parts = part_names(name)
        return store.read_parquet(parts["manifest"]), store.read_parquet(parts["quarantine"]), \
            store.read_json(parts["done"])

    pool = ThreadPoolExecutor(PARALLEL_READS)
    try:
        yield from pool.map(read, shard_names)
    finally:  # after a failed read, the reads not started yet are dropped, not waited for
        pool.shutdown(cancel_futures=True)
