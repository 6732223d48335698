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

import numpy as np
import pyarrow as pa

from . import modalities as M
from .config import AUDIO_EXTS, IMAGE_EXTS, TEXT_EXTS, DataConfig
from .reasons import SampleError
from .datasource import WebDatasetDatasource

log = logging.getLogger(__name__)

# a preprocessed sample is jpg + txt + mel.npy + json (our metadata, never a caption); a raw
# one has image/text/audio in any of the accepted formats
PREPROCESSED_MODALITIES = {"image": ("jpg",), "text": ("txt",), "mel": ("mel.npy",), "audio": (), "meta": ("json",)}
RAW_MODALITIES = {"image": IMAGE_EXTS, "text": TEXT_EXTS, "mel": (), "audio": AUDIO_EXTS, "meta": ()}


class EpochClock:
    """What the data plane should serve next: the epoch, and the ids of that epoch already
    trained on (from a checkpoint). A Ray actor, one per run, set by the training loop."""

    def __init__(self):
        self.epoch, self.exclude = 0, {}

    def set(self, epoch: int, exclude_ids: list | None = None) -> int:
        self.epoch, self.exclude = epoch, {}
        for source, key in exclude_ids or []:
            self.exclude.setdefault(source, set()).add(key)
        return epoch

    def get(self) -> tuple[int, dict[str, set[str]]]:
        return self.epoch, self.exclude


def epoch_clock(name: str):
    """Create or find the run's clock actor. It lives on the driver's node (if that node goes,
    so does the run) and is restarted if its process dies: the training loop sets it again
    at the start of every attempt, so a restarted clock loses nothing."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0)(EpochClock).options(
        name=name, get_if_exists=True, scheduling_strategy=here, max_restarts=-1, max_task_retries=-1).remote()


class EpochShuffledDatasource(WebDatasetDatasource):
    """A WebDataset datasource whose shard order is a permutation seeded by (seed, epoch),
    serving only the ids of the epoch that are not yet consumed: a shard whose every sample
    was consumed is not read at all, a partly consumed one is filtered by id."""

    def __init__(self, shards: list[str], *, seed: int, preprocessed: bool, clock_name: str | None = None,
                 shard_counts: dict[str, int] | None = None, rank: int = 0, world: int = 1, **kwargs):
        modalities = PREPROCESSED_MODALITIES if preprocessed else RAW_MODALITIES
        super().__init__(shards, modalities=modalities, include_errors=False, **kwargs)
        self.seed, self.clock_name, self.shard_counts = seed, clock_name, shard_counts or {}
        self.rank, self.world = rank, world  # world > 1: serve only this rank's shards
        self._exclude: dict[str, set[str]] = {}

    def plan(self) -> tuple[int, dict[str, set[str]]]:
        if self.clock_name is None:
            return 0, {}
        import ray

        return ray.get(ray.get_actor(self.clock_name).get.remote())

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        epoch, exclude = self.plan()
        order = list(self.shards)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        # which rank reads a shard must not depend on what was consumed: slice, then skip
        order = order[self.rank::self.world]
        order = [s for s in order if len(exclude.get(s, ())) < self.shard_counts.get(s, 1 << 62)]
        # one task per shard, in permuted order: Ray Data launches tasks in list order, so the
        # permutation is also (up to concurrency) the order in which shards are read
        saved, self.shards, self._exclude = self.shards, order, exclude
        try:
            if not order:
                return []
            return super().get_read_tasks(len(order), per_task_row_limit, data_context)
        finally:
            self.shards = saved

    def _skip(self, group: list[str]):
        exclude = {s: self._exclude[s] for s in group if s in self._exclude}
        return (lambda source, key: key in exclude.get(source, ())) if exclude else None


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
    if row["meta"] is not None:
        import json

        return int(json.loads(row["meta"]).get("mel_frames", mel.shape[1]))
    return mel.shape[1]


def build_dataset(shards: list[str], cfg: DataConfig, *, seed: int, preprocessed: bool,
                  clock_name: str | None = None, rank: int = 0, world: int = 1,
                  storage_options: dict | None = None, shard_counts: dict[str, int] | None = None,
                  read_cpus: float = 0.25, decode_cpus: float = 0.5):
    """Lazy Ray Dataset of decoded training rows (nothing is materialized)."""
    import ray

    from .shards import shard_sizes

    source = EpochShuffledDatasource(shards, seed=seed, preprocessed=preprocessed, clock_name=clock_name,
                                     storage_options=storage_options,
                                     shard_sizes=shard_sizes(shards, storage_options), rows_per_block=16,
                                     shard_counts=shard_counts, rank=rank, world=world)
    ds = ray.data.read_datasource(source, override_num_blocks=len(shards), num_cpus=read_cpus)
    # small blocks (16 rows, ~5 MB decoded): the split hands blocks to whichever worker asks
    # first, so block size is the granularity of load balance between training workers
    return ds.map_batches(decode_batch, fn_kwargs={"cfg": cfg}, batch_format="pyarrow",
                          batch_size=16, num_cpus=decode_cpus)
