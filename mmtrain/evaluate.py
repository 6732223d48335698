"""Evaluation: cross-modal retrieval recall@k for every direction present, and caption loss.

Runs on the driver with the consolidated weights of the run's latest checkpoint (the
same weights `export` writes), reading the evaluation shards through the training ingest,
so evaluation sees exactly the transforms training saw.
"""
from __future__ import annotations

import json
import os

import torch

from pipelines.dataset import check_preprocessed
from pipelines.errors import UserError
from pipelines.shards import expand_shards

from .batch import Collate
from .checkpoint.location import run_store
from .export import load_latest
from .model import build_model
from .tokenizer import load_tokenizer

MODALITIES = ("image", "text", "audio")
KS = (1, 5)


def recall_at_k(query: torch.Tensor, target: torch.Tensor, ks=KS) -> dict[int, float]:
    """Row i of `query` should retrieve row i of `target` (L2-normalized embeddings)."""
    sim = query @ target.T
    correct = sim.diagonal().unsqueeze(1)
    rank = (sim > correct).sum(dim=1)  # how many candidates score strictly higher
    return {k: float((rank < k).float().mean()) for k in ks}


def evaluate(run_dir: str, data: list[str], *, output: str | None = None, batch_size: int = 64,
             storage_options: dict | None = None, checkpoint: str | None = None) -> dict:
    """A flat dict: `image_to_text/recall@1`, ... for every direction with both modalities
    present in at least 2 samples, `caption_loss`, and the sample counts. `storage_options`
    reach the data, and the checkpoints (default: the options the run was trained with)."""
    from pipelines.ingest import build_dataset
    from pipelines.runtime import init_ray

    from .config import RunConfig

    checkpoint, run, weights = load_latest(run_store(run_dir, storage_options), checkpoint)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to evaluate; train first")
    cfg = RunConfig.from_dict({**run, "storage_options": storage_options or {}})
    model = build_model(cfg.model)
    model.load_state_dict(weights, strict=True)
    model.eval()
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))

    shards = expand_shards(list(data), storage_options)
    preprocessed = check_preprocessed(shards, cfg.data, storage_options)
    init_ray()
    ds = build_dataset(shards, cfg.data, seed=cfg.seed, preprocessed=preprocessed, storage_options=storage_options)
    collate = Collate(tokenizer, batch_size, cfg.model.max_text_len, cfg.data.image.size, cfg.data.audio.n_mels,
                      cfg.data.audio.num_frames)
    embs, present, caption_loss = _embed(model, (collate(rows) for rows in ds.iter_batches(
        batch_size=batch_size, batch_format="numpy")))
    if embs is None:
        raise UserError(f"no samples to evaluate in {', '.join(data)}")
    result: dict = {"samples": int(len(embs["image"])), "checkpoint": os.path.basename(checkpoint),
                    **_recalls(embs, present)}
    if caption_loss is not None:
        result["caption_loss"] = round(caption_loss, 4)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
    return result


def _embed(model, batches) -> tuple[dict | None, dict | None, float | None]:
    """Every sample's embedding and presence per modality, and the mean caption loss over the
    rows that have a caption and something to caption; (None, None, None) without samples."""
    embs = {m: [] for m in MODALITIES}
    present = {m: [] for m in MODALITIES}
    caption_sum, caption_rows = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = len(batch.pop("ids"))
            enc = model.encode(batch)
            for m in MODALITIES:
                embs[m].append(enc[m][:n].float())
                present[m].append(batch[f"{m}_present"][:n])
            rows_with_caption = int((batch["text_present"] & (batch["image_present"] | batch["audio_present"])).sum())
            if rows_with_caption:
                caption_sum += float(model.caption_loss(batch)) * rows_with_caption
                caption_rows += rows_with_caption
    if not embs["image"]:
        return None, None, None
    return ({m: torch.cat(v) for m, v in embs.items()}, {m: torch.cat(v).bool() for m, v in present.items()},
            caption_sum / caption_rows if caption_rows else None)


def _recalls(embs: dict, present: dict) -> dict:
    """recall@k and the candidate count of every direction with both modalities in 2+ samples."""
    result = {}
    for q in MODALITIES:
        for t in MODALITIES:
            both = present[q] & present[t]
            if q == t or int(both.sum()) < 2:
                continue
            for k, r in recall_at_k(embs[q][both], embs[t][both]).items():
                result[f"{q}_to_{t}/recall@{k}"] = round(r, 4)
            result[f"{q}_to_{t}/candidates"] = int(both.sum())
    return result
