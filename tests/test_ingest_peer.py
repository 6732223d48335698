"""benchmarks/ingest_ceiling.py compares the training ingest with a webdataset + DataLoader
peer that must do the same work: this checks that the peer's batches equal the ingest's,
sample for sample, on the same preprocessed shards (its speed is the benchmark's business)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from mmtrain.batch import Collate
from mmtrain.tokenizer import ByteTokenizer
from pipelines.config import DataConfig
from pipelines.ingest import EpochShuffledDatasource, decode_batch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
harness = pytest.importorskip("harness")
ingest_ceiling = pytest.importorskip("ingest_ceiling")


def by_id(batches: list[dict]) -> dict[tuple, dict]:
    rows = {}
    for b in batches:
        for i, (source, key, _) in enumerate(b["ids"]):
            rows[source, key] = {k: v[i] for k, v in b.items() if k != "ids"}
    return rows


def test_the_peer_decodes_and_collates_as_the_ingest(tmp_path):
    cfg = DataConfig()
    shards = harness.write_preprocessed_shards(str(tmp_path), 10, 2, cfg, pool=3)
    collate = Collate(ByteTokenizer(), 4, 64, cfg.image.size, cfg.audio.n_mels, cfg.audio.num_frames)
    source = EpochShuffledDatasource(shards, seed=0, preprocessed=True, rows_per_block=4)
    ours = [collate(decode_batch(table, cfg)) for task in source.get_read_tasks(2) for table in task()]
    peer = list(ingest_ceiling.peer_loader(shards, collate, cfg, workers=0, batch_size=4, shuffle_buffer=0))

    ours, peer = by_id(ours), by_id(peer)
    assert len(ours) == 10 and ours.keys() == peer.keys()
    for sample_id, row in ours.items():
        for k, v in row.items():
            assert v.dtype == peer[sample_id][k].dtype and torch.equal(v, peer[sample_id][k]), (sample_id, k)
    assert all(np.any(row["image"].numpy()) and row["mel_frames"] > 0 for row in ours.values())
