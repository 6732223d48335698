"""The training dataset over a pass of epochs: real Ray Data reading real preprocessed shards,
the epoch clock as a real actor. One execution serves every epoch of the pass, each epoch in
its own seeded shard order, rows tagged with their epoch, ids already trained on left out."""
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import ray

from mmtrain.audit import manifest_ids
from pipelines.config import DataConfig
from pipelines.corpus import make_corpus
from pipelines.dataset import shard_counts
from pipelines.datasource import sample_row, sample_schema
from pipelines.ingest import (RAW_COLUMNS, EpochShuffledDatasource, build_dataset, decode_batch, epoch_clock,
                              epochs_per_pass)
from pipelines.preprocess import preprocess
from pipelines.shards import expand_shards
from pipelines.source import iter_tar_samples
from pipelines.transform import transform_sample


@pytest.fixture(scope="module")
def clean(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    make_corpus(str(root / "raw"), 24, 6, seed=5)
    preprocess([str(root / "raw")], str(root / "clean"), progress=False)
    return str(root / "clean")


@pytest.fixture()
def clock():
    name = f"test-clock-{time.time_ns()}"
    handle = epoch_clock(name)
    yield name, handle
    ray.kill(handle)


def read(clean, clock_name, **kwargs):
    shards = expand_shards([clean])
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the test reads rows in task order
    try:
        ds = build_dataset(shards, DataConfig(), seed=3, preprocessed=True, clock_name=clock_name,
                           shard_counts=shard_counts(shards, None), **kwargs)
        return list(ds.iter_rows())
    finally:
        ctx.execution_options.preserve_order = False


def test_one_execution_serves_every_epoch_of_the_pass_minus_what_was_trained_on(clean, clock):
    name, handle = clock
    ids = sorted(manifest_ids([clean]))
    shards = sorted({s for s, _ in ids})
    whole_shard = [i for i in ids if i[0] == shards[0]]   # epoch 1: a whole shard was trained on
    some = ids[-3:] if ids[-1][0] != shards[0] else ids[:3]  # epoch 2: three samples of another
    ray.get(handle.set.remote(0, 2, {1: whole_shard, 2: some}))
    rows = read(clean, name)

    by_epoch = {}
    for r in rows:
        by_epoch.setdefault(r["epoch"], []).append((r["source"], r["key"]))
    assert sorted(by_epoch) == [0, 1, 2]
    assert all(n == 1 for served in by_epoch.values() for n in Counter(served).values())
    assert set(by_epoch[0]) == set(ids)
    assert set(by_epoch[1]) == set(ids) - set(whole_shard)
    assert set(by_epoch[2]) == set(ids) - set(some)
    # epochs come one after the other, each in its own seeded shard order
    assert [r["epoch"] for r in rows] == sorted(r["epoch"] for r in rows)
    orders = [list(dict.fromkeys(s for s, _ in by_epoch[e])) for e in (0, 1, 2)]
    source = EpochShuffledDatasource(expand_shards([clean]), seed=3, preprocessed=True)
    assert orders[0] == source.epoch_order(0, {}) != source.epoch_order(1, {})
    assert orders[1] == [s for s in source.epoch_order(1, {}) if s != shards[0]]


def test_a_shard_trained_on_whole_is_not_read(clean, clock):
    name, handle = clock
    ids = sorted(manifest_ids([clean]))
    first = [i for i in ids if i[0] == ids[0][0]]
    ray.get(handle.set.remote(4, 5, {4: first}))
    shards = expand_shards([clean])
    source = EpochShuffledDatasource(shards, seed=3, preprocessed=True, clock_name=name,
                                     shard_counts=shard_counts(shards, None))
    tasks = source.get_read_tasks(len(shards))
    assert len(tasks) == 2 * len(shards) - 1
    read_per_epoch = Counter(t.metadata.input_files[0] for t in tasks)
    assert read_per_epoch[ids[0][0]] == 1 and all(n == 2 for s, n in read_per_epoch.items() if s != ids[0][0])


def test_ranks_split_each_epoch_of_the_pass_without_overlap(clean, clock):
    name, handle = clock
    ray.get(handle.set.remote(0, 1, {}))
    served = [read(clean, name, rank=r, world=2) for r in (0, 1)]
    for epoch in (0, 1):
        mine = [{(r["source"], r["key"]) for r in rows if r["epoch"] == epoch} for rows in served]
        assert not mine[0] & mine[1] and mine[0] | mine[1] == manifest_ids([clean])


def test_epochs_per_pass_is_bounded_by_samples():
    assert epochs_per_pass(640) == 312 and epochs_per_pass(10**6) == 1 and epochs_per_pass(None) == 1


def test_raw_rows_decode_to_the_arrays_preprocessing_makes(tmp_path):
    # the raw path of the ingest runs the transform of preprocessing: the same crop, caption,
    # log-mel and valid frames (the batch holds the log-mel in float16, as a stored one is)
    make_corpus(str(tmp_path / "raw"), 6, 1, seed=2)
    cfg = DataConfig()
    samples = list(iter_tar_samples(expand_shards([str(tmp_path / "raw")])[0]))
    out = decode_batch(pa.Table.from_pylist([sample_row(raw, RAW_COLUMNS) for raw in samples],
                                            schema=sample_schema(RAW_COLUMNS)), cfg)
    assert list(out["key"]) == [raw.key for raw in samples]
    assert out["image_present"].any() and out["audio_present"].any()
    for i, raw in enumerate(samples):
        p = transform_sample(raw, cfg)
        assert out["image_present"][i] == (p.image is not None) and out["audio_present"][i] == (p.mel is not None)
        assert out["text"][i] == (p.text or "")
        if p.image is not None:
            assert np.array_equal(out["image"][i], p.image)
        if p.mel is not None:
            assert np.array_equal(out["mel"][i], p.mel.astype(np.float16)) and out["mel_frames"][i] == p.mel_frames
