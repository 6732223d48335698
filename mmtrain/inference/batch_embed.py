"""Embedding at scale on Ray Data: decoded rows stream through `map_batches` into a pool of
actors, each holding one copy of the model (Ray's batch-inference pattern), on GPUs when
asked. `embed`, `classify` and `evaluate` all embed through `embedded_rows`; the `embed` job
embeds through `embedded_or_quarantined`, which keeps the rows that fail to decode (with
their reason) instead of dropping them."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from .schema import MODALITIES, VECTOR_COLUMNS

log = logging.getLogger(__name__)

# a row that could not be embedded carries its pipelines.reasons code and a detail line in
# these columns ("" on a good row) from the decode step through the actors
ERROR_COLUMNS = ("reason", "detail")


class EmbedActor:
    """`map_batches` callable class: loads the model once per actor, then embeds decoded rows
    (`pipelines.ingest.decode_batch`'s arrays) into one row each: source, key, caption (null
    without one) and a vector per modality (null where the row lacks it). Rows with a
    non-empty `reason` (from `decode_keeping_errors`) are not embedded: they come out with
    null vectors and their `reason` and `detail`."""

    def __init__(self, model_path: str, storage_options: dict | None = None):
        import ray
        import torch

        from .loaded import load_model

        # the device comes from Ray: an actor given a GPU sees only its own (CUDA_VISIBLE_DEVICES)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.loaded = load_model(model_path, device=device, storage_options=storage_options)

    def __call__(self, rows: dict[str, np.ndarray]) -> pa.Table:
        from .inputs import embed_rows

        dim = self.loaded.embed_dim
        if "reason" not in rows:
            return vectors_table(rows, embed_rows(rows, self.loaded), dim)
        good = np.array([not r for r in rows["reason"]], bool)
        emb = {m: np.zeros((len(good), dim), np.float32) for m in MODALITIES}
        if good.any():
            for m, e in embed_rows({k: v[good] for k, v in rows.items()}, self.loaded).items():
                emb[m][good] = e
        table = vectors_table(rows, emb, dim)  # a bad row has no modality present: null vectors
        for c in ERROR_COLUMNS:
            table = table.append_column(c, pa.array([str(v) for v in rows[c]], pa.string()))
        if "shard_rows" in rows:  # the reader's shard-end marks, for a consumer that commits whole shards
            table = table.append_column("shard_rows", pa.array(np.asarray(rows["shard_rows"], np.int64)))
        return table


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
    (the training ingest's reading and decoding, then `workers` EmbedActors)."""
    from pipelines.ingest import build_dataset

    ds = build_dataset(shards, data_cfg, seed=0, preprocessed=preprocessed, storage_options=storage_options)
    return _embedded(ds, model_path, workers, batch_size, gpus_per_worker, storage_options)


def embedded_or_quarantined(model_path: str, shards: list[str], data_cfg, *, preprocessed: bool, workers: int = 2,
                            batch_size: int = 64, gpus_per_worker: float = 0,
                            storage_options: dict | None = None, mark_shard_ends: bool = False):
    """A lazy Ray Dataset with one row per sample the reader yields from `shards`: a good
    one's `vectors_table` row with reason "", a bad one (the reader's error, a failed decode,
    a filter rule) with null vectors and its reason code and detail. Nothing is dropped.
    `mark_shard_ends`: a `shard_rows` column (`WebDatasetDatasource`) rides along."""
    ds = decoded_keeping_errors(shards, data_cfg, preprocessed=preprocessed, storage_options=storage_options,
                                mark_shard_ends=mark_shard_ends)
    return _embedded(ds, model_path, workers, batch_size, gpus_per_worker, storage_options)


def decoded_keeping_errors(shards: list[str], data_cfg, *, preprocessed: bool, storage_options: dict | None = None,
                           mark_shard_ends: bool = False):
    """A lazy Ray Dataset of `decode_keeping_errors` rows: one per sample the reader yields,
    a bad one with its reason (the model jobs report it instead of dropping it)."""
    import ray

    from pipelines.datasource import WebDatasetDatasource
    from pipelines.ingest import PREPROCESSED_COLUMNS, RAW_COLUMNS
    from pipelines.shards import shard_sizes
    from pipelines.tarheaders import ReadLimits

    source = WebDatasetDatasource(shards, modalities=PREPROCESSED_COLUMNS if preprocessed else RAW_COLUMNS,
                                  storage_options=storage_options, limits=ReadLimits.from_config(data_cfg),
                                  include_errors=True, rows_per_block=16,
                                  shard_sizes=shard_sizes(shards, storage_options), mark_shard_ends=mark_shard_ends)
    ds = ray.data.read_datasource(source, override_num_blocks=len(shards), num_cpus=0.25)
    return ds.map_batches(decode_keeping_errors, fn_kwargs={"cfg": data_cfg}, batch_format="pyarrow",
                          batch_size=16, num_cpus=0.5)


def _embedded(ds, model_path, workers, batch_size, gpus_per_worker, storage_options):
    return ds.map_batches(EmbedActor, fn_constructor_kwargs={"model_path": model_path,
                                                            "storage_options": storage_options},
                          batch_size=batch_size, batch_format="numpy", concurrency=workers,
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
