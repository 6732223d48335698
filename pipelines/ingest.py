"""The training dataset: shards -> decoded, fixed-shape numpy batches -> per-worker torch batches.

Works on preprocessed shards (JPEG crop + stored log-mel: decoding is cheap) and on raw
shards (the full transform of `transform.py` runs here instead). Each row keeps its id
(source, key), which the training loop records as its data position.

Epoch order: the datasource asks a small named actor, the `EpochClock`, which epochs to
serve, and orders each epoch's shards by a permutation seeded by (seed, epoch). The training
loop (rank 0) sets the clock before each pass; so the order is a pure function of the
config, and a restarted run that restores epoch e reads epoch e's order again.

A pass is several epochs in one Ray Data execution. Starting an execution costs about a
second before its first batch (planning, task launch, the split coordinator), whatever the
epoch's length, which on a small corpus would be a good part of each epoch. Within a pass
epoch e+1's shards are read while epoch e is still being trained on, so an epoch boundary
costs nothing. Every row carries its epoch, and the data position is kept per epoch.
"""
from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from typing import Iterator

import numpy as np
import pyarrow as pa

from .config import DataConfig
from .dataset import SAMPLE_MEMBERS
from .datasource import WebDatasetDatasource
from .reasons import NO_USABLE_MODALITY, SampleError
from .source import RAW_MODALITIES, iter_tar_samples, split_modalities
from .tarheaders import ReadLimits
from .transform import Processed, transform_modalities

log = logging.getLogger(__name__)

# The columns of a training row, the same for both kinds of shard so that one decoder reads
# them: a preprocessed sample has its stored members (`dataset.SAMPLE_MEMBERS`: the log-mel
# instead of audio, and our metadata), a raw one image, text and audio in any accepted format.
COLUMNS = ("image", "text", "mel", "audio", "meta")
PREPROCESSED_COLUMNS = {c: (SAMPLE_MEMBERS[c],) if c in SAMPLE_MEMBERS else () for c in COLUMNS}
RAW_COLUMNS = {c: RAW_MODALITIES.get(c, ()) for c in COLUMNS}


# a pass spans as many epochs as fit in this many samples: on a small corpus the epoch
# boundaries cost nothing; a large corpus's epochs are long enough that one execution each
# costs nothing either, and the data position (ids trained on, per epoch of the pass, saved
# in every checkpoint) stays bounded by it
SAMPLES_PER_PASS = 200_000


