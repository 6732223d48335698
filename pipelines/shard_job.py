"""Preprocess one source shard into one output shard plus its manifest and quarantine parts.

This is the unit of work, of retry and of resume: an output shard is finished exactly
when its `_parts/NAME.done.json` exists, which is written last, after the shard and its
parquet parts are in place. Everything is streamed (one sample in memory at a time) and
the tar is written with fixed metadata, so the same input always gives the same bytes:
a re-run after a kill produces byte-identical output.
"""
from __future__ import annotations

import io
import re
import tarfile
import time
from collections import Counter

import pyarrow as pa

from . import reasons
from .config import DataConfig
from .reasons import SampleError
from .source import RawSample, base_plus_ext, iter_tar_samples
from .store import OutputStore
from .transform import encode_members, manifest_fields, transform_sample

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("position", pa.int64()),
    ("output_shard", pa.string()), ("modalities", pa.string()),
    ("image_width", pa.int32()), ("image_height", pa.int32()),
    ("audio_seconds", pa.float32()), ("text_chars", pa.int32()), ("content_hash", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("position", pa.int64()),
    ("reason", pa.string()), ("kind", pa.string()), ("detail", pa.string()),
    ("members", pa.list_(pa.string())),
])


def part_names(shard_name: str) -> dict[str, str]:
    stem = shard_name[: -len(".tar")]
    return {
        "manifest": f"_parts/{stem}.manifest.parquet",
        "quarantine": f"_parts/{stem}.quarantine.parquet",
        "done": f"_parts/{stem}.done.json",
    }


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-f]+>")


def quarantine_row(raw: RawSample, err: SampleError) -> dict:
    # library messages embed object addresses ("<_io.BytesIO object at 0x7f..>"): drop them so
    # the quarantine of a re-run is identical to the first run's
    detail = _ADDRESS.sub("<bytes>", err.detail)
    return {
        "key": raw.key, "source": raw.source, "position": raw.position,
        "reason": err.reason, "kind": err.kind, "detail": detail, "members": list(raw.names),
    }


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


def process_shard(
    source: str,
    shard_name: str,
    store: OutputStore,
    cfg: DataConfig,
    storage_options: dict | None = None,
) -> dict:
    """Returns this shard's stats (also written to its `done` part)."""
    start = time.time()
    counts: Counter = Counter()
    manifest: list[dict] = []
    quarantine: list[dict] = []
    first_with_hash: dict[str, str] = {}  # within-shard dedup; cross-shard happens at commit
    bytes_in = 0

    with store.open_atomic(shard_name) as f:
        out = _CountingWriter(f)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for raw in iter_tar_samples(source, storage_options=storage_options,
                                        max_member_bytes=cfg.max_member_bytes):
                counts["read"] += 1
                bytes_in += sum(len(v) for v in raw.members.values())
                try:
                    sample = transform_sample(raw, cfg)
                except SampleError as e:
                    quarantine.append(quarantine_row(raw, e))
                    counts[f"{e.kind}:{e.reason}"] += 1
                    continue
                if cfg.dedup and sample.content_hash in first_with_hash:
                    err = SampleError(reasons.DUPLICATE_CONTENT,
                                      f"same content as {first_with_hash[sample.content_hash]!r} in this shard",
                                      kind=reasons.DUPLICATE)
                    quarantine.append(quarantine_row(raw, err))
                    counts[f"{err.kind}:{err.reason}"] += 1
                    continue
                first_with_hash[sample.content_hash] = sample.key
                for ext, data in encode_members(sample, cfg).items():
                    add_member(tar, f"{sample.key}.{ext}", data)
                manifest.append({**manifest_fields(sample), "output_shard": shard_name})
                counts["written"] += 1
    parts = part_names(shard_name)
    store.write_parquet(parts["manifest"], pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA))
    store.write_parquet(parts["quarantine"], pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))
    stats = {
        "source": source, "shard": shard_name, "counts": dict(counts),
        "bytes_in": bytes_in, "bytes_out": out.n, "seconds": round(time.time() - start, 3),
    }
    store.write_json(parts["done"], stats)
    return stats


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
