"""Embedding at scale on Ray Data: sample rows stream through `map_batches` into a pool of
actors, each holding one copy of the model (Ray's batch-inference pattern), on GPUs when
asked. `evaluate` embeds through `embedded_rows` (rows that do not decode are left out, each
with a warning); the `embed` and `classify` jobs through `embedded_or_quarantined`, which keeps
them with their reason. On CPUs an actor decodes its rows itself (see `_embedded`)."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from .schema import MODALITIES, VECTOR_COLUMNS

log = logging.getLogger(__name__)

# a row that could not be embedded carries its pipelines.reasons code and a detail line in
# these columns ("" on a good row) from the decode step through the actors
ERROR_COLUMNS = ("reason", "detail")

# Rows per read block. The embedding jobs balance nothing between consumers by blocks (the
# training ingest's 16-row blocks are for that): bigger blocks mean fewer Ray objects and
# scheduling steps per sample. A block of compressed members stays small (~3 MB at 64 rows).
ROWS_PER_BLOCK = 64


class EmbedActor:
    """`map_batches` callable class: loads the model once per actor, then embeds rows into one
    row each: source, key, caption (null without one) and a vector per modality (null where the
    row lacks it). Rows are `decode_keeping_errors`'s arrays, or with `decode` (a DataConfig)
    the reader's rows, which the actor decodes with `decode_keeping_errors` itself. A row with
    a non-empty `reason` is not embedded: with `keep_errors` it comes out with null vectors and
    its `reason` and `detail`, else it is left out with a warning naming it."""

    def __init__(self, model_path: str, storage_options: dict | None = None, decode=None, keep_errors: bool = True):
        import ray
        import torch

        from .loaded import load_model

        # the device comes from Ray: an actor given a GPU sees only its own (CUDA_VISIBLE_DEVICES)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.loaded = load_model(model_path, device=device, storage_options=storage_options)
        self.decode, self.keep_errors = decode, keep_errors

    def __call__(self, batch) -> pa.Table:
        from .inputs import embed_rows

        rows = decode_keeping_errors(batch, self.decode) if self.decode is not None else batch
        dim = self.loaded.embed_dim
        good = np.array([not r for r in rows["reason"]], bool)
        if not self.keep_errors:
            for i in np.flatnonzero(~good):
                log.warning("skipping sample %s#%s: %s: %s", rows["source"][i], rows["key"][i], rows["reason"][i],
                            rows["detail"][i])
            rows = _only(rows, good, drop=(*ERROR_COLUMNS, "shard_rows"))
            return vectors_table(rows, embed_rows(rows, self.loaded), dim)
        emb = {m: np.zeros((len(good), dim), np.float32) for m in MODALITIES}
        if good.any():
            for m, e in embed_rows(_only(rows, good), self.loaded).items():
                emb[m][good] = e
        table = vectors_table(rows, emb, dim)  # a bad row has no modality present: null vectors
        for c in ERROR_COLUMNS:
            table = table.append_column(c, pa.array([str(v) for v in rows[c]], pa.string()))
        if "shard_rows" in rows:  # the reader's shard-end marks, for a consumer that commits whole shards
            table = table.append_column("shard_rows", pa.array(np.asarray(rows["shard_rows"], np.int64)))
        return table


def _only(rows: dict[str, np.ndarray], keep: np.ndarray, drop=()) -> dict[str, np.ndarray]:
    """The rows where `keep`, without the `drop` columns; no copy when every row is kept (a
    batch's pixels and log-mels are ~20 MB)."""
    every = bool(keep.all())
    return {k: v if every else v[keep] for k, v in rows.items() if k not in drop}


def vectors_table(rows: dict[str, np.ndarray], emb: dict[str, np.ndarray], dim: int) -> pa.Table:
    """source, key, caption and the per-modality vector columns (FixedSizeList<float32, dim>,
    null where `rows[f"{m}_present"]` is False)."""
    cols = {
        "source": pa.array([str(s) for s in rows["source"]], pa.string()),
        "key": pa.array([str(k) for k in rows["key"]], pa.string()),
        "caption": pa.array([str(t) if p else None for t, p in zip(rows["text"], rows["text_present"])], pa.string()),
    }
    for m in MODALITIES:
        values = pa.array(np.ascontiguousarray(emb[m], np.float32).reshape(-1), pa.float32())
        mask = pa.array(~np.asarray(rows[f"{m}_present"], bool))
        cols[VECTOR_COLUMNS[m]] = pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)
    return pa.table(cols)


