"""Cross-modal nearest neighbours over the embedding table that `embed` writes.

`open_index(OUT)` opens OUT/embeddings.lance with LanceDB (local or object storage);
`EmbeddingIndex.search(query, target, k)` ranks the rows' `target` vectors by cosine
similarity to the query: an exact scan when the column has no ANN index, else the IVF-PQ
index (`vector_index.py`) with a refine step that re-ranks its candidates by their exact
vectors. A row without a `target` vector (a sample with no such modality) is never returned.
`search_corpus` is the `search` command: embed the query with the model that built the
table, check it fits, search.
"""
from __future__ import annotations

import json
import os

import numpy as np

from pipelines.errors import UserError

from .inputs import MODALITIES, BadInput, embed_items
from .lance_store import open_table, vector_dim
from .schema import INFO_FILE, VECTOR_COLUMNS

NPROBES = 20        # IVF partitions searched per query (LanceDB's default; ~sqrt(n)/20 of the data at 1e5..1e6)
REFINE_FACTOR = 10  # PQ candidates per result re-ranked by their exact vectors
MAX_K = 1000        # more is a bulk export, not a search
RESULT_COLUMNS = ["id", "key", "source", "caption"]
DEFAULT_TARGET = {"text": "image", "image": "text", "audio": "text"}


