"""Embedding at scale on Ray Data: decoded rows stream through `map_batches` into a pool of
actors, each holding one copy of the model (Ray's batch-inference pattern), on GPUs when
asked. `embed`, `classify` and `evaluate` all embed through `embedded_rows`."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .schema import MODALITIES, VECTOR_COLUMNS


class EmbedActor:
    """`map_batches` callable class: loads the model once per actor, then embeds decoded rows
    (`pipelines.ingest.decode_batch`'s arrays) into one row each: source, key, caption (null
    without one) and a vector per modality (null where the row lacks it)."""

    def __init__(self, model_path: str, storage_options: dict | None = None):
        import ray
        import torch

        from .loaded import load_model

        # the device comes from Ray: an actor given a GPU sees only its own (CUDA_VISIBLE_DEVICES)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.loaded = load_model(model_path, device=device, storage_options=storage_options)

    def __call__(self, rows: dict[str, np.ndarray]) -> pa.Table:
        from .inputs import embed_rows

        return vectors_table(rows, embed_rows(rows, self.loaded), self.loaded.embed_dim)


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
    return ds.map_batches(EmbedActor, fn_constructor_kwargs={"model_path": model_path,
                                                            "storage_options": storage_options},
                          batch_size=batch_size, batch_format="numpy", concurrency=workers,
                          num_cpus=1, num_gpus=gpus_per_worker or None)