def embedded_rows(model_path: str, shards: list[str], data_cfg, *, preprocessed: bool, workers: int = 2,
                  batch_size: int = 64, gpus_per_worker: float = 0, storage_options: dict | None = None):
    """A lazy Ray Dataset of `vectors_table` rows for every sample of `shards` that decodes
    (a sample that does not is left out with a warning naming it and its reason)."""
    ds = read_rows(shards, data_cfg, preprocessed=preprocessed, storage_options=storage_options,
                   readers=_readers(workers, gpus_per_worker))
    return _embedded(ds, model_path, data_cfg, workers, batch_size, gpus_per_worker, storage_options,
                     keep_errors=False)


def embedded_or_quarantined(model_path: str, shards: list[str], data_cfg, *, preprocessed: bool, workers: int = 2,
                            batch_size: int = 64, gpus_per_worker: float = 0,
                            storage_options: dict | None = None, mark_shard_ends: bool = False):
    """A lazy Ray Dataset with one row per sample the reader yields from `shards`: a good
    one's `vectors_table` row with reason "", a bad one (the reader's error, a failed decode,
    a filter rule) with null vectors and its reason code and detail. Nothing is dropped.
    `mark_shard_ends`: a `shard_rows` column (`WebDatasetDatasource`) rides along."""
    ds = read_rows(shards, data_cfg, preprocessed=preprocessed, storage_options=storage_options,
                   mark_shard_ends=mark_shard_ends, readers=_readers(workers, gpus_per_worker))
    return _embedded(ds, model_path, data_cfg, workers, batch_size, gpus_per_worker, storage_options,
                     keep_errors=True)


def _readers(workers: int, gpus_per_worker: float) -> int | None:
    """Read tasks at once: on CPUs one per model actor. Reading a sample costs a tenth of
    embedding it, and every read task in flight holds a Ray worker process of its own (~2
    CPU-s to start, measured in benchmarks/README.md). GPU actors take as many as Ray runs."""
    return None if gpus_per_worker else workers


def read_rows(shards: list[str], data_cfg, *, preprocessed: bool, storage_options: dict | None = None,
              mark_shard_ends: bool = False, readers: int | None = None):
    """A lazy Ray Dataset of the reader's rows (compressed members; an error row with its
    reason), one read task per shard, at most `readers` at once (None: as many as Ray runs)."""
    import ray
    from ray.data import TaskPoolStrategy

    from pipelines.datasource import WebDatasetDatasource
    from pipelines.ingest import PREPROCESSED_COLUMNS, RAW_COLUMNS
    from pipelines.shards import shard_sizes
    from pipelines.tarheaders import ReadLimits

    source = WebDatasetDatasource(shards, modalities=PREPROCESSED_COLUMNS if preprocessed else RAW_COLUMNS,
                                  storage_options=storage_options, limits=ReadLimits.from_config(data_cfg),
                                  include_errors=True, rows_per_block=ROWS_PER_BLOCK,
                                  shard_sizes=shard_sizes(shards, storage_options), mark_shard_ends=mark_shard_ends)
    return ray.data.read_datasource(source, override_num_blocks=len(shards), num_cpus=0.25,
                                    compute=TaskPoolStrategy(size=readers) if readers else None)


def decoded_keeping_errors(shards: list[str], data_cfg, *, preprocessed: bool, storage_options: dict | None = None,
                           mark_shard_ends: bool = False):
    """A lazy Ray Dataset of `decode_keeping_errors` rows: one per sample the reader yields,
    a bad one with its reason (the model jobs report it instead of dropping it)."""
    ds = read_rows(shards, data_cfg, preprocessed=preprocessed, storage_options=storage_options,
                   mark_shard_ends=mark_shard_ends)
    return _decoded(ds, data_cfg)


def _decoded(ds, data_cfg):
    return ds.map_batches(decode_keeping_errors, fn_kwargs={"cfg": data_cfg}, batch_format="pyarrow",
                          batch_size=16, num_cpus=0.5)


