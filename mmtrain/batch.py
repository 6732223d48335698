"""Numpy rows from the data plane -> the model's batch contract (torch tensors).

Every batch has exactly `batch_size` rows: a short last batch is padded with rows that
have no modality. Equal shapes on every rank are what cross-rank all-gathers need, and a
fully padded batch is how a rank with no data left keeps stepping in lockstep (see
`loop.lockstep`).
"""
from __future__ import annotations

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from pipelines.images import IMAGE_MEAN, IMAGE_STD

from .tokenizer import pad_batch

# (x / 255 - mean) / std as one multiply-add; the collate runs on the training worker's CPU
# for every batch, so it is written as few in-place passes as possible
_SCALE = (1.0 / (255.0 * torch.tensor(IMAGE_STD, dtype=torch.float32))).view(1, 3, 1, 1)
_SHIFT = (-torch.tensor(IMAGE_MEAN, dtype=torch.float32) / torch.tensor(IMAGE_STD, dtype=torch.float32)).view(1, 3, 1, 1)


class Collate(NumpyBatchCollateFn):
    def __init__(self, tokenizer, batch_size: int, max_text_len: int, image_size: int, n_mels: int,
                 mel_frames: int):
        super().__init__()
        self.tokenizer, self.batch_size, self.max_text_len = tokenizer, batch_size, max_text_len
        self.image_size, self.n_mels, self.mel_frames = image_size, n_mels, mel_frames

    def __call__(self, b: dict[str, np.ndarray]) -> dict:
        n, B = len(b["key"]), self.batch_size
        if n > B:
            raise ValueError(f"got {n} rows for a batch of {B}")
        image = torch.zeros(B, 3, self.image_size, self.image_size)
        if n:
            image[:n].copy_(torch.from_numpy(np.require(b["image"], np.uint8, ["C", "W"])).permute(0, 3, 1, 2))
            image[:n].mul_(_SCALE).add_(_SHIFT)
        texts = [str(t) for t in b["text"]] + [""] * (B - n)
        ids = [self.tokenizer.encode(t, self.max_text_len) for t in texts]
        mel = torch.zeros(B, self.n_mels, self.mel_frames)
        if n:
            mel[:n].copy_(torch.from_numpy(np.require(b["mel"], requirements=["C", "W"])))
        return {
            "image": image,
            "image_present": _pad_bool(b["image_present"], B),
            "text_ids": torch.from_numpy(pad_batch(ids, self.tokenizer.pad_id, self.max_text_len)),
            "text_present": _pad_bool(b["text_present"], B),
            "mel": mel,
            "mel_frames": torch.from_numpy(np.pad(np.asarray(b["mel_frames"], np.int64), (0, B - n))),
            "audio_present": _pad_bool(b["audio_present"], B),
            # ids stay python objects: they are the data position, not model input
            "ids": list(zip((str(s) for s in b["source"]), (str(k) for k in b["key"]),
                            (_part(p) for p in b.get("part", b["epoch"])))),
            # each row's epoch (-1 on padding): the worker's metrics say the newest epoch trained on
            "epoch": torch.from_numpy(np.pad(np.asarray(b["epoch"], np.int64), (0, B - n), constant_values=-1)),
        }

    def empty(self) -> dict:
        """A batch with no sample in it: loss 0, but every collective still runs."""
        return self({"key": np.array([], object), "source": np.array([], object), "text": np.array([], object),
                     "epoch": np.zeros(0, np.int32), "part": np.array([], object),
                     "image": np.zeros((0, self.image_size, self.image_size, 3), np.uint8),
                     "image_present": np.zeros(0, bool), "text_present": np.zeros(0, bool),
                     "mel": np.zeros((0, self.n_mels, self.mel_frames), np.float16),
                     "mel_frames": np.zeros(0, np.int32), "audio_present": np.zeros(0, bool)})


def _part(p):
    """An epoch (int) or a mixture's part ("NAME/K"), as plain python for the data position."""
    return p if isinstance(p, str) else int(p)


def _pad_bool(x, size: int) -> torch.Tensor:
    x = np.asarray(x, dtype=bool)
    return torch.from_numpy(np.pad(x, (0, size - len(x))))
