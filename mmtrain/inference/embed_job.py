"""The `embed` job: every sample of raw or preprocessed shards -> one row of a Lance dataset
(OUT/embeddings.lance, `schema.embedding_schema`) or, if it cannot be embedded, one row of
OUT/quarantine.lance with its reason; OUT/embed.json records the model, the settings and
the counts. Then the ANN index (`vector_index.ensure_index`).

Exactly once, across `kill -9` and re-runs. The pending shards are embedded in one streaming
Ray Data execution; the driver gathers the rows by shard (`shard_buffer.py`) and commits
complete shards in groups. Each group is written with Ray Data's Lance writer
(`Dataset.write_lance`, mode append), which
commits all of a write's fragments in one Lance transaction on the driver after every write
task has finished, so a group's vectors are in the table all together or not at all (the
fragment files of a killed write are never referenced by a version). A group holds whole
shards only, so the same holds per shard: a shard's `shard` value is in the table iff all of
its good rows are. A re-run reads the distinct `shard` values of the table and skips them:
no shard is committed twice, none is left out. The quarantine rows of a group are committed
just before its vectors; a kill between the two commits leaves quarantine rows of shards
that are not done, and a re-run deletes the quarantine rows of every shard it is about to
embed before embedding it. A shard without a single good row (all quarantined, or empty)
has nothing in the table to say it is done: embed.json lists it (`shards_without_vectors`),
written after its group's commits, so a kill before that write only redoes the shard.
One job at a time writes an output (the `ownership` lock): two would embed the same shards.

Ownership, as for `preprocess`: an output that overlaps an input, holds foreign files, or
holds another embed job's tables (another model, other data settings) is refused in one
line. Other inputs into the same output are welcome: a corpus that grows is embedded
incrementally (the new shards only).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.dataset import check_preprocessed
from pipelines.errors import UserError
from pipelines.ownership import OutputConflict, acquire, check_no_overlap, check_ours
from pipelines.shards import expand_shards
from pipelines.storage import OutputStore

from .lance_store import lance_storage_options
from .loaded import model_fingerprint
from .schema import INFO_FILE, QUARANTINE_DIR, QUARANTINE_SCHEMA, TABLE_DIR, embedding_schema

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_SHARDS_PER_COMMIT = 256
MAX_BYTES_PER_COMMIT = 256 << 20  # the complete shards' rows wait on the driver: this bounds them


@dataclass(frozen=True)
class EmbedConfig:
    model: str                      # a run directory or an exported .safetensors
    data: tuple[str, ...]           # shards, folders, globs, as for `train`
    output: str
    workers: int = 2                # EmbedActors (one model each)
    batch_size: int = 64            # samples per forward pass
    gpus_per_worker: float = 0      # > 0: each actor on (a share of) a GPU
    shards_per_commit: int | None = None  # default: `group_size`'s choice
    storage_options: dict = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self):
        if self.workers < 1 or self.batch_size < 1 or self.gpus_per_worker < 0:
            raise UserError("--workers and --batch-size must be at least 1, --gpus-per-worker 0 or more")
        if self.shards_per_commit is not None and self.shards_per_commit < 1:
            raise UserError("--shards-per-commit must be at least 1")


def group_size(pending: int, fixed: int | None = None) -> int:
    """Shards per commit: few commits (each is a Lance version and a small write on Ray Data),
    yet enough of them that a kill loses little: about an eighth of the run each."""
    if fixed is not None:
        return fixed
    return max(1, min(MAX_SHARDS_PER_COMMIT, math.ceil(pending / 8)))


class Tables:
    """The output's two Lance datasets, created empty on the first run."""

    def __init__(self, store: OutputStore, dim: int, storage_options: dict):
        self.opts = lance_storage_options(storage_options) or None  # the translation search and the index use
        base = store.root if store.local else store.url.rstrip("/")
        self.vectors, self.quarantine = f"{base}/{TABLE_DIR}", f"{base}/{QUARANTINE_DIR}"
        self.schemas = {self.vectors: embedding_schema(dim), self.quarantine: QUARANTINE_SCHEMA}

    def open_or_create(self, store: OutputStore) -> None:
        import lance

        for uri, schema in self.schemas.items():
            if not store.exists(f"{uri.rsplit('/', 1)[1]}/_versions"):  # new, or its creation was killed
                lance.write_dataset(schema.empty_table(), uri, schema=schema, mode="overwrite",
                                    storage_options=self.opts)
            got = lance.dataset(uri, storage_options=self.opts).schema
            if got.remove_metadata() != schema:
                raise OutputConflict(f"{uri} is not a table of this embed job (its columns: {', '.join(got.names)})")

    def distinct(self, uri: str, column: str) -> set[str]:
        import lance

        seen: set[str] = set()
        for batch in lance.dataset(uri, storage_options=self.opts).to_batches(columns=[column]):
            seen.update(pc.unique(batch.column(0)).to_pylist())
        return seen

    def clean_up_after_a_killed_run(self) -> None:
        """A killed run leaves the fragment files of the commit it was in (written, never part of
        a version): Lance deletes files no version references, and the versions before the
        latest (the job's own steps: nothing a user made). `delete_unverified` is safe only
        with no other writer: the ownership lock guarantees it (a dead driver's straggling
        write task can add files no commit will ever reference, nothing more)."""
        import lance

        for uri in self.schemas:
            lance.dataset(uri, storage_options=self.opts).cleanup_old_versions(
                retain_versions=1, delete_unverified=True, error_if_tagged_old_versions=False)

    def forget_quarantined(self, shards: set[str]) -> int:
        """Delete the quarantine rows of `shards` (left by a run killed between the two commits
        of a group); returns how many shards had some."""
        import lance

        stale = sorted(self.distinct(self.quarantine, "shard") & shards)
        if stale:
            quoted = ", ".join("'" + s.replace("'", "''") + "'" for s in stale)
            lance.dataset(self.quarantine, storage_options=self.opts).delete(f"shard IN ({quoted})")
        return len(stale)

    def append(self, uri: str, table: pa.Table) -> None:
        """One Lance commit of `table`'s rows through Ray Data's Lance writer (module doc)."""
        import ray

        from .lance_sink import LanceAppendSink

        if table.num_rows:  # ds.write_lance(uri, mode="append") but for ray-project/ray#65129 (lance_sink.py)
            ray.data.from_arrow(table).write_datasink(LanceAppendSink(uri, storage_options=self.opts))

    def counts(self) -> dict:
        import lance

        reasons = Counter()
        for batch in lance.dataset(self.quarantine, storage_options=self.opts).to_batches(columns=["reason"]):
            reasons.update(batch.column(0).to_pylist())
        return {"embedded": lance.dataset(self.vectors, storage_options=self.opts).count_rows(),
                "quarantined": sum(reasons.values()), "quarantined_by_reason": dict(sorted(reasons.items()))}


