"""A Ray Data datasource over WebDataset shards: one column per modality, the sample id
(source, key), and errors kept as rows (`error`) instead of failing the read.

Kept apart from `source.py` (the tar reader) so that code which only streams tars, such as
the preprocess shard tasks, does not import Ray Data in every worker (~0.5 s, ~60 MB each).
"""
from __future__ import annotations

from typing import Iterator

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from .source import RAW_MODALITIES, RawSample, iter_tar_samples, split_modalities
from .tarheaders import ReadLimits


def sample_schema(modalities: dict[str, tuple[str, ...]]) -> pa.Schema:
    fields = [pa.field("key", pa.string()), pa.field("source", pa.string()), pa.field("position", pa.int64())]
    for name in modalities:
        fields += [pa.field(name, pa.binary()), pa.field(f"{name}_ext", pa.string())]
    fields += [
        pa.field("extras", pa.list_(pa.struct([("ext", pa.string()), ("data", pa.binary())]))),
        pa.field("error", pa.string()),
        pa.field("error_detail", pa.string()),
    ]
    return pa.schema(fields)


def sample_row(raw: RawSample, modalities: dict[str, tuple[str, ...]]) -> dict:
    chosen, extras = split_modalities(raw.members, modalities)
    row = {"key": raw.key, "source": raw.source, "position": raw.position}
    for name in modalities:
        ext, data = chosen.get(name, (None, None))
        row[name], row[f"{name}_ext"] = data, ext
    row["extras"] = [{"ext": e, "data": d} for e, d in extras]
    row["error"] = raw.error.reason if raw.error else None
    row["error_detail"] = raw.error.detail if raw.error else None
    return row


class WebDatasetDatasource(Datasource):
    """Rows of raw sample bytes, one column per modality, with the sample id (source, key).

    One read task streams a contiguous group of shards and emits blocks of at most
    `rows_per_block` rows, so memory per task is one block plus one sample. Error rows are
    kept (column `error`) unless `include_errors=False`; callers that train on raw shards
    drop them, the preprocess job records them.

    `mark_shard_ends=True` adds a column `shard_rows`: 0, except on the last row a shard
    yields, where it is that shard's number of rows. A consumer of the rows in any order
    (an actor pool does not keep it) then knows when it has all of a shard: the `embed` job
    commits whole shards while one streaming execution runs on. An empty shard yields no
    row, hence no mark: it is complete when the dataset is.
    """

    def __init__(
        self,
        shards: list[str],
        *,
        modalities: dict[str, tuple[str, ...]] | None = None,
        storage_options: dict | None = None,
        limits: ReadLimits | None = None,
        include_errors: bool = True,
        rows_per_block: int = 128,
        shard_sizes: dict[str, int | None] | None = None,
        mark_shard_ends: bool = False,
    ):
        super().__init__()
        if not shards:
            raise ValueError("WebDatasetDatasource needs at least one shard")
        self.shards = list(shards)
        self.modalities = dict(modalities or RAW_MODALITIES)
        self.storage_options = storage_options or {}
        self.limits = limits or ReadLimits.from_config()  # what a shard may make a reader hold or do
        self.include_errors = include_errors
        self.rows_per_block = rows_per_block
        self.shard_sizes = shard_sizes or {}
        self.mark_shard_ends = mark_shard_ends

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = [self.shard_sizes.get(s) for s in self.shards]
        return None if any(s is None for s in sizes) else int(sum(sizes))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        n = max(1, min(parallelism, len(self.shards)))
        groups = [self.shards[i::n] for i in range(n)]  # strided: neighbouring shards go to different tasks
        schema = self.schema()
        tasks = []
        for group in groups:
            size = sum(self.shard_sizes.get(s) or 0 for s in group) or None
            meta = BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=tuple(group))
            tasks.append(ReadTask(self._reader(group, schema), meta, schema=schema,
                                  per_task_row_limit=per_task_row_limit))
        return tasks

    def schema(self) -> pa.Schema:
        schema = sample_schema(self.modalities)
        return schema.append(pa.field("shard_rows", pa.int64())) if self.mark_shard_ends else schema

    def _skip(self, group: list[str]):
        """A predicate (source, key) -> bool for rows to leave out, or None (subclass hook)."""
        return None

    def _window(self, group: list[str]) -> tuple[int, int] | None:
        """Record positions [start, stop) to read of every shard in `group`, or None for all
        (subclass hook: a mixture reads a range of a shard)."""
        return None

    def _reader(self, group: list[str], schema: pa.Schema):
        modalities, opts, limits = self.modalities, self.storage_options, self.limits
        keep_errors, rows_per_block, mark = self.include_errors, self.rows_per_block, self.mark_shard_ends
        skip, window = self._skip(group), self._window(group)
        start, stop = window or (0, 1 << 62)
        # marking holds the newest row back: it may be its shard's last, which gets the count
        held = 1 if mark else 0

        def read() -> Iterator[pa.Table]:
            rows: list[dict] = []
            for url in group:
                n = 0
                for raw in iter_tar_samples(url, storage_options=opts, limits=limits):
                    if raw.position < start:
                        continue
                    if raw.position >= stop:
                        break
                    if raw.error is not None and not keep_errors:
                        continue
                    if skip is not None and skip(raw.source, raw.key):
                        continue
                    rows.append(sample_row(raw, modalities))
                    n += 1
                    if mark:
                        rows[-1]["shard_rows"] = 0
                    if len(rows) >= rows_per_block + held:
                        yield pa.Table.from_pylist(rows[:len(rows) - held], schema=schema)
                        rows = rows[len(rows) - held:]
                if mark and n:
                    rows[-1]["shard_rows"] = n
            if rows:
                yield pa.Table.from_pylist(rows, schema=schema)

        return read

    def get_name(self) -> str:
        return "WebDataset"


def read_webdataset(
    inputs: list[str], *, storage_options: dict | None = None, override_num_blocks: int | None = None, **kwargs
):
    """`ray.data.Dataset` of samples from shard patterns (see `shards.expand_shards`)."""
    import ray

    from .shards import expand_shards, shard_sizes

    shards = expand_shards(inputs, storage_options)
    source = WebDatasetDatasource(
        shards, storage_options=storage_options, shard_sizes=shard_sizes(shards, storage_options), **kwargs
    )
    return ray.data.read_datasource(source, override_num_blocks=override_num_blocks or len(shards))