def epochs_per_pass(samples_per_epoch: int | None) -> int:
    return max(1, SAMPLES_PER_PASS // samples_per_epoch) if samples_per_epoch else 1


Exclude = dict[int | str, dict[str, set[str]]]  # epoch or part -> source shard -> keys already trained on


class EpochClock:
    """What the data plane should serve next: the epochs of the pass, and the ids of each
    already trained on (from a checkpoint). A Ray actor, one per run, set by the training loop."""

    def __init__(self):
        self.first, self.last, self.exclude = 0, 0, {}

    def set(self, first: int, last: int, consumed: dict[int, list] | None = None) -> int:
        self.first, self.last, self.exclude = first, last, {}
        for part, ids in (consumed or {}).items():  # part: an epoch, or a mixture's "NAME/K"
            for source, key in ids:
                self.exclude.setdefault(part, {}).setdefault(source, set()).add(key)
        return first

    def get(self) -> tuple[int, int, Exclude]:
        return self.first, self.last, self.exclude


def epoch_clock(name: str):
    """Create or find the run's clock actor. It lives on the driver's node (if that node goes,
    so does the run) and is restarted if its process dies: the training loop sets it again
    at the start of every attempt, so a restarted clock loses nothing."""
    import ray

    from .runtime import on_the_drivers_node

    return ray.remote(num_cpus=0)(EpochClock).options(name=name, get_if_exists=True, scheduling_strategy=on_the_drivers_node(),
                                                      max_restarts=-1, max_task_retries=-1).remote()


class EpochShuffledDatasource(WebDatasetDatasource):
    """A WebDataset datasource over the epochs of a pass: each epoch's shards in a permutation
    seeded by (seed, epoch), rows tagged with their epoch, serving only the ids of each epoch
    that are not yet consumed: a shard whose every sample was consumed in that epoch is not
    read at all, a partly consumed one is filtered by id."""

    def __init__(self, shards: list[str], *, seed: int, preprocessed: bool, clock_name: str | None = None,
                 shard_counts: dict[str, int] | None = None, rank: int = 0, world: int = 1, **kwargs):
        modalities = PREPROCESSED_COLUMNS if preprocessed else RAW_COLUMNS
        super().__init__(shards, modalities=modalities, include_errors=False, **kwargs)
        self.seed, self.clock_name, self.shard_counts = seed, clock_name, shard_counts or {}
        self.rank, self.world = rank, world  # world > 1: serve only this rank's shards
        self.all_shards, self._epoch, self._exclude = list(self.shards), 0, {}

    def plan(self) -> tuple[int, int, Exclude]:
        if self.clock_name is None:
            return 0, 0, {}
        import ray

        return ray.get(ray.get_actor(self.clock_name).get.remote())

    def epoch_order(self, epoch: int, exclude: dict[str, set[str]]) -> list[str]:
        order = list(self.all_shards)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        # which rank reads a shard must not depend on what was consumed: slice, then skip
        order = order[self.rank::self.world]
        return [s for s in order if len(exclude.get(s, ())) < self.shard_counts.get(s, 1 << 62)]

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        first, last, exclude = self.plan()
        # one task per shard and epoch, epoch after epoch, each in its permuted order: Ray Data
        # launches tasks in list order, so this is also (up to concurrency) the reading order
        tasks = []
        try:
            for epoch in range(first, last + 1):
                self._epoch, self._exclude = epoch, exclude.get(epoch, {})
                self.shards = self.epoch_order(epoch, self._exclude)
                if self.shards:
                    tasks += super().get_read_tasks(len(self.shards), per_task_row_limit, data_context)
        finally:
            self.shards = self.all_shards
        return tasks

    def schema(self) -> pa.Schema:
        return super().schema().append(pa.field("epoch", pa.int32()))

    def _skip(self, group: list[str]):
        exclude = {s: self._exclude[s] for s in group if s in self._exclude}
        return (lambda source, key: key in exclude.get(source, ())) if exclude else None

    def _reader(self, group: list[str], schema: pa.Schema):
        # the base reader builds rows without the epoch; add it as a constant column
        read, epoch = super()._reader(group, super().schema()), self._epoch

        def read_epoch():
            for table in read():
                yield table.append_column("epoch", pa.array(np.full(len(table), epoch, np.int32)))

        return read_epoch


# Rows dropped in this process for an unexpected exception, by exception type: the first of each
# type is logged with its traceback, every one with a warning naming its id and this count.
internal_errors: Counter = Counter()


def decode_batch(batch: pa.Table, cfg: DataConfig, notices: str | None = None) -> dict[str, np.ndarray]:
    """Raw or preprocessed rows -> fixed-shape arrays; a row that fails to decode is dropped
    with a warning naming its id (on preprocessed shards this does not happen). An unexpected
    exception on a row (a bug, or a preprocessed member that is not what we wrote) drops that
    row the same way, is counted in `internal_errors` and logged; it never ends the run.
    `notices`: the training driver's progress board, told of every dropped row (the driver
    says the first in one line and counts the rest: mmtrain/progress.py)."""
    size, n_mels, frames = cfg.image.size, cfg.audio.n_mels, cfg.audio.num_frames
    rows = batch.to_pylist()
    out = {
        "key": [], "source": [], "epoch": [], "part": [],
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
            _tell_driver(notices, f"skipping sample {row['source']}#{row['key']}: {e}")
            continue
        except Exception as e:  # MemoryError too; KeyboardInterrupt and SystemExit go through
            _log_internal_error(e, row)
            _tell_driver(notices, f"skipping sample {row.get('source')}#{row.get('key')}: internal error "
                                  f"{type(e).__name__}")
            continue
        out["key"].append(row["key"])
        out["source"].append(row["source"])
        out["epoch"].append(row.get("epoch") or 0)
        # the data position's key: a mixture's (source, source epoch), else the epoch
        out["part"].append(row.get("part") or out["epoch"][-1])
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
    for k in ("key", "source", "text", "part"):
        out[k] = np.array(out[k], dtype=object)
    out["epoch"] = np.array(out["epoch"], dtype=np.int32)
    return out


def _tell_driver(board: str | None, text: str) -> None:
    if board is None:
        return
    import time

    import ray

    try:
        ray.get_actor(board).push.remote({"kind": "skipped", "time": time.time(), "text": text})
    except ValueError:  # the run has ended: its board is gone
        pass


def _log_internal_error(e: Exception, row: dict) -> None:
    name = type(e).__name__
    internal_errors[name] += 1
    n = internal_errors[name]
    if n == 1:
        log.error("unexpected %s decoding sample %s#%s (the row is dropped; a bug, please report)",
                  name, row.get("source"), row.get("key"), exc_info=e)
    message = " ".join(str(e).split())[:300]
    log.warning("skipping sample %s#%s: internal error %s: %s (%d %s so far in this process)",
                row.get("source"), row.get("key"), name, message, n, name)


def _decode_row(row: dict, cfg: DataConfig):
    """The transform of preprocessing (`transform_modalities`) on the row's members: a raw
    row's audio becomes its log-mel here; a preprocessed crop is already at size (the resize
    is a no-op) and its stored log-mel is read as it is."""
    chosen = {m: (row[f"{m}_ext"], row[m]) for m in ("image", "text", "audio") if row[m] is not None}
    p = transform_modalities(Processed(row["key"], row["source"], row.get("position") or 0), chosen, cfg)
    if row["mel"] is not None:
        p.mel = _load_npy(row["mel"])
        if p.mel.shape[0] != cfg.audio.n_mels:
            raise SampleError("mel_shape_mismatch", f"{p.mel.shape[0]} mel bins, config says {cfg.audio.n_mels}")
        p.mel_frames = _valid_frames(row, p.mel)
    if not p.modalities:
        raise SampleError(NO_USABLE_MODALITY, "nothing to train on")
    return p.image, p.text, p.mel, p.mel_frames


# Parsed .npy headers, by their exact bytes. Every stored log-mel has the same header, and
# parsing it (`ast.literal_eval` under `np.load`) is most of what loading one costs.
_npy_headers: dict[bytes, tuple[tuple[int, ...], str, np.dtype, int]] = {}


def _load_npy(data: bytes) -> np.ndarray:
    """`np.load(allow_pickle=False)` of an in-memory .npy, read-only and without a copy. A header
    seen before in a member that `np.load` read is not parsed again; anything else (a new
    header, a short member, a bad one) goes through `np.load`, which raises as it does."""
    end = 10 + int.from_bytes(data[8:10], "little") if data[6:8] == b"\x01\x00" else 0
    known = _npy_headers.get(data[:end]) if end else None
    if known is not None and len(data) - end >= known[3]:
        shape, order, dtype, nbytes = known
        return np.frombuffer(data, dtype, count=nbytes // dtype.itemsize, offset=end).reshape(shape, order=order)
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if end and array.nbytes and len(_npy_headers) < 64:
        _npy_headers[data[:end]] = (array.shape, "F" if np.isfortran(array) else "C", array.dtype, array.nbytes)
    return array


def _valid_frames(row: dict, mel: np.ndarray) -> int:
    if row["meta"] is not None:
        return int(json.loads(row["meta"]).get("mel_frames", mel.shape[1]))
    return mel.shape[1]


def captions(shards: list[str], cfg: DataConfig, *, preprocessed: bool,
             storage_options: dict | None = None) -> Iterator[str]:
    """The captions of `shards` as training reads them: the text column's member (a raw
    sample's `.txt` or `.json` caption/text, a preprocessed sample's stored text) through the
    transform's text decoding. A caption that the transform drops is left out."""
    text_exts = {"text": (PREPROCESSED_COLUMNS if preprocessed else RAW_COLUMNS)["text"]}
    limits = ReadLimits.from_config(cfg)
    for shard in shards:
        for raw in iter_tar_samples(shard, storage_options=storage_options, limits=limits):
            chosen, _ = split_modalities(raw.members, text_exts)
            if raw.error is not None or "text" not in chosen:
                continue
            try:
                yield transform_modalities(Processed(raw.key, raw.source, raw.position), chosen, cfg).text
            except SampleError:
                continue


def build_dataset(shards: list[str], cfg: DataConfig, *, seed: int, preprocessed: bool,
                  clock_name: str | None = None, rank: int = 0, world: int = 1,
                  storage_options: dict | None = None, shard_counts: dict[str, int] | None = None,
                  read_cpus: float = 0.25, decode_cpus: float = 0.5, notices: str | None = None,
                  mixture=None):
    """Lazy Ray Dataset of decoded training rows (nothing is materialized); `notices`: see
    decode_batch; `mixture`: a pipelines.mixture.Mixture over `shards` (its sources' shards)."""
    import ray

    from .shards import shard_sizes

    kwargs = dict(seed=seed, preprocessed=preprocessed, clock_name=clock_name, storage_options=storage_options,
                  shard_sizes=shard_sizes(shards, storage_options), rows_per_block=16,
                  shard_counts=shard_counts, rank=rank, world=world, limits=ReadLimits.from_config(cfg))
    if mixture is not None:
        from .mixture_source import MixtureDatasource

        source = MixtureDatasource(mixture, **kwargs)
    else:
        source = EpochShuffledDatasource(shards, **kwargs)
    ds = ray.data.read_datasource(source, override_num_blocks=len(shards), num_cpus=read_cpus)
    # small blocks (16 rows, ~5 MB decoded): the split hands blocks to whichever worker asks
    # first, so block size is the granularity of load balance between training workers
    return ds.map_batches(decode_batch, fn_kwargs={"cfg": cfg, "notices": notices}, batch_format="pyarrow",
                          batch_size=16, num_cpus=decode_cpus)
