"""Whole shards out of rows in any order: the reader's shard-end marks (real tar files through
`WebDatasetDatasource`'s read tasks) and `ShardBuffer`, which the `embed` job commits from."""
from __future__ import annotations

import random

import pyarrow as pa
import pytest

from mmtrain.inference.shard_buffer import ShardBuffer
from pipelines.datasource import WebDatasetDatasource
from tarutil import write_tar


def shard(path, keys: list[str], broken: tuple[str, ...] = ()) -> str:
    members = []
    for k in keys:
        members.append((f"{k}.txt", f"caption {k}".encode()))
        if k in broken:  # a member whose name says .jpg twice: the reader's error row for that sample
            members.append((f"{k}.jpg", b"x"))
            members.append((f"{k}.jpg", b"y"))
    write_tar(path, members)
    return str(path)


def read_all(source: WebDatasetDatasource) -> pa.Table:
    return pa.concat_tables([block for task in source.get_read_tasks(2) for block in task()])


@pytest.mark.parametrize("rows_per_block", [1, 3, 7, 100])
def test_the_last_row_of_each_shard_carries_its_count(tmp_path, rows_per_block):
    shards = [shard(tmp_path / "a.tar", [f"a{i}" for i in range(7)], broken=("a6",)),
              shard(tmp_path / "b.tar", []),
              shard(tmp_path / "c.tar", ["c0"]),
              shard(tmp_path / "d.tar", [f"d{i}" for i in range(3)])]
    table = read_all(WebDatasetDatasource(shards, rows_per_block=rows_per_block, mark_shard_ends=True))
    rows = table.to_pylist()
    assert all(len(block) <= rows_per_block for task in WebDatasetDatasource(
        shards, rows_per_block=rows_per_block, mark_shard_ends=True).get_read_tasks(2) for block in task())
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["source"], []).append(row)
    assert {s: len(r) for s, r in by_shard.items()} == {shards[0]: 7, shards[2]: 1, shards[3]: 3}
    assert any(r["error"] for r in by_shard[shards[0]])  # the error row is counted like any other
    for rs in by_shard.values():  # the reader yields a shard's rows in order: the mark is on its last
        assert [r["shard_rows"] for r in rs] == [0] * (len(rs) - 1) + [len(rs)]
    plain = read_all(WebDatasetDatasource(shards, rows_per_block=rows_per_block))
    assert "shard_rows" not in plain.column_names and plain.num_rows == table.num_rows


def marked_rows(counts: dict[str, int]) -> list[dict]:
    return [{"source": s, "key": f"{s}-{i}", "shard_rows": n if i == n - 1 else 0}
            for s, n in counts.items() for i in range(n)]


def batches(rows: list[dict], size: int) -> list[pa.Table]:
    return [pa.Table.from_pylist(rows[i:i + size]) for i in range(0, len(rows), size)]


def test_a_shard_is_ready_only_when_all_its_rows_arrived_in_any_order():
    counts = {"s0": 5, "s1": 1, "s2": 4, "s3": 3}
    rows = marked_rows(counts)
    random.Random(7).shuffle(rows)  # an actor pool keeps no order: the mark may come first
    buffer, taken = ShardBuffer([*counts, "empty"]), {}
    for batch in batches(rows, 3):
        before = {s: buffer.got[s] for s in counts}
        buffer.add(batch)
        for s in buffer.ready:
            assert buffer.got[s] == counts[s]
        for s in set(counts) - set(buffer.ready) - set(taken):
            assert buffer.got[s] < counts[s] or before[s] == buffer.got[s] == counts[s]
        shards, parts = buffer.take_ready()
        for s in shards:
            taken[s] = sum(p.filter(pa.compute.equal(p["source"], s)).num_rows for p in parts)
        assert all("shard_rows" not in p.column_names for p in parts)
    assert taken == counts
    assert buffer.rest() == ["empty"] and buffer.take(["empty"]) == []  # no rows, no mark: complete at the end


def test_shards_are_handed_over_once_and_at_most_limit_at_a_time():
    buffer = ShardBuffer(["s0", "s1", "s2", "s3"])
    buffer.add(pa.Table.from_pylist(marked_rows({"s2": 1, "s0": 2, "s1": 3})))  # three complete in one batch
    assert buffer.ready == ["s2", "s0", "s1"] and buffer.ready_bytes > 0
    shards, parts = buffer.take_ready(1)
    assert shards == ["s2"] and sum(p.num_rows for p in parts) == 1 and buffer.ready == ["s0", "s1"]
    assert buffer.take_ready(5)[0] == ["s0", "s1"] and buffer.ready_bytes == 0
    buffer.add(pa.Table.from_pylist(marked_rows({"s3": 2})[:1]))  # s3's mark never came before the end
    assert buffer.rest() == ["s3"] and sum(p.num_rows for p in buffer.take(["s3"])) == 1
    assert buffer.rest() == [] and buffer.take_ready() == ([], [])


def test_rows_that_cannot_belong_are_bugs_not_data():
    buffer = ShardBuffer(["s0"])
    with pytest.raises(RuntimeError, match="not a shard of this job"):
        buffer.add(pa.Table.from_pylist(marked_rows({"other": 1})))
    buffer.add(pa.Table.from_pylist(marked_rows({"s0": 2})))
    assert buffer.take_ready()[0] == ["s0"]
    with pytest.raises(RuntimeError, match="already committed"):  # a late row of a committed shard
        buffer.add(pa.Table.from_pylist(marked_rows({"s0": 1})))
    short = ShardBuffer(["s1"])
    short.add(pa.Table.from_pylist(marked_rows({"s1": 3})[1:]))  # one row of three never came
    with pytest.raises(RuntimeError, match="2 of 3 rows"):
        short.rest()
    extra = ShardBuffer(["s2"])
    with pytest.raises(RuntimeError, match="3 rows arrived, its reader marked 2"):
        extra.add(pa.Table.from_pylist(marked_rows({"s2": 2}) + [{"source": "s2", "key": "x", "shard_rows": 0}]))