class EmbeddingIndex:
    """One embedding table, open for queries."""

    def __init__(self, table):
        self.table = table
        self.dim = vector_dim(table)
        self.indexed = {ix.columns[0] for ix in table.list_indices() if len(ix.columns) == 1}

    @property
    def count(self) -> int:
        return self.table.count_rows()

    def search(self, query: np.ndarray, target: str, k: int, *, exact: bool = False) -> list[dict]:
        """The `k` rows whose `target` vector is most cosine-similar to `query` ([dim]
        float32), best first: {"id", "key", "source", "caption", "score"}. `exact` skips the
        ANN index (the ground truth it is tested against). Bad arguments are BadInput."""
        if target not in MODALITIES:
            raise BadInput(f"target must be one of {', '.join(MODALITIES)}, not {target!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise BadInput(f"k must be a whole number from 1 to {MAX_K}, not {k!r}")
        q = np.asarray(query, dtype=np.float32)
        if q.shape != (self.dim,):
            raise BadInput(f"the query vector has shape {tuple(q.shape)}; the table's vectors have "
                           f"{self.dim} dimensions")
        if not np.isfinite(q).all() or not q.any():
            raise BadInput("the query vector must be finite and non-zero")
        col = VECTOR_COLUMNS[target]
        builder = (self.table.search(q, vector_column_name=col).distance_type("cosine")
                   .where(f"{col} IS NOT NULL", prefilter=True)
                   .select([*RESULT_COLUMNS, "_distance"]).limit(int(k)))
        if exact or col not in self.indexed:
            builder = builder.bypass_vector_index()
        else:
            builder = builder.nprobes(NPROBES).refine_factor(REFINE_FACTOR)
        found = builder.to_arrow()
        # LanceDB's cosine distance is 1 - cosine similarity
        scores = 1.0 - found["_distance"].to_numpy(zero_copy_only=False).astype(np.float64)
        rows = found.select(RESULT_COLUMNS).to_pylist()
        return [{**r, "score": round(float(s), 6)} for r, s in zip(rows, scores)]


def open_index(out: str, storage_options: dict | None = None) -> EmbeddingIndex:
    """OUT/embeddings.lance (OUT a folder or an object-store URL); a missing or foreign
    table is a one-line UserError."""
    return EmbeddingIndex(open_table(out, storage_options))


def query_vector(loaded, item: dict) -> tuple[np.ndarray, str]:
    """A one-modality query ({"text": str} / {"image": bytes} / {"audio": bytes}) -> its
    L2-normalized embedding [D] and its modality, through the training transform
    (`inputs.embed_items`). Anything else is BadInput."""
    if not isinstance(item, dict) or len(item) != 1:
        raise BadInput("a query is exactly one of text, image or audio")
    (modality,) = item
    if modality not in MODALITIES:
        raise BadInput(f"unknown query field {modality!r} (expected text, image or audio)")
    return embed_items([item], loaded)[modality][0], modality


def index_info(out: str, storage_options: dict | None = None) -> dict | None:
    """OUT/embed.json (what `embed` records), or None where there is none. Unreadable or
    not JSON: a one-line UserError."""
    from pipelines.storage import filesystem, join

    fs, path = filesystem(join(out, INFO_FILE), storage_options)
    try:
        with fs.open(path, "rb") as f:
            info = json.loads(f.read(1 << 20))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise UserError(f"--index {out}: {INFO_FILE} is not JSON ({e}); pass --model") from None
    return info if isinstance(info, dict) else {}


def model_of_index(out: str, storage_options: dict | None = None) -> str:
    """The model that built OUT, as OUT/embed.json records it (`embed` writes it)."""
    info = index_info(out, storage_options)
    if info is None:
        raise UserError(f"--index {out}: no {INFO_FILE} saying which model built it; pass --model")
    model = info.get("model")
    model = model.get("path") if isinstance(model, dict) else model  # embed writes {"path", "origin", ...}
    if not isinstance(model, str) or not model:
        raise UserError(f"--index {out}: {INFO_FILE} names no model; pass --model")
    return model


def check_model_fits(loaded, index: EmbeddingIndex, out: str, storage_options: dict | None = None) -> None:
    """Queries embedded by `loaded` are comparable with OUT's vectors: the same dimension, and
    where OUT/embed.json records the fingerprint of the model that built it, the same model
    (weights, data transform). Another model's vectors live in another space: its results
    would look like answers and mean nothing. A one-line UserError otherwise."""
    from .loaded import model_fingerprint

    if loaded.embed_dim != index.dim:
        raise UserError(f"the model {loaded.origin} makes {loaded.embed_dim}-dimensional vectors but {out} holds "
                        f"{index.dim}-dimensional ones: use the model that built it")
    recorded = ((index_info(out, storage_options) or {}).get("model") or {})
    expected = recorded.get("fingerprint") if isinstance(recorded, dict) else None
    if expected and model_fingerprint(loaded) != expected:
        raise UserError(f"the model {loaded.origin} is not the one that built {out} ({recorded.get('origin')}, "
                        f"fingerprint {expected}): its vectors are not comparable; use that model, or embed the "
                        f"corpus with this one")


def search_corpus(out: str, item: dict, *, target: str | None = None, k: int = 5, model: str | None = None,
                  storage_options: dict | None = None) -> list[dict]:
    """The `search` command: the query embedded by `model` (default: the one that built OUT),
    searched in OUT's `target` column (default: image for text, text for image or audio).
    Every problem with what was given is a one-line UserError."""
    from .loaded import load_model

    if not 1 <= k <= MAX_K:
        raise UserError(f"-k must be at least 1 and at most {MAX_K}, not {k}")
    index = open_index(out, storage_options)
    loaded = load_model(model or model_of_index(out, storage_options), storage_options=storage_options)
    check_model_fits(loaded, index, out, storage_options)
    try:
        vector, modality = query_vector(loaded, item)
        return index.search(vector, target or DEFAULT_TARGET[modality], k)
    except BadInput as e:
        # inputs.py numbers the items of a batch: a query is one item, its number says nothing
        raise UserError(f"--{next(iter(item), 'query')}: {str(e).removeprefix('input 0: ')}") from None


def read_query_file(path: str, flag: str, limit: int = 64 << 20) -> bytes:
    """The bytes of a query file named on the command line (at most `limit`: the transform
    refuses members above data.max_member_bytes, 64 MiB, anyway)."""
    if not os.path.isfile(path):
        raise UserError(f"--{flag} {path}: no such file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"--{flag} {path}: larger than {limit >> 20} MiB")
    return data


def format_results(results: list[dict], width: int = 110) -> str:
    """A readable table: rank, score, key, source (its tail), caption (cut to fit)."""
    if not results:
        return "no rows have that modality"
    lines = [f"{'#':>3}  {'score':>6}  {'key':<16} {'source':<32} caption"]
    for i, r in enumerate(results, 1):
        source = _printable(r["source"])
        source = source if len(source) <= 32 else "…" + source[-31:]
        line = f"{i:>3}  {r['score']:6.3f}  {_printable(r['key']):<16} {source:<32} {_printable(r['caption'] or '-')}"
        lines.append(line if len(line) <= width else line[:width - 1] + "…")
    return "\n".join(lines)


def _printable(text: str) -> str:
    """Keys and captions come from shards: a control character (a newline, a terminal escape)
    is shown as U+FFFD instead of acting on the user's terminal. (--json escapes them.)"""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)
