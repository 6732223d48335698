"""The training datasource of a mixture of sources: one read task per piece (a shard's sample
range in one source epoch, pipelines/mixture.py), epoch after epoch of the pass, each row
tagged with its run epoch and its part ("NAME/K"), the key of the data position."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .ingest import EpochShuffledDatasource
from .mixture import Mixture, Piece


class MixtureDatasource(EpochShuffledDatasource):
    def __init__(self, mixture: Mixture, **kwargs):
        super().__init__(mixture.shards(), **kwargs)
        self.mixture = mixture
        self._piece: Piece | None = None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        first, last, exclude = self.plan()
        tasks = []
        try:
            for epoch in range(first, last + 1):
                # which rank reads a piece must not depend on what was consumed: slice, then skip
                for piece in self.mixture.pieces(epoch)[self.rank::self.world]:
                    done = exclude.get(piece.part, {}).get(piece.shard, set())
                    # a shard's ids consumed in the part may come from another of its pieces (a
                    # source epoch split over two run epochs): only a whole shard is skipped unread
                    whole = piece.start == 0 and piece.stop == self.shard_counts.get(piece.shard)
                    if whole and len(done) >= piece.stop:
                        continue
                    self._epoch, self._piece, self._exclude = epoch, piece, {piece.shard: done}
                    self.shards = [piece.shard]
                    tasks += super(EpochShuffledDatasource, self).get_read_tasks(1, per_task_row_limit, data_context)
        finally:
            self.shards, self._piece = self.all_shards, None
        return tasks

    def schema(self) -> pa.Schema:
        return super().schema().append(pa.field("part", pa.string()))

    def _window(self, group: list[str]) -> tuple[int, int] | None:
        return (self._piece.start, self._piece.stop) if self._piece is not None else None

    def _reader(self, group: list[str], schema: pa.Schema):
        read, part = super()._reader(group, schema), self._piece.part

        def read_part():
            for table in read():
                yield table.append_column("part", pa.array(np.full(len(table), part, object), pa.string()))

        return read_part
