"""Ray Data's Lance writer (`LanceDatasink`, what `Dataset.write_lance` builds) for the pylance
we run. Ray 2.60's sink passes `storage_options_provider` to `write_fragments`,
`LanceDataset(...)` and `LanceDataset.commit`, a keyword pylance 6 removed
(ray-project/ray#65129, open): every `write_lance` fails with a TypeError. This subclass
keeps Ray's sink (distributed write tasks, one commit on the driver when all of them have
finished, read-version checks) and only calls pylance's current API in those three places.
Remove it once Ray's own sink works with the installed pylance."""
from __future__ import annotations

import pickle

import pyarrow as pa
from ray.data import SaveMode
from ray.data._internal.datasource.lance_datasink import LanceDatasink
from ray.data.block import BlockAccessor


class LanceAppendSink(LanceDatasink):
    """Appends a dataset's rows to an existing Lance dataset in one Lance commit."""

    def __init__(self, uri: str, *, storage_options: dict | None = None):
        super().__init__(uri, mode=SaveMode.APPEND, storage_options=storage_options)

    def _open_dataset(self):
        import lance

        return lance.LanceDataset(self.uri, storage_options=self.storage_options or None)

    def write(self, blocks, _ctx):
        """One write task: its blocks -> Lance fragment files (not yet part of any version)."""
        from lance.fragment import write_fragments

        schema = self.schema  # the dataset's, read by on_write_start
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        batches = [rb for t in tables if t.num_rows for rb in t.select(schema.names).cast(schema).to_batches()]
        if not batches:
            return []
        fragments = write_fragments(pa.RecordBatchReader.from_batches(schema, iter(batches)), self.uri,
                                    schema=schema, max_rows_per_file=self.max_rows_per_file,
                                    storage_options=self.storage_options or None)
        return [(pickle.dumps(f), pickle.dumps(schema)) for f in fragments]

    def on_write_complete(self, write_result):
        """On the driver, after every write task succeeded: one commit of all the fragments."""
        import lance

        results = getattr(write_result, "write_returns", write_result) or []
        fragments = [pickle.loads(f) for task in results for f, _ in task]
        if fragments:
            lance.LanceDataset.commit(self.uri, lance.LanceOperation.Append(fragments),
                                      read_version=self.read_version, storage_options=self.storage_options or None)
