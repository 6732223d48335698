"""Captioning: the caption decoder's text for decoded rows (`caption_rows`), and the job that
captions a whole corpus on Ray Data (`caption`): the training ingest reads and decodes the
shards, a pool of `CaptionActor`s (one model each, on GPUs when asked: Ray's batch-inference
pattern, as `batch_embed.EmbedActor`) generates, and the driver streams the rows into one
JSON-lines file, written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.errors import UserError
from pipelines.settings import Settings

from .loaded import LoadedModel


def caption_rows(loaded: LoadedModel, rows: dict[str, np.ndarray], max_len: int | None = None,
                 beams: int = 1) -> list[str]:
    """A caption per row (`rows_from_items` / `decode_batch` arrays), in order: beam search
    (beams=1: greedy) from the row's image and audio; "" for a row with neither."""
    from ..model.generation import beam_search
    from .inputs import model_batch

    n = len(rows["key"])
    if n == 0:
        return []
    tok = loaded.tokenizer
    ids = beam_search(loaded.model, model_batch(rows, loaded), max_len, beams, tok.bos_id, tok.eos_id)
    return [caption_text(tok, row) for row in ids[:n].tolist()]


def caption_text(tokenizer, ids: list[int]) -> str:
    """The text of generated ids: after BOS, up to the first EOS."""
    body = ids[1:]
    if tokenizer.eos_id in body:
        body = body[:body.index(tokenizer.eos_id)]
    return tokenizer.decode(body)


class CaptionActor:
    """`map_batches` callable class: loads the model once per actor, then turns decoded rows
    into (key, source, caption, reason, detail) rows. A row that could not be read or decoded
    (a non-empty `reason` from `decode_keeping_errors`) keeps its reason and has no caption."""

    def __init__(self, model_path: str, storage_options: dict | None = None, max_len: int | None = None,
                 beams: int = 1):
        import ray
        import torch

        from .loaded import load_model

        # the device comes from Ray: an actor given a GPU sees only its own (CUDA_VISIBLE_DEVICES)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.loaded = load_model(model_path, device=device, storage_options=storage_options)
        self.max_len, self.beams = max_len, beams

    def __call__(self, rows: dict[str, np.ndarray]) -> pa.Table:
        n = len(rows["key"])
        reasons = [str(r) for r in rows["reason"]] if "reason" in rows else [""] * n
        good = np.array([not r for r in reasons], bool)
        captions: list[str | None] = [None] * n
        if good.any():
            made = caption_rows(self.loaded, {k: v[good] for k, v in rows.items()}, self.max_len, self.beams)
            for i, text in zip(np.flatnonzero(good), made):
                captions[i] = text
        details = [str(d) for d in rows["detail"]] if "detail" in rows else [""] * n
        return pa.table({"key": pa.array([str(k) for k in rows["key"]], pa.string()),
                         "source": pa.array([str(s) for s in rows["source"]], pa.string()),
                         "caption": pa.array(captions, pa.string()),
                         "reason": pa.array(reasons, pa.string()), "detail": pa.array(details, pa.string())})


@dataclass(frozen=True)
class CaptionSettings(Settings):
    LABEL = "caption settings"

    max_len: int | None = None      # tokens, BOS and EOS included; None: the model's max_text_len
    beams: int = 1
    workers: int = 2                # model actors
    batch_size: int = 32            # rows per generation call
    gpus_per_worker: float = 0.0

    def checks(self):
        yield self.beams >= 1, f"--beams must be at least 1, got {self.beams}"
        yield self.max_len is None or self.max_len >= 2, \
            f"--max-len must be at least 2 (room for BOS and EOS), got {self.max_len}"
        yield self.workers >= 1, f"--workers must be at least 1, got {self.workers}"
        yield self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"
        yield self.gpus_per_worker >= 0, f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}"