def _embedded(ds, model_path, data_cfg, workers, batch_size, gpus_per_worker, storage_options, *, keep_errors):
    """`ds` (the reader's rows) through `workers` EmbedActors. On CPUs each actor decodes its
    own rows: a decoded sample (224x224x3 pixels and a log-mel, ~310 KB) then never goes
    through Ray's object store, and no decode task competes with the actors for the same cores
    (measured in benchmarks/README.md). With GPUs, CPU tasks decode, so that the
    CPUs of the node, not the one per GPU actor, keep the GPUs fed."""
    from ray.data import ActorPoolStrategy

    actor_args = {"model_path": model_path, "storage_options": storage_options, "keep_errors": keep_errors}
    if gpus_per_worker:
        ds, batch_format = _decoded(ds, data_cfg), "numpy"
    else:
        actor_args["decode"], batch_format = data_cfg, "pyarrow"
    return ds.map_batches(EmbedActor, fn_constructor_kwargs=actor_args, batch_size=batch_size,
                          batch_format=batch_format, compute=ActorPoolStrategy(size=workers),
                          num_cpus=actor_cpus(workers, gpus_per_worker), num_gpus=gpus_per_worker or None)


def actor_cpus(workers: int, gpus_per_worker: float) -> float:
    """Logical CPUs per model actor (embed, classify, caption, evaluate): one each, unless the
    actors would take every CPU of an embedded Ray. Ray Data then never schedules the read and
    decode tasks that feed them (2 actors on a 2-core laptop wait for ever); there the actors
    share what is left after one CPU for reading and decoding (logical CPUs are a scheduling
    budget: the actors' threads and the decode tasks share the real cores either way). On a
    cluster one each: an autoscaler adds nodes for them."""
    from pipelines.runtime import cluster_cpus, is_embedded

    if not is_embedded():
        return 1.0
    return cpus_per_actor(workers, cluster_cpus())


def cpus_per_actor(workers: int, cpus: int) -> float:
    """1, or an equal share of all but one of `cpus` when `workers` whole CPUs leave none."""
    return 1.0 if workers + 1 <= cpus else max(0.1, (cpus - 1) / workers)


def decode_keeping_errors(batch: pa.Table, cfg) -> dict[str, np.ndarray]:
    """`pipelines.ingest.decode_batch`'s arrays (the same decoding, the same dtypes) for every
    row, with `reason` and `detail` columns: a row the reader marked as an error, or whose
    decoding raises a SampleError, has its code there and no modality present. An unexpected
    exception is `internal_error`, logged with its traceback (a bug: it must not end the job,
    nor lose the sample)."""
    from pipelines.ingest import _decode_row
    from pipelines.reasons import INTERNAL_ERROR, SampleError

    size, n_mels, frames = cfg.image.size, cfg.audio.n_mels, cfg.audio.num_frames
    rows = batch.to_pylist()
    n = len(rows)
    out = {
        "key": np.array([r["key"] for r in rows], dtype=object), "source": np.array([r["source"] for r in rows], dtype=object),
        "epoch": np.zeros(n, np.int32),
        "image": np.zeros((n, size, size, 3), np.uint8), "image_present": np.zeros(n, bool),
        "text": np.array([""] * n, dtype=object), "text_present": np.zeros(n, bool),
        "mel": np.zeros((n, n_mels, frames), np.float16), "mel_frames": np.zeros(n, np.int32),
        "audio_present": np.zeros(n, bool),
        "reason": np.array([""] * n, dtype=object), "detail": np.array([""] * n, dtype=object),
    }
    if "shard_rows" in batch.column_names:  # passed through: see WebDatasetDatasource
        out["shard_rows"] = np.asarray(batch.column("shard_rows").to_numpy(zero_copy_only=False), np.int64)
    for i, row in enumerate(rows):
        if row.get("error"):
            out["reason"][i], out["detail"][i] = row["error"], row.get("error_detail") or ""
            continue
        try:
            image, text, mel, mel_frames = _decode_row(row, cfg)
        except SampleError as e:  # SampleFiltered too: a filter rule's reason
            out["reason"][i], out["detail"][i] = e.reason, e.detail
            continue
        except Exception as e:  # MemoryError too; KeyboardInterrupt and SystemExit go through
            log.error("unexpected %s decoding sample %s#%s (quarantined as %s)", type(e).__name__,
                      row["source"], row["key"], INTERNAL_ERROR, exc_info=e)
            out["reason"][i] = INTERNAL_ERROR
            out["detail"][i] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
            continue
        if image is not None:
            out["image"][i], out["image_present"][i] = image, True
        if text is not None:
            out["text"][i], out["text_present"][i] = text, True
        if mel is not None:
            t = min(frames, mel.shape[1])
            out["mel"][i, :, :t] = mel[:, :t]
            out["mel_frames"][i], out["audio_present"][i] = min(mel_frames, t), True
    return out
