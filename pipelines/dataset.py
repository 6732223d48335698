"""The preprocessed-output format, in one place: the preprocess job writes it, and training,
evaluation, the audit and the ingest read it, all through the names and rules here.

A preprocessed dataset is one folder:
  shard-NNNNNN.tar     one output shard per input shard; a sample is the members OUT_IMAGE,
                       OUT_TEXT, OUT_MEL (float16 log-mel) and OUT_META (our metadata, never a
                       caption), each only where the sample has it, plus the user's extras
  _manifest.parquet    one row per written sample (MANIFEST_SCHEMA)
  _quarantine.parquet  one row per sample left out, and why (QUARANTINE_SCHEMA)
  _stats.json          counts, and the settings the output was made with (`data`); written
                       last, so its presence is what makes the folder a complete output
  _job.json            the fingerprint, inputs and settings the folder was claimed for
  _parts/              each shard task's manifest, quarantine and `done` parts until the commit

A sample's id is (the URL of the output shard that holds it, its key): the ingest names rows
so, the training loop records data positions and the audit by it, and `ids()` gives it from
the manifest without reading a shard.
"""
from __future__ import annotations

import json

import pyarrow as pa

from .config import DataConfig
from .errors import ConfigError, UserError
from .retry import open_retrying, read_parquet_retrying
from .storage import OutputStore, canonical_url, filesystem, join

FORMAT_VERSION = 1
JOB_FILE, STATS_FILE = "_job.json", "_stats.json"
MANIFEST_FILE, QUARANTINE_FILE = "_manifest.parquet", "_quarantine.parquet"
PARTS_DIR = "_parts"

# extensions of the members a preprocessed sample is made of
OUT_IMAGE, OUT_TEXT, OUT_MEL, OUT_META = "jpg", "txt", "mel.npy", "json"
OUTPUT_EXTS = (OUT_IMAGE, OUT_TEXT, OUT_MEL, OUT_META)
# what each member holds, by the ingest's column names
SAMPLE_MEMBERS = {"image": OUT_IMAGE, "text": OUT_TEXT, "mel": OUT_MEL, "meta": OUT_META}

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("position", pa.int64()),
    ("output_shard", pa.string()), ("modalities", pa.string()),
    ("image_width", pa.int32()), ("image_height", pa.int32()),
    ("audio_seconds", pa.float32()), ("text_chars", pa.int32()), ("content_hash", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("position", pa.int64()),
    ("reason", pa.string()), ("kind", pa.string()), ("detail", pa.string()),
    ("members", pa.list_(pa.string())),
])

# the settings baked into the stored members: a run must use the same ones to read them
# (the crop's size, and everything that shapes the stored log-mel)
AUDIO_SETTINGS = ("sample_rate", "seconds", "n_mels", "hop_ms", "win_ms")

Id = tuple[str, str]  # (output shard URL, key)


class DataMismatch(ConfigError):
    """Training data that the run's data settings cannot read."""


def part_names(shard_name: str) -> dict[str, str]:
    """The `_parts` files of one output shard; its `done` part is written last."""
    stem = shard_name[: -len(".tar")]
    return {
        "manifest": f"{PARTS_DIR}/{stem}.manifest.parquet",
        "quarantine": f"{PARTS_DIR}/{stem}.quarantine.parquet",
        "done": f"{PARTS_DIR}/{stem}.done.json",
    }


def settings_record(cfg: DataConfig, fingerprint: str) -> dict:
    """What `_job.json` and `_stats.json` both say about how the output is made."""
    return {"fingerprint": fingerprint, "format": FORMAT_VERSION, "data": cfg.to_dict()}


def write_output(store: OutputStore, manifest: pa.Table, quarantine: pa.Table, stats: dict) -> None:
    """The commit's files, `_stats.json` last: a reader takes a folder for a complete output
    exactly when that file is there."""
    store.write_parquet(MANIFEST_FILE, manifest)
    store.write_parquet(QUARANTINE_FILE, quarantine)
    store.write_json(STATS_FILE, stats)


