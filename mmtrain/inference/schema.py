"""The embedding table (a Lance dataset) that `embed` writes and `search` / `serve` read.

One row per sample: its id, where it lives, its caption, and one L2-normalized float32 vector
column per modality (null where the sample has no such modality). `shard` is the input shard
the row came from: a re-run of `embed` skips the shards already in the table (each shard's
rows are committed in one Lance transaction, so a shard is in the table whole or not at all).
"""
from __future__ import annotations

import pyarrow as pa

MODALITIES = ("image", "text", "audio")
VECTOR_COLUMNS = {m: f"{m}_vector" for m in MODALITIES}
TABLE_DIR = "embeddings.lance"       # OUT/embeddings.lance: the vectors
QUARANTINE_DIR = "quarantine.lance"  # OUT/quarantine.lance: rows that could not be embedded, with reasons
INFO_FILE = "embed.json"            # OUT/embed.json: the model, settings and counts of the job


def embedding_schema(dim: int) -> pa.Schema:
    vec = pa.list_(pa.float32(), dim)
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),       # f"{source}#{key}": unique in the table
        pa.field("source", pa.string(), nullable=False),   # the shard (URL or path) holding the sample
        pa.field("key", pa.string(), nullable=False),      # the sample's key in that shard
        pa.field("shard", pa.string(), nullable=False),    # the input shard of the embed job (== source)
        pa.field("caption", pa.string()),                  # null without a caption
        *(pa.field(VECTOR_COLUMNS[m], vec) for m in MODALITIES),
    ])


QUARANTINE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),   # a pipelines.reasons code
    pa.field("detail", pa.string()),
])


def sample_id(source: str, key: str) -> str:
    return f"{source}#{key}"
