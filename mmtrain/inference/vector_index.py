"""The ANN index of the embedding table: LanceDB's IVF-PQ (cosine) on each vector column
that holds enough vectors for an index to pay; exact search below that.

Why 100,000 vectors: an exact search reads the whole column once per query. LanceDB's own
guidance is that a flat scan of ~100K vectors takes well under 100 ms and an index is
overhead below that; at our D = 128 that is 51 MB of float32 per query, which from object
storage already costs more than the index's few partitions of 16-byte PQ codes plus a refine
read of k x REFINE_FACTOR full vectors. Below it the index would also be poorly trained
(IVF wants sqrt(n) partitions of a few hundred vectors each; PQ needs >= 256 vectors).

Why IVF-PQ: it is LanceDB's default disk-based index, cheap to build on CPUs, reads little
from object storage, and its one weakness (PQ's approximate distances) is undone at query
time by the refine step (`search.REFINE_FACTOR`), which re-ranks candidates by their exact
vectors. HNSW variants hold a graph per partition: faster on hot local disk, slower to
build and costlier to read from a bucket, and LanceDB advises IVF-PQ for filtered queries
(every search filters out null vectors).
"""
from __future__ import annotations

import math

from .lance_store import open_table, vector_dim
from .schema import MODALITIES, VECTOR_COLUMNS

INDEX_MIN_ROWS = 100_000  # non-null vectors in a column before it gets an index (see above)
PQ_MIN_ROWS = 256         # PQ trains 2^8 centroids per sub-vector: fewer vectors cannot train it
STALE_FRACTION = 0.1      # rebuild when more than this share of a column's vectors is unindexed


def index_plan(vectors: int, dim: int) -> dict:
    """IVF-PQ parameters for `vectors` vectors of `dim`: sqrt(n) partitions (LanceDB's
    default rule), and sub-vectors of 16 (else 8) dimensions, the SIMD-friendly sizes."""
    sub = dim // 16 if dim % 16 == 0 else dim // 8 if dim % 8 == 0 else 1
    return {"num_partitions": max(1, round(math.sqrt(vectors))), "num_sub_vectors": sub}


def ensure_index(out: str, storage_options: dict | None = None, *, min_rows: int = INDEX_MIN_ROWS) -> dict:
    """Build (or rebuild, when the table has grown by more than STALE_FRACTION since) the
    IVF-PQ index of every vector column of OUT/embeddings.lance with at least `min_rows`
    non-null vectors. Returns, per vector column: {"vectors": n, "index": "IVF_PQ" or None,
    "built": bool, ...the parameters or why not}. Idempotent: a fresh index is left alone."""
    from lancedb.index import IvfPq

    table = open_table(out, storage_options)
    dim = vector_dim(table)
    existing = {tuple(ix.columns): ix.name for ix in table.list_indices()}
    report = {}
    for m in MODALITIES:
        col = VECTOR_COLUMNS[m]
        vectors = table.count_rows(f"{col} IS NOT NULL")
        threshold = max(min_rows, PQ_MIN_ROWS)
        if vectors < threshold:
            report[col] = {"vectors": vectors, "index": None, "built": False,
                           "why": f"exact search: {vectors} vectors < {threshold}"}
            continue
        name = existing.get((col,))
        if name is not None:
            stats = table.index_stats(name)
            # vectors, not rows: null vectors are never indexed, and rows appended by a re-run of
            # `embed` are not until a rebuild (Lance scans them exactly and merges them in)
            unindexed = max(0, vectors - stats.num_indexed_rows)
            if unindexed <= STALE_FRACTION * vectors:
                report[col] = {"vectors": vectors, "index": str(stats.index_type), "built": False,
                               "unindexed": unindexed, "name": name}
                continue
        plan = index_plan(vectors, dim)
        table.create_index(col, config=IvfPq(distance_type="cosine", **plan), replace=True)
        report[col] = {"vectors": vectors, "index": "IVF_PQ", "built": True, "metric": "cosine", **plan}
    return report
