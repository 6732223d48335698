"""The training dataset: shards -> decoded, fixed-shape numpy batches -> per-worker torch batches.

Works on preprocessed shards (JPEG crop + stored log-mel: decoding is cheap) and on raw
shards (the full transform of `transform.py` runs here instead). Each row keeps its id
(source, key), which the training loop records as its data position.

Epoch order: the datasource asks a small named actor, the `EpochClock`, which epoch is
starting, and orders shards by a permutation seeded by (seed, epoch). The training loop
(rank 0) sets the clock before each epoch; so the order is a pure function of the
config, and a restarted run that restores epoch e reads epoch e's order again.
"""
from __future__ import annotations

import io
import logging
import random
from typing import Iterator

import numpy as np
import pyarrow as pa

from . import modalities as M
from .config import AUDIO_EXTS, IMAGE_EXTS, DataConfig
from .reasons import SampleError
from .source import WebDatasetDatasource

log = logging.getLogger(__name__)

# a preprocessed sample has jpg + txt + mel.npy (+ json meta); a raw one image/text/audio
INGEST_MODALITIES = {"image": IMAGE_EXTS, "text": ("txt", "json"), "mel": ("mel.npy",), "audio": AUDIO_EXTS}


class EpochClock:
    """Which epoch the data plane should serve (a Ray actor, one per run)."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def set(self, epoch: int) -> int:
        self.epoch = epoch
        return epoch

    def get(self) -> int:
        return self.epoch


def epoch_clock(name: str, epoch: int = 0):
    """Create or find the run's clock actor (detached from no one: dies with the job)."""
    import ray

    return ray.remote(num_cpus=0)(EpochClock).options(name=name, get_if_exists=True).remote(epoch)


class EpochShuffledDatasource(WebDatasetDatasource):
    """A WebDataset datasource whose shard order is a permutation seeded by (seed, epoch)."""

    def __init__(self, shards: list[str], *, seed: int, clock_name: str | None = None, **kwargs):
        super().__init__(shards, modalities=INGEST_MODALITIES, include_errors=False, **kwargs)
        self.seed, self.clock_name = seed, clock_name

    def epoch(self) -> int:
        if self.clock_name is None:
            return 0
        import ray

        return ray.get(ray.get_actor(self.clock_name).get.remote())

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        order = list(self.shards)
        random.Random(f"{self.seed}:{self.epoch()}").shuffle(order)
        # one task per shard, in permuted order: Ray Data launches tasks in list order, so the
        # permutation is also (up to concurrency) the order in which shards are read
        saved, self.shards = self.shards, order
        try:
            return super().get_read_tasks(len(order), per_task_row_limit, data_context)
        finally:
            self.shards = saved


def decode_batch(batch: pa.Table, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Raw or preprocessed rows -> fixed-shape arrays; a row that fails to decode is dropped
    with a warning naming its id (on preprocessed shards this does not happen)."""
    size, n_mels, frames = cfg.image.size, cfg.audio.n_mels, cfg.audio.num_frames
    rows = batch.to_pylist()
    out = {
        "key": [], "source": [],
        "image": np.zeros((len(rows), size, size, 3), np.uint8), "image_present": np.zeros(len(rows), bool),
        "text": [], "text_present": np.zeros(len(rows), bool),
        "mel": np.zeros((len(rows), n_mels, frames), np.float16), "mel_frames": np.zeros(len(rows), np.int32),
        "audio_present": np.zeros(len(rows), bool),
    }
    n = 0
    for row in rows:
        try:
            image, text, mel, mel_frames = _decode_row(row, cfg)
        except SampleError as e:
            log.warning("skipping sample %s#%s: %s", row["source"], row["key"], e)
            continue
        out["key"].append(row["key"])
        out["source"].append(row["source"])
        if image is not None:
            out["image"][n], out["image_present"][n] = image, True
        out["text"].append(text or "")
        out["text_present"][n] = text is not None
        if mel is not None:
            t = min(frames, mel.shape[1])
            out["mel"][n, :, :t] = mel[:, :t]
            out["mel_frames"][n], out["audio_present"][n] = min(mel_frames, t), True
        n += 1
    for k in ("image", "image_present", "text_present", "mel", "mel_frames", "audio_present"):
        out[k] = out[k][:n]
    for k in ("key", "source", "text"):
        out[k] = np.array(out[k], dtype=object)
    return out


def _decode_row(row: dict, cfg: DataConfig):
    """The same decoders as preprocessing; a preprocessed crop is already at size, so the
    resize is a no-op, and its stored log-mel replaces the audio transform."""
    image = text = mel = None
    frames = 0
    if row["image"] is not None:
        image, _ = M.decode_image(row["image"], row["image_ext"], cfg.image)
    if row["text"] is not None:
        text = M.decode_text(row["text"], row["text_ext"], cfg.text)
    if row["mel"] is not None:
        mel = np.load(io.BytesIO(row["mel"]), allow_pickle=False)
        if mel.shape[0] != cfg.audio.n_mels:
            raise SampleError("mel_shape_mismatch", f"{mel.shape[0]} mel bins, config says {cfg.audio.n_mels}")
        frames = _valid_frames(row, mel)
    elif row["audio"] is not None:
        wave, _ = M.decode_audio(row["audio"], row["audio_ext"], cfg.audio)
        wave, valid = M.fit_length(wave, cfg.audio)
        mel, frames = M.log_mel(wave, cfg.audio), M.mel_frames_for(valid, cfg.audio)
    if image is None and text is None and mel is None:
        raise SampleError("no_usable_modality", "nothing to train on")
    return image, text, mel, frames


def _valid_frames(row: dict, mel: np.ndarray) -> int:
    for extra in row["extras"] or []:
        if extra["ext"] == "json":
            import json

            return int(json.loads(extra["data"]).get("mel_frames", mel.shape[1]))
    return mel.shape[1]


def build_dataset(shards: list[str], cfg: DataConfig, *, seed: int, clock_name: str | None = None,
                  storage_options: dict | None = None, decode_cpus: float = 0.5):
    """Lazy Ray Dataset of decoded training rows (nothing is materialized)."""
    import ray

    from .shards import shard_sizes

    source = EpochShuffledDatasource(shards, seed=seed, clock_name=clock_name, storage_options=storage_options,
                                     shard_sizes=shard_sizes(shards, storage_options), rows_per_block=64)
    ds = ray.data.read_datasource(source, override_num_blocks=len(shards))
    return ds.map_batches(decode_batch, fn_kwargs={"cfg": cfg}, batch_format="pyarrow",
                          batch_size=64, num_cpus=decode_cpus)


def iter_shard_rows(batches: Iterator[dict]) -> Iterator[dict]:
    """Rows of numpy batches (for evaluation on the driver)."""
    for b in batches:
        for i in range(len(b["key"])):
            yield {k: v[i] for k, v in b.items()}
