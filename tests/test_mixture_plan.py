"""The plan of a weighted mixture of sources (pipelines/mixture.py) and its config
(mmtrain/data_sources.py): pure functions, no Ray."""
from __future__ import annotations

from collections import Counter

import pytest

from mmtrain.config import RunConfig
from mmtrain.data_sources import parse_data_args
from pipelines.errors import ConfigError
from pipelines.mixture import Mixture, source_of_part


def _sources(sizes: dict[str, int], per_shard: int = 20, weights: dict | None = None, repeats: dict | None = None):
    out = []
    for name, size in sizes.items():
        counts = {f"/{name}/shard-{i:02d}.tar": min(per_shard, size - i * per_shard)
                  for i in range((size + per_shard - 1) // per_shard)}
        out.append((name, counts, (weights or {}).get(name), (repeats or {}).get(name)))
    return out


def _served(mixture: Mixture, epochs: int) -> Counter:
    """(part, shard, position) -> times served over `epochs` run epochs."""
    served = Counter()
    for epoch in range(epochs):
        for p in mixture.pieces(epoch):
            for position in range(p.start, p.stop):
                served[(p.part, p.shard, position)] += 1
    return served


def test_quotas_follow_the_weights_and_every_sample_comes_once_per_source_epoch():
    specs = _sources({"web": 200, "curated": 100, "speech": 20},
                     weights={"web": 0.6, "curated": 0.3, "speech": 0.1})
    mixture = Mixture.plan(specs, None, seed=3)
    assert mixture.samples_per_epoch == 320  # default: the sum of the sources
    assert {s.name: s.quota for s in mixture.sources} == {"web": 192, "curated": 96, "speech": 32}
    served = _served(mixture, 5)
    assert set(served.values()) == {1}  # no (source epoch, sample) twice
    by_part = Counter(part for part, _, _ in served)
    # speech (20 samples, 32 per epoch) is repeated: 160 samples = exactly 8 of its epochs
    assert [by_part[f"speech/{k}"] for k in range(8)] == [20] * 8 and "speech/8" not in by_part
    # web (200, 192 per epoch) is subsampled: 960 samples = 4 whole epochs and 160 of the 5th
    assert [by_part[f"web/{k}"] for k in range(5)] == [200] * 4 + [160]
    assert [by_part[f"curated/{k}"] for k in range(5)] == [100] * 4 + [80]
    for epoch in range(5):
        counts = Counter(source_of_part(p.part) for p in mixture.pieces(epoch) for _ in range(p.start, p.stop))
        assert counts == {"web": 192, "curated": 96, "speech": 32}
    assert mixture.source_epochs_done(5) == {"web": 4, "curated": 4, "speech": 8}


def test_the_plan_is_a_function_of_the_seed_and_mixes_the_sources_along_the_epoch():
    specs = _sources({"a": 200, "b": 100}, weights={"a": 1, "b": 1})
    first, again = Mixture.plan(specs, 100, seed=1), Mixture.plan(specs, 100, seed=1)
    assert first.pieces(2) == again.pieces(2)
    other = Mixture.plan(specs, 100, seed=2)
    assert [p.shard for e in range(4) for p in first.pieces(e)] != [p.shard for e in range(4) for p in other.pieces(e)]
    # the read order interleaves the sources: neither source's pieces all come first
    names = [p.source for p in first.pieces(0)]
    assert names[0] != names[-1] or len(set(names[: len(names) // 2])) == 2
    # each source epoch's shard order is a permutation of the source's shards
    for k in range(3):
        order, starts = first.shard_order(first.sources[0], k)
        assert sorted(order) == sorted(first.sources[0].shards) and starts[0] == 0


def test_repeat_and_samples_per_epoch_and_bad_plans():
    specs = _sources({"a": 40, "b": 20}, repeats={"a": 1, "b": 3})
    mixture = Mixture.plan(specs, None, seed=0)
    assert {s.name: s.quota for s in mixture.sources} == {"a": 40, "b": 60}
    scaled = Mixture.plan(_sources({"a": 40, "b": 20}, weights={"a": 3, "b": 1}), 1000, seed=0)
    assert {s.name: s.quota for s in scaled.sources} == {"a": 750, "b": 250}
    with pytest.raises(ConfigError, match="every source a weight"):
        Mixture.plan(_sources({"a": 40, "b": 20}, weights={"a": 1}), None, seed=0)
    with pytest.raises(ConfigError, match="rounds to none"):
        Mixture.plan(_sources({"a": 40, "b": 20}, weights={"a": 1000, "b": 1}), 100, seed=0)
    with pytest.raises(ConfigError, match="has no samples"):
        Mixture.plan([("a", {"/a/0.tar": 0}, 1.0, None), ("b", {"/b/0.tar": 5}, 1.0, None)], None, seed=0)


def test_data_arguments_name_weight_and_keep_urls_whole():
    paths, sources = parse_data_args(["web=s3://bucket/web:0.6", "web=s3://bucket/web2", "speech=/d/s:0.4"])
    assert paths == ["s3://bucket/web", "s3://bucket/web2", "/d/s"]
    assert sources == [{"name": "web", "paths": ["s3://bucket/web", "s3://bucket/web2"], "weight": 0.6},
                       {"name": "speech", "paths": ["/d/s"], "weight": 0.4}]
    assert parse_data_args(["s3://bucket/date=2024/x", "./a=b/c"]) == (["s3://bucket/date=2024/x", "./a=b/c"], None)
    assert parse_data_args(["web=s3://bucket/web"])[1] == [{"name": "web", "paths": ["s3://bucket/web"]}]
    with pytest.raises(ConfigError, match="every entry a NAME="):
        parse_data_args(["web=/a", "/b"])
    with pytest.raises(ConfigError, match="positive number"):
        parse_data_args(["web=/a:-1"])
    with pytest.raises(ConfigError, match="two weights"):
        parse_data_args(["web=/a:1", "web=/b:2"])


def test_the_run_config_carries_sources_and_refuses_bad_ones():
    sources = [{"name": "web", "paths": ["/w"], "weight": 0.7}, {"name": "speech", "paths": ["/s"], "weight": 0.3}]
    cfg = RunConfig.from_dict({"run_dir": "/r", "data": {"sources": sources}, "train": {"samples_per_epoch": 500}})
    assert cfg.data_paths == ("/w", "/s") and [s.name for s in cfg.data.sources] == ["web", "speech"]
    again = RunConfig.from_dict(__import__("json").loads(cfg.to_json()))  # as saved with the run
    assert again.data.sources == cfg.data.sources and again.train.samples_per_epoch == 500
    bad = [({"sources": [{"name": "a b", "paths": ["/x"]}]}, "data source name"),
           ({"sources": [{"name": "a", "paths": ["/x"], "weight": 1, "repeat": 2}]}, "not both"),
           ({"sources": [{"name": "a", "paths": ["/x"]}, {"name": "a", "paths": ["/y"]}]}, "names repeat"),
           ({"sources": [{"name": "a", "paths": ["/x"]}, {"name": "b", "paths": ["/x"]}]}, "two data sources"),
           ({"sources": [{"name": "a", "paths": ["/x"], "wieght": 1}]}, "unknown")]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_dict({"run_dir": "/r", "data": data})
    with pytest.raises(ConfigError, match="sizes the epochs of a mixture"):
        RunConfig.from_dict({"run_dir": "/r", "data_paths": ["/x"], "train": {"samples_per_epoch": 10}})