def embed(cfg: EmbedConfig, *, say: Callable[[str], None] | None = None) -> dict:
    """Run (or finish) the job; returns what OUT/embed.json holds, plus `this_run`."""
    from pipelines.runtime import init_ray

    from .loaded import load_model
    from .vector_index import ensure_index

    started, opts = time.time(), cfg.storage_options
    if "://" not in cfg.model:  # the actors may run elsewhere (another cwd, another node)
        cfg = replace(cfg, model=os.path.abspath(cfg.model))
    shards = expand_shards(list(cfg.data), opts)
    check_no_overlap(list(cfg.data), shards, cfg.output, opts)
    loaded = load_model(cfg.model, device="cpu", storage_options=opts)
    preprocessed = check_preprocessed(shards, loaded.data_cfg, opts)
    fp = model_fingerprint(loaded)
    store = OutputStore(cfg.output, opts, tag=fp)
    if store.exists(INFO_FILE):
        _check_same_job(store, fp)
    check_ours(store, INFO_FILE, job="embed")
    store.makedirs()
    lock = acquire(store, fp, say=say, job="embed")
    try:
        if store.exists(INFO_FILE):  # again under the lock: another model's run may have claimed it meanwhile
            _check_same_job(store, fp)
        resumed = store.exists(INFO_FILE) and not store.read_json(INFO_FILE).get("complete", True)
        info = _claim(store, fp, loaded, cfg, preprocessed)
        store.remove_temporaries(("",))  # embed.json's, of this job's killed runs: the lock says none runs
        tables = Tables(store, loaded.embed_dim, opts)
        tables.open_or_create(store)
        if resumed:  # the last run did not finish: it may have left a commit's files behind
            tables.clean_up_after_a_killed_run()
        done = tables.distinct(tables.vectors, "shard") | set(info["shards_without_vectors"])
        pending = [s for s in shards if s not in done]
        tables.forget_quarantined(set(pending))
        if pending:
            init_ray(dashboard=False)  # Ray Data only: see init_ray
            _embed_pending(pending, cfg, loaded.data_cfg, preprocessed, tables, store, info, lock)
        info.update(counts=tables.counts(), complete=True)
        info["index"] = ensure_index(cfg.output, storage_options=opts or None)
        info["this_run"] = {"embedded_shards": len(pending), "skipped_shards": len(shards) - len(pending),
                            "seconds": round(time.time() - started, 3)}
        lock.ensure_held()
        store.write_json(INFO_FILE, info)
    finally:
        lock.release()
    return info


def _check_same_job(store: OutputStore, fp: str) -> None:
    info = store.read_json(INFO_FILE)
    if info.get("fingerprint") != fp:
        made_with = (info.get("model") or {}).get("origin")
        raise OutputConflict(f"{store.url} already holds the embeddings of another model or other data settings"
                             + (f" (made with {made_with})" if made_with else "")
                             + "; choose a new --output or delete it")


