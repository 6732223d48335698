"""Whole shards out of rows that arrive in any order: the `embed` job's driver collects the
actors' rows here and commits a shard only once every row of it has arrived, so one
streaming Ray Data execution can run over all pending shards while commits land along the
way (one execution per commit group would start the actor pool, and load the model in every
actor, once per group).

A shard is complete when its rows number its reader's mark (`shard_rows`, on the last row
the reader yields from it: `pipelines.datasource.WebDatasetDatasource(mark_shard_ends=True)`).
An empty shard has no mark; it, and every other shard, is complete when the execution has
ended (`rest`).
"""
from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc

MARK = "shard_rows"


class ShardBuffer:
    def __init__(self, shards: list[str]):
        self.waiting = list(shards)          # not yet taken, in input order
        self.waiting_set = set(shards)
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.got: Counter = Counter()
        self.expected: dict[str, int] = {}
        self.ready: list[str] = []           # complete, not yet taken, in completion order
        self.ready_set: set[str] = set()
        self.nbytes: dict[str, int] = {}     # of each ready shard's rows
        self.ready_bytes = 0

    def add(self, table: pa.Table) -> None:
        """One batch of rows (any shards, any order), with a `source` and a `shard_rows` column."""
        for source in pc.unique(table.column("source")).to_pylist():
            part = table.filter(pc.equal(table.column("source"), source))
            if source not in self.waiting_set:
                raise RuntimeError(f"a row of {source!r}, which is not a shard of this job (or is already committed)")
            mark = pc.max(part.column(MARK)).as_py() or 0
            self.parts[source].append(part.drop_columns([MARK]))
            self.got[source] += part.num_rows
            if mark:
                self.expected[source] = mark
            if self.got[source] > self.expected.get(source, self.got[source]):
                raise RuntimeError(f"{source}: {self.got[source]} rows arrived, its reader marked {self.expected[source]}")
            if self.got[source] == self.expected.get(source):
                self.ready.append(source)
                self.ready_set.add(source)
                self.nbytes[source] = sum(t.nbytes for t in self.parts[source])
                self.ready_bytes += self.nbytes[source]

    def take_ready(self, limit: int | None = None) -> tuple[list[str], list[pa.Table]]:
        """The first `limit` (default: all) complete shards and their rows, handed over once."""
        shards = self.ready[:limit]
        return shards, self.take(shards)

    def rest(self) -> list[str]:
        """After the execution ended: every shard not yet taken, all complete now (an empty one
        too), in input order; a shard that got fewer rows than its mark is a bug."""
        short = [s for s in self.waiting if s in self.expected and self.got[s] != self.expected[s]]
        if short:
            s = short[0]
            raise RuntimeError(f"the execution ended with {self.got[s]} of {self.expected[s]} rows of {s}")
        return list(self.waiting)

    def take(self, shards: list[str]) -> list[pa.Table]:
        """The rows of `shards` (complete ones), handed over once."""
        taken = set(shards)
        self.waiting = [s for s in self.waiting if s not in taken]
        self.waiting_set -= taken
        for s in shards:
            if s in self.ready_set:
                self.ready_set.discard(s)
                self.ready_bytes -= self.nbytes.pop(s)
        self.ready = [s for s in self.ready if s not in taken]
        return [t for s in shards for t in self.parts.pop(s, [])]
