"""Opening OUT/embeddings.lance with LanceDB, on local disk or object storage.

The command line's `--storage-options` are fsspec's (the rest of the project reads buckets
with fsspec); LanceDB reaches a bucket through Rust's `object_store`, whose option names
differ. `lance_storage_options` translates the fsspec S3 names we document and passes
object_store names through, so one `--storage-options` works for every command.
"""
from __future__ import annotations

import os

from pipelines.errors import UserError
from pipelines.storage import is_local

from .schema import TABLE_DIR, VECTOR_COLUMNS

TABLE_NAME = TABLE_DIR.removesuffix(".lance")  # LanceDB's table NAME lives in DB/NAME.lance

# fsspec (s3fs) option -> object_store option
_S3_NAMES = {"key": "aws_access_key_id", "secret": "aws_secret_access_key", "token": "aws_session_token"}
_S3_CLIENT_NAMES = {"endpoint_url": "aws_endpoint", "region_name": "aws_region"}


def lance_storage_options(storage_options: dict | None) -> dict[str, str]:
    """fsspec-style options (key, secret, token, anon, client_kwargs.endpoint_url/region_name)
    as object_store's (aws_access_key_id, ..., aws_endpoint, allow_http); other names pass
    through as strings. object_store takes only strings."""
    out: dict[str, str] = {}
    for name, value in (storage_options or {}).items():
        if name in _S3_NAMES:
            out[_S3_NAMES[name]] = str(value)
        elif name == "anon":
            if value:
                out["aws_skip_signature"] = "true"
        elif name == "client_kwargs" and isinstance(value, dict):
            for inner, v in value.items():
                if inner in _S3_CLIENT_NAMES:
                    out[_S3_CLIENT_NAMES[inner]] = str(v)
        elif isinstance(value, (str, int, float, bool)):
            out[name] = str(value).lower() if isinstance(value, bool) else str(value)
    if out.get("aws_endpoint", "").startswith("http://"):
        out.setdefault("allow_http", "true")
    return out


def open_table(out: str, storage_options: dict | None = None):
    """The embedding table of an `embed` output folder as a LanceDB table. A folder without
    one, or a table that is not ours, is a one-line UserError; nothing is created."""
    import lancedb

    # connecting to a local folder creates it: check first, so a mistyped path stays untouched
    if is_local(out) and not os.path.isdir(os.path.join(out.removeprefix("file://"), TABLE_DIR)):
        raise UserError(f"--index {out}: no embedding table ({TABLE_DIR}) there; make one with `ray_job.py embed`")
    db = lancedb.connect(out, storage_options=lance_storage_options(storage_options) or None)
    try:
        table = db.open_table(TABLE_NAME)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:  # lancedb's "Table ... was not found"
        raise UserError(f"--index {out}: cannot open {TABLE_DIR} ({' '.join(str(e).split())[:300]})") from None
    missing = [c for c in VECTOR_COLUMNS.values() if c not in table.schema.names]
    if missing or "id" not in table.schema.names:
        raise UserError(f"--index {out}: {TABLE_DIR} is not an embedding table (no {', '.join(missing) or 'id'})")
    return table


def vector_dim(table) -> int:
    """D of the table's FixedSizeList<float32, D> vector columns."""
    return table.schema.field(VECTOR_COLUMNS["image"]).type.list_size