def _claim(store: OutputStore, fp: str, loaded, cfg: EmbedConfig, preprocessed: bool) -> dict:
    """embed.json: the job's identity (written before any table, so a folder with our tables
    always has it), the settings of the latest run, the shards done without a vector."""
    info = store.read_json(INFO_FILE) if store.exists(INFO_FILE) else {"shards_without_vectors": []}
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("model", "data", "output", "storage_options",
                                                                    "progress")}
    info.update(format=FORMAT_VERSION, fingerprint=fp, complete=False, inputs=list(cfg.data),
                preprocessed=preprocessed, settings=settings, data_config=loaded.data_cfg.to_dict(),
                # `path`: what `search` and `serve` load to embed queries the same way
                model={"path": cfg.model if "://" in cfg.model else os.path.abspath(cfg.model),
                       "origin": loaded.origin, "embed_dim": loaded.embed_dim, "fingerprint": fp})
    store.write_json(INFO_FILE, info)
    return info


def _embed_pending(pending: list[str], cfg: EmbedConfig, data_cfg, preprocessed: bool, tables: Tables,
                   store: OutputStore, info: dict, lock) -> None:
    """One streaming Ray Data execution over every pending shard (the actor pool starts once);
    the driver gathers the rows by shard (`ShardBuffer`) and commits the complete ones in
    groups: quarantine rows, then vectors, then embed.json."""
    from .batch_embed import embedded_or_quarantined
    from .shard_buffer import ShardBuffer

    size = group_size(len(pending), cfg.shards_per_commit)
    ds = embedded_or_quarantined(cfg.model, pending, data_cfg, preprocessed=preprocessed, workers=cfg.workers,
                                 batch_size=cfg.batch_size, gpus_per_worker=cfg.gpus_per_worker,
                                 storage_options=cfg.storage_options or None, mark_shard_ends=True)
    buffer, bar, samples = ShardBuffer(pending), _progress_bar(len(pending), cfg.progress), 0
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            buffer.add(batch)
            samples += batch.num_rows
            if bar is not None:
                bar.set_postfix_str(f"{samples} samples", refresh=True)
            while len(buffer.ready) >= size or (buffer.ready and buffer.ready_bytes >= MAX_BYTES_PER_COMMIT):
                _commit(*buffer.take_ready(size), tables, store, info, lock, bar)
        rest = buffer.rest()  # the execution is over: every shard is complete
        for i in range(0, len(rest), size):
            _commit(rest[i:i + size], buffer.take(rest[i:i + size]), tables, store, info, lock, bar)
    finally:
        if bar is not None:
            bar.close()


def _commit(group: list[str], parts: list[pa.Table], tables: Tables, store: OutputStore, info: dict, lock,
            bar) -> None:
    """Whole shards into the tables: their quarantine rows, then their vectors (the module doc
    says why in this order), then embed.json for those without a vector."""
    if not group:
        return
    vectors, quarantined = split_rows(parts, tables)
    lock.ensure_held()
    tables.append(tables.quarantine, quarantined)
    tables.append(tables.vectors, vectors)
    with_vectors = set(vectors.column("shard").to_pylist())
    info["shards_without_vectors"] += [s for s in group if s not in with_vectors]
    store.write_json(INFO_FILE, info)
    if bar is not None:
        bar.update(len(group))


def split_rows(parts: list[pa.Table], tables: Tables) -> tuple[pa.Table, pa.Table]:
    """The actors' rows -> (the vector table's rows, the quarantine's rows), in their schemas."""
    vec_schema, q_schema = tables.schemas[tables.vectors], tables.schemas[tables.quarantine]
    if not parts:
        return vec_schema.empty_table(), q_schema.empty_table()
    rows = pa.concat_tables(parts, promote_options="permissive")
    ids = pc.binary_join_element_wise(rows["source"], rows["key"], "#")
    rows = rows.append_column("id", ids).append_column("shard", rows["source"])
    bad = pc.not_equal(rows["reason"], "")
    vectors = rows.filter(pc.invert(bad)).select(vec_schema.names).cast(vec_schema)
    quarantined = rows.filter(bad).select(q_schema.names).cast(q_schema)
    return vectors, quarantined


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc="embed", dynamic_ncols=True)


def _index_summary(index: dict) -> str:
    """`ensure_index`'s answer, per vector column: "image_vector IVF_PQ, ..." or "exact search"."""
    built = [f"{col} {v.get('index')}" for col, v in sorted(index.items()) if isinstance(v, dict) and v.get("built")]
    return ", ".join(built) or "exact search"


def format_summary(info: dict, output: str) -> str:
    c, run = info["counts"], info.get("this_run", {})
    reasons = ", ".join(f"{r} {n}" for r, n in c["quarantined_by_reason"].items())
    index = info.get("index") or {}
    return (f"embed -> {output}: {c['embedded']} samples embedded, {c['quarantined']} quarantined"
            + (f" ({reasons})" if reasons else "")
            + f"; {run.get('embedded_shards', 0)} shards embedded now, {run.get('skipped_shards', 0)} already done"
            + (f"; index: {_index_summary(index)}" if index else "")
            + f"; {run.get('seconds', 0):.1f} s")