def caption(model: str, data: list[str], output: str, max_len: int | None = None, beams: int = 1,
            workers: int = 2, batch_size: int = 32, gpus_per_worker: float = 0,
            storage_options: dict | None = None, progress: bool = True) -> dict:
    """Caption every sample of `data` (raw or preprocessed shards) with `model` (a run directory
    or an exported .safetensors) into `output`, one JSON line per sample: key, source, caption.
    Returns the counts, settings and two example lines. `progress`: a bar in samples on stderr."""
    from ray.data import ActorPoolStrategy

    from pipelines.dataset import check_preprocessed, shard_counts
    from pipelines.runtime import init_ray
    from pipelines.shards import expand_shards
    from pipelines.storage import OutputStore, is_local

    from .batch_embed import actor_cpus, decoded_keeping_errors

    from .loaded import load_model

    settings = CaptionSettings(max_len=max_len, beams=beams, workers=workers, batch_size=batch_size,
                               gpus_per_worker=gpus_per_worker)
    folder, name = _output_place(output)
    if is_local(model):  # the actors' working folder is not the driver's
        model = os.path.abspath(model.removeprefix("file://"))
    # on the driver too: a path that is not a model is its one line before any work starts
    loaded = load_model(model, device="cpu", storage_options=storage_options)
    shards = expand_shards(list(data), storage_options)
    if f"{folder}/{name}" in shards:
        raise UserError(f"--output {output} is one of the input shards")
    preprocessed = check_preprocessed(shards, loaded.data_cfg, storage_options)
    expected = sum((shard_counts(shards, storage_options) or {}).values()) if preprocessed else None
    init_ray(dashboard=False)  # Ray Data only: see init_ray
    start = time.monotonic()
    # every sample the reader yields, a bad one with its reason: a line in the output, not a gap
    ds = decoded_keeping_errors(shards, loaded.data_cfg, preprocessed=preprocessed, storage_options=storage_options)
    ds = ds.map_batches(CaptionActor, fn_constructor_kwargs={
        "model_path": model, "storage_options": storage_options, "max_len": settings.max_len,
        "beams": settings.beams}, batch_size=settings.batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=settings.workers), num_cpus=actor_cpus(settings.workers, settings.gpus_per_worker),
        num_gpus=settings.gpus_per_worker or None)
    with OutputStore(folder, storage_options).open_atomic(name) as f:
        samples, empty, rejected, examples = _write_lines(ds, f, expected, progress)
    cap = loaded.model_cfg.max_text_len
    return {"output": output, "samples": samples, "empty_captions": empty, "rejected": rejected, "expected": expected,
            "model": loaded.origin, "beams": settings.beams, "max_len": min(settings.max_len or cap, cap),
            "seconds": round(time.monotonic() - start, 2), "examples": examples}


def _write_lines(ds, f, total: int | None, progress: bool) -> tuple[int, int, int, list[dict]]:
    """The dataset's rows as JSON lines into `f`, as they arrive (in no set order): how many,
    how many with an empty caption, how many could not be read or decoded (their line has
    caption null, `reason` and `detail`), and the first two with a caption."""
    from tqdm import tqdm

    samples, empty, rejected, examples = 0, 0, 0, []
    with tqdm(total=total, unit="sample", desc="caption", dynamic_ncols=True, disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row["reason"]:
                    rejected += 1
                else:
                    del row["reason"], row["detail"]
                    empty += not row["caption"]
                    if row["caption"] and len(examples) < 2:
                        examples.append(row)
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            samples += batch.num_rows
            bar.update(batch.num_rows)
    return samples, empty, rejected, examples


def _output_place(output: str) -> tuple[str, str]:
    """(folder, file name) of the output, the folder as `expand_shards` names it (an absolute
    path on local disk); a local folder must exist, and the output must not be a folder."""
    from pipelines.storage import is_local

    if is_local(output):
        path = os.path.abspath(output.removeprefix("file://"))
        if os.path.isdir(path):
            raise UserError(f"--output {output} is a folder: name the .jsonl file to write")
        if not os.path.isdir(os.path.dirname(path)):
            raise UserError(f"--output {output}: the folder {os.path.dirname(path)} does not exist")
        return os.path.dirname(path), os.path.basename(path)
    folder, _, name = output.rstrip("/").rpartition("/")
    return folder, name

