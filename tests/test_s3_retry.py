"""Transient read errors from an S3-compatible server are retried, not fatal.

Real moto server on loopback, a real fault-injecting HTTP proxy in front of it (faulty_s3.py):
503 SlowDown answers and responses cut mid-body. Every test asserts that faults were really
injected, so it cannot pass by not exercising the retries.
"""
import io
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import s3fs

from conftest import ROOT, s3_raw_corpus
from mmtrain.audit import read_audit
from faulty_s3 import faulty_s3  # noqa: F401  (the fixture)
from pipelines.preprocess import preprocess
from pipelines.retry import S3_RETRIES, ReadRetriesExhausted, RetryPolicy, open_retrying, with_retry_defaults
from pipelines.source import _iter_stream, iter_tar_samples

SHARDS = [f"shard-{i:06d}.tar" for i in range(4)]


@pytest.fixture(scope="module")
def data(s3_server, tmp_path_factory):
    """One bucket for the module, holding a raw corpus (48 samples, 4 shards of 1.6-3 MB)
    under raw/ (the local copy too, as the reference for what a read must give)."""
    return s3_raw_corpus(s3_server, tmp_path_factory.mktemp("s3retry"), "retry", SHARDS, samples=48, seed=11)


@pytest.fixture(scope="module")
def reference(data, s3_server, ray_cluster):
    """The clean preprocess output of raw/ under ref/, read and written without the proxy:
    what a faulty run must equal, and the training data."""
    out = f"s3://{data['bucket']}/ref"
    preprocess([f"s3://{data['bucket']}/raw"], out, storage_options=s3_server["storage_options"], progress=False)
    return out


def sample_view(samples):
    return [(s.key, s.position, s.members, s.error) for s in samples]


@pytest.mark.parametrize("mix", ["every_nth", "burst"])
def test_streaming_a_shard_through_faults_yields_the_same_samples(data, faulty_s3, mix):
    # a small block size: the 3 MB shard comes in ~12 range GETs, so faults land mid-stream,
    # after samples were already yielded
    opts = {**faulty_s3.storage_options, "default_block_size": 256 * 1024}
    if mix == "burst":
        # 6 cuts in a row on one range, mid-shard: more than s3fs's own 5 attempts, so only
        # our layer (reopen at the offset) gets through
        faulty_s3.slowdown_every, faulty_s3.cut_every, faulty_s3.burst = 0, 10, 6
    url = f"s3://{data['bucket']}/raw/{SHARDS[0]}"
    got = list(iter_tar_samples(url, storage_options=opts))
    expected = list(iter_tar_samples(str(data["local"] / SHARDS[0])))
    assert len(got) == 12 and sample_view(got) == sample_view(expected)
    assert all(s.source == url for s in got)
    assert faulty_s3.counts["cut"] > 0
    if mix == "every_nth":
        assert faulty_s3.counts["slowdown"] > 0
    else:
        assert faulty_s3.counts["cut"] >= faulty_s3.burst  # at least one whole burst was served


def test_persistent_faults_end_in_one_clear_error_not_a_damaged_shard(data, faulty_s3):
    faulty_s3.slowdown_every, faulty_s3.cut_every, faulty_s3.burst = 0, 1, 10**6
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **faulty_s3.storage_options)
    fs.retries = 1  # s3fs's own attempts, so that the test takes a second, not ten
    path = f"{data['bucket']}/raw/{SHARDS[1]}"
    with pytest.raises(ReadRetriesExhausted) as e:
        with open_retrying(fs, path, name=f"s3://{path}", policy=RetryPolicy(attempts=3, base_delay=0.01)) as f:
            f.read()
    message = str(e.value)
    assert "\n" not in message and f"s3://{path}" in message and "3 times" in message
    assert faulty_s3.counts["cut"] == 3

    # and the tar reader lets that error through instead of recording a truncated shard
    class Outage(io.RawIOBase):
        def readable(self):
            return True

        def read(self, n=-1):
            raise ReadRetriesExhausted("s3://b/x.tar: read at byte 0 failed 5 times")

    with pytest.raises(ReadRetriesExhausted):
        list(_iter_stream(Outage(), "s3://b/x.tar"))


def test_s3_retry_defaults_never_override_the_users_settings():
    mine = {"config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 3}}
    assert with_retry_defaults("s3://b/x", mine) == mine
    added = with_retry_defaults("s3://b/x", {"config_kwargs": {"connect_timeout": 3}})
    assert added["config_kwargs"] == {"connect_timeout": 3, "retries": S3_RETRIES}
    assert with_retry_defaults("/local/x.tar", {}) == {}


def manifest_rows(fs, prefix, name):
    with fs.open(f"{prefix}/{name}", "rb") as f:
        return sorted(pq.read_table(f).to_pylist(), key=lambda r: (r["source"], r["key"]))


def every_read_faults_once(proxy):
    """Every first GET of an object is cut (every third answers 503 instead) and its retry
    passes: deterministic however Ray's tasks interleave, so each shard surely sees a fault."""
    proxy.slowdown_every, proxy.cut_every, proxy.burst = 3, 1, 1


def faulted_shards(proxy, prefix):
    return {obj.rsplit("/", 1)[-1] for _, obj in proxy.faulted if obj.endswith(".tar") and f"/{prefix}/" in obj}


def test_preprocess_of_s3_input_through_faults_gives_the_clean_output(data, reference, faulty_s3):
    bucket, fs = data["bucket"], data["fs"]
    every_read_faults_once(faulty_s3)
    stats = preprocess([f"s3://{bucket}/raw"], f"s3://{bucket}/faulty", storage_options=faulty_s3.storage_options,
                       progress=False)
    fs.invalidate_cache()
    clean = manifest_rows(fs, f"{bucket}/ref", "_manifest.parquet")
    assert len(clean) == 48 and stats["written"] == 48
    assert manifest_rows(fs, f"{bucket}/faulty", "_manifest.parquet") == clean
    assert manifest_rows(fs, f"{bucket}/faulty", "_quarantine.parquet") == []
    assert fs.cat(f"{bucket}/faulty/{SHARDS[0]}") == fs.cat(f"{bucket}/ref/{SHARDS[0]}")
    # faults hit every shard the Ray tasks streamed, not only the job's own small files
    assert faulted_shards(faulty_s3, "raw") == set(SHARDS)


def test_training_on_s3_through_faults_completes_and_serves_no_sample_twice(data, reference, faulty_s3, tmp_path):
    run = tmp_path / "run"
    every_read_faults_once(faulty_s3)
    r = subprocess.run(
        [sys.executable, str(ROOT / "ray_job.py"), "train", "--data", reference, "--run-dir", str(run),
         "--max-steps", "3", "--batch-size", "8", "--storage-options", json.dumps(faulty_s3.storage_options),
         "--audit-samples"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    served = [tuple(i) for row in read_audit(str(run)) for i in row["ids"]]  # (source, key, epoch)
    assert served and len(served) == len(set(served))
    known = {(f"{reference}/{r['output_shard']}", r["key"])
             for r in manifest_rows(data["fs"], reference.removeprefix("s3://"), "_manifest.parquet")}
    assert {(source, key) for source, key, _ in served} <= known
    assert faulted_shards(faulty_s3, "ref") == set(SHARDS)