class PreprocessedDataset:
    """One preprocessed output folder, read through the retrying readers (a throttled or
    dropped read of a manifest is retried, as every read of the data is)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.fs, path = filesystem(url.rstrip("/"), storage_options)
        self.path = path.rstrip("/")
        self.url = canonical_url(self.fs, self.path)  # the prefix of its shards' ids
        self._stats: dict | None = None

    @classmethod
    def find(cls, url: str, storage_options: dict | None = None) -> "PreprocessedDataset | None":
        """The complete output at `url`, or None where there is none (raw shards, say)."""
        dataset = cls(url, storage_options)
        return dataset if dataset.fs.exists(join(dataset.path, STATS_FILE)) else None

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> "PreprocessedDataset":
        """The complete output at `url`; anything else is the user's mistake, said in one line."""
        dataset = cls.find(url, storage_options)
        if dataset is not None:
            return dataset
        where = cls(url, storage_options)
        if not where.fs.exists(where.path):
            raise UserError(f"{url} does not exist: give the OUTPUT folder of a finished `preprocess` run")
        raise UserError(f"{url} is not a preprocessed output: it has no {STATS_FILE} (the file a "
                        "`preprocess` run writes last); give the OUTPUT folder of a finished run")

    @property
    def stats(self) -> dict:
        if self._stats is None:
            with open_retrying(self.fs, join(self.path, STATS_FILE), name=join(self.url, STATS_FILE)) as f:
                self._stats = json.load(f)
        return self._stats

    @property
    def settings(self) -> dict:
        """The data settings it was made with (`DataConfig.to_dict()`)."""
        return self.stats.get("data", {})

    def manifest(self, columns: list[str]) -> pa.Table:
        return read_parquet_retrying(self.fs, join(self.path, MANIFEST_FILE), columns=columns)

    def shard_counts(self) -> dict[str, int]:
        """Samples per output shard URL, from the manifest (a shard that kept none is absent)."""
        table = self.manifest(["output_shard"]).group_by("output_shard").aggregate([("output_shard", "count")])
        return {join(self.url, row["output_shard"]): row["output_shard_count"] for row in table.to_pylist()}

    def ids(self) -> set[Id]:
        table = self.manifest(["output_shard", "key"])
        return {(join(self.url, s), k) for s, k in zip(table["output_shard"].to_pylist(), table["key"].to_pylist())}

    def check_compatible(self, data: DataConfig) -> None:
        """Refuse (DataMismatch) a run whose data settings differ from those baked into the
        shards; a setting the stats do not record is not checked."""
        theirs = self.settings.get("image", {}).get("size")
        if theirs is not None and theirs != data.image.size:
            raise DataMismatch(f"{self.url} was preprocessed at image size {theirs}, the run uses "
                               f"{data.image.size}; set data.image.size to {theirs} or preprocess again")
        audio = {k: self.settings.get("audio", {}).get(k) for k in AUDIO_SETTINGS}
        mine = {k: getattr(data.audio, k) for k in AUDIO_SETTINGS}
        if any(v is not None and v != mine[k] for k, v in audio.items()):
            raise DataMismatch(f"{self.url} was preprocessed with audio settings {audio}, the run uses {mine}")


def _folders(shards: list[str]) -> list[str]:
    return sorted({s.rsplit("/", 1)[0] for s in shards})


def datasets_of(shards: list[str], storage_options: dict | None = None) -> list[PreprocessedDataset] | None:
    """The preprocessed outputs that hold `shards` (one per folder), or None if the shards are
    raw. Both kinds at once is refused: they need different ingest paths."""
    found = [(folder, PreprocessedDataset.find(folder, storage_options)) for folder in _folders(shards)]
    datasets = [d for _, d in found if d is not None]
    if datasets and len(datasets) < len(found):
        raise DataMismatch("--data mixes preprocessed output and raw shards; train on one kind at a time")
    return datasets or None


def check_preprocessed(shards: list[str], data: DataConfig, storage_options: dict | None = None) -> bool:
    """True if the shards are preprocess output (all of them, made with settings the run can
    read), False if they are raw (all of them)."""
    datasets = datasets_of(shards, storage_options)
    for dataset in datasets or []:
        dataset.check_compatible(data)
    return datasets is not None


def shard_counts(shards: list[str], storage_options: dict | None = None) -> dict[str, int] | None:
    """Samples per shard from the manifests, or None for raw shards (whose size only a full
    read can tell)."""
    datasets = datasets_of(shards, storage_options)
    if datasets is None:
        return None
    counts: dict[str, int] = {}
    for dataset in datasets:
        counts.update(dataset.shard_counts())
    return {s: counts.get(s, 0) for s in shards}
