"""A user's raw inputs -> a model batch, with exactly the transforms training saw.

An item is a dict with one or more of "text" (str), "image" (encoded bytes: JPEG, PNG,
WebP) and "audio" (encoded bytes: WAV, FLAC, OGG, MP3). Every item goes through the
preprocessing transform (`pipelines.transform.transform_modalities`: the same crop, caption
normalization and log-mel, the same limits), so a hostile upload is refused the way a
hostile shard member is: a `BadInput` naming the item and the reason, never a crash.
"""
from __future__ import annotations

import numpy as np
import torch

from pipelines.reasons import SampleError
from pipelines.transform import Processed, transform_modalities

from ..batch import Collate
from ..model.config import PAD_ID
from .loaded import LoadedModel

MODALITIES = ("image", "text", "audio")


class BadInput(ValueError):
    """An input the model cannot take: its one-line message says which and why (HTTP 4xx)."""


def rows_from_items(items: list[dict], loaded: LoadedModel) -> dict[str, np.ndarray]:
    """The items as the training ingest's decoded rows (`pipelines.ingest.decode_batch`'s
    arrays), in order."""
    cfg = loaded.data_cfg
    size, n_mels, frames = cfg.image.size, cfg.audio.n_mels, cfg.audio.num_frames
    n = len(items)
    out = {
        "key": np.array([str(i) for i in range(n)], dtype=object), "source": np.array(["input"] * n, dtype=object),
        "epoch": np.zeros(n, np.int32),
        "image": np.zeros((n, size, size, 3), np.uint8), "image_present": np.zeros(n, bool),
        "text": np.array([""] * n, dtype=object), "text_present": np.zeros(n, bool),
        "mel": np.zeros((n, n_mels, frames), np.float32), "mel_frames": np.zeros(n, np.int32),
        "audio_present": np.zeros(n, bool),
    }
    for i, item in enumerate(items):
        p = _transform(i, item, cfg)
        if p.image is not None:
            out["image"][i], out["image_present"][i] = p.image, True
        if p.text is not None:
            out["text"][i], out["text_present"][i] = p.text, True
        if p.mel is not None:
            t = min(frames, p.mel.shape[1])
            out["mel"][i, :, :t] = p.mel[:, :t]
            out["mel_frames"][i], out["audio_present"][i] = min(p.mel_frames, t), True
    return out


def _transform(i: int, item: dict, cfg) -> Processed:
    if not isinstance(item, dict) or not item:
        raise BadInput(f"input {i}: expected an object with text, image or audio")
    unknown = sorted(set(item) - set(MODALITIES))
    if unknown:
        raise BadInput(f"input {i}: unknown field(s) {', '.join(unknown)} (expected text, image or audio)")
    chosen: dict[str, tuple[str, bytes]] = {}
    if "text" in item:
        if not isinstance(item["text"], str) or not item["text"].strip():
            raise BadInput(f"input {i}: text must be a non-empty string")
        chosen["text"] = ("txt", item["text"].encode("utf-8", errors="replace"))
    for m, ext in (("image", "jpg"), ("audio", "wav")):  # the format is sniffed from the bytes
        if m in item:
            if not isinstance(item[m], (bytes, bytearray)) or not item[m]:
                raise BadInput(f"input {i}: {m} must be non-empty encoded bytes")
            chosen[m] = (ext, bytes(item[m]))
    try:
        return transform_modalities(Processed(str(i), "input", i), chosen, cfg)
    except SampleError as e:  # SampleFiltered too: too small, too long, ...
        raise BadInput(f"input {i}: {e}") from None


def model_batch(rows: dict[str, np.ndarray], loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Decoded rows -> the model's batch on the model's device (Collate: the training batch)."""
    cfg, n = loaded.data_cfg, len(rows["key"])
    collate = Collate(loaded.tokenizer, max(1, n), loaded.model_cfg.max_text_len, cfg.image.size, cfg.audio.n_mels,
                      cfg.audio.num_frames)
    batch = trimmed(collate(rows), loaded.model_cfg.audio_stride)
    batch.pop("ids", None)
    return {k: v.to(loaded.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def trimmed(batch: dict, audio_stride: int) -> dict:
    """The batch without the padding no row reaches: token ids cut after the longest caption
    (text is right-padded and masked), log-mels one audio token past the longest clip (the
    audio stem's kernel-3 conv reads that token, all padding, as it does in a full-length
    batch; later tokens are masked). The embeddings and captions are the same, float rounding
    aside, for less work: spoken captions are mostly far shorter than the 10 s a mel holds."""
    ids = batch["text_ids"]
    if ids.numel():
        batch["text_ids"] = ids[:, :max(1, int((ids != PAD_ID).sum(dim=1).max()))]
    mel, frames = batch["mel"], batch["mel_frames"]
    if frames.numel():
        tokens = -(-int(frames.max()) // audio_stride)
        batch["mel"] = mel[..., :min(mel.shape[-1], (tokens + 1) * audio_stride)]
    return batch


@torch.no_grad()
def embed_rows(rows: dict[str, np.ndarray], loaded: LoadedModel) -> dict[str, np.ndarray]:
    """L2-normalized float32 embeddings [n, embed_dim] per modality; a modality a row lacks is
    NaN-free zeros there, and `rows[f"{m}_present"]` says which rows have it."""
    n = len(rows["key"])
    if n == 0:
        return {m: np.zeros((0, loaded.embed_dim), np.float32) for m in MODALITIES}
    enc = loaded.model.encode(model_batch(rows, loaded))
    return {m: enc[m][:n].float().cpu().numpy() for m in MODALITIES}


def embed_items(items: list[dict], loaded: LoadedModel) -> dict[str, np.ndarray]:
    """`embed_rows(rows_from_items(items))`: what search, classify and serve embed a query with."""
    return embed_rows(rows_from_items(items, loaded), loaded)
