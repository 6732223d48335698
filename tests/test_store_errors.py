"""A store error is not a data error: only "not found" marks a shard bad; a refused access or a
store that stays down stops the job in one line, marks nothing done, and a re-run with access
restored processes the shard.

Real moto server on loopback behind a real HTTP proxy (s3_access.py, on faulty_s3.py's) that
answers S3's own 403 AccessDenied for chosen objects or listings, and 503 SlowDown for every
object read.
"""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, s3_raw_corpus
from s3_access import access_proxy, on_object  # noqa: F401  (the fixture)
from pipelines import reasons
from pipelines.preprocess import preprocess
from pipelines.retry import DENIED, FAILED, NOT_FOUND, TRANSIENT, StoreError, store_error_kind
from pipelines.shards import expand_shards
from pipelines.source import iter_tar_samples

SHARDS = [f"shard-{i:06d}.tar" for i in range(3)]


@pytest.fixture()
def proxy(access_proxy):
    return access_proxy


@pytest.fixture(scope="module")
def data(s3_server, tmp_path_factory):
    """A bucket with a raw corpus (3 shards of 4 samples) under raw/, and its local copy."""
    return s3_raw_corpus(s3_server, tmp_path_factory.mktemp("storeerr"), "storeerr", SHARDS, samples=12, seed=4)


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "ray_job.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def error_lines(result):
    """The error lines of a failed command's stderr. Ray forwards the shard tasks' warnings
    (a retry's "read at byte N failed ..., retry 2/4") to it as well, even after the error."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def listing(fs, prefix):
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(prefix)) if fs.exists(prefix) else []


def test_the_classification():
    import aiohttp
    import botocore.exceptions as bx
    from multidict import CIMultiDict
    from yarl import URL

    def client_error(code, status):
        return bx.ClientError({"Error": {"Code": code, "Message": "m"},
                               "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def http_error(status):
        info = aiohttp.RequestInfo(URL("https://x/y.tar"), "GET", CIMultiDict(), URL("https://x/y.tar"))
        return aiohttp.ClientResponseError(info, (), status=status)

    assert store_error_kind(FileNotFoundError(2, "gone")) == NOT_FOUND
    assert store_error_kind(client_error("NoSuchKey", 404)) == NOT_FOUND
    assert store_error_kind(http_error(404)) == NOT_FOUND
    for denied in (PermissionError(13, "no"), client_error("AccessDenied", 403), client_error("ExpiredToken", 400),
                   client_error("InvalidAccessKeyId", 403), http_error(401), http_error(403),
                   bx.NoCredentialsError()):
        assert store_error_kind(denied) == DENIED, denied
    for down in (OSError(16, "Please reduce your request rate."), ConnectionResetError(), TimeoutError(),
                 client_error("ServiceUnavailable", 503), http_error(503),
                 bx.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")):
        assert store_error_kind(down) == TRANSIENT, down
    assert store_error_kind(OSError(5, "Input/output error")) == FAILED
    assert store_error_kind(StoreError("x")) == FAILED
    # a format error or a bug is not the store's
    import tarfile
    assert store_error_kind(tarfile.ReadError("bad header")) is None
    assert store_error_kind(ValueError("x")) is None


def test_missing_shard_is_still_a_data_error(data, s3_server):
    url = f"s3://{data['bucket']}/raw/deleted-meanwhile.tar"
    got = list(iter_tar_samples(url, storage_options=s3_server["storage_options"]))
    assert [(s.key, s.error.reason) for s in got] == [("", reasons.SHARD_UNREADABLE)]


def test_a_403_when_opening_or_mid_stream_is_a_store_error_not_a_damaged_shard(data, proxy):
    bucket = data["bucket"]
    url = f"s3://{bucket}/raw/{SHARDS[0]}"
    proxy.deny = on_object(bucket, f"raw/{SHARDS[0]}")
    with pytest.raises(StoreError) as e:
        list(iter_tar_samples(url, storage_options=proxy.storage_options))
    assert url in str(e.value) and "\n" not in str(e.value) and "access refused" in str(e.value)

    # the credential expires after 8 requests for the shard (its HEAD, 7 of ~14 ranges): small blocks so
    # that samples were already yielded; never a truncated_shard record for them
    proxy.allow_first, proxy.denied = 8, 0
    opts = {**proxy.storage_options, "default_block_size": 64 * 1024}
    got = []
    with pytest.raises(StoreError) as e:
        for sample in iter_tar_samples(url, storage_options=opts):
            got.append(sample)
    assert got and all(s.error is None for s in got)  # what came before the 403 is whole
    assert "access refused" in str(e.value) and url in str(e.value)
    assert proxy.denied >= 1


def test_a_listing_refused_is_one_line_not_a_missing_folder(data, proxy):
    bucket = data["bucket"]
    proxy.deny = lambda method, path: path.startswith(f"/{bucket}") and "list-type=2" in path
    with pytest.raises(StoreError) as e:
        expand_shards([f"s3://{bucket}/raw/*.tar"], proxy.storage_options)
    assert "cannot list" in str(e.value) and "\n" not in str(e.value)
    assert proxy.denied >= 1


def test_403_on_one_shard_fails_the_job_in_one_line_and_a_rerun_with_access_processes_it(
        data, proxy, s3_server, ray_cluster):
    bucket, fs = data["bucket"], data["fs"]
    reference = f"s3://{bucket}/ref403"
    preprocess([f"s3://{bucket}/raw"], reference, storage_options=s3_server["storage_options"], progress=False)

    out = f"s3://{bucket}/out403"
    proxy.deny = on_object(bucket, f"raw/{SHARDS[1]}")
    args = ["preprocess", f"s3://{bucket}/raw", "--output", out, "--quiet", "--workers", "1",
            "--storage-options", json.dumps(proxy.storage_options)]
    first = run_cli(*args)
    assert first.returncode == 2, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    lines = error_lines(first)
    assert len(lines) == 1  # besides it, only the shard tasks' forwarded warnings (retries)
    assert f"s3://{bucket}/raw/{SHARDS[1]}" in lines[0] and "access refused" in lines[0]
    assert proxy.denied >= 1
    names = listing(fs, f"{bucket}/out403")
    # shard 0 ran first (--workers 1: in order) and stays done; shard 1 is not done, and no
    # quarantine row names it; nothing is committed
    assert "shard-000000.done.json" in names and "shard-000001.done.json" not in names
    assert "shard-000001.quarantine.parquet" not in names and "_stats.json" not in names

    proxy.deny = lambda method, path: False  # access restored
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(2 processed now, 1 already done)" in second.stdout
    fs.invalidate_cache()
    for name in ("_manifest.parquet", "_quarantine.parquet", *SHARDS):
        assert fs.cat(f"{bucket}/out403/{name}") == fs.cat(f"{bucket}/ref403/{name}"), name
    with fs.open(f"{bucket}/out403/_manifest.parquet", "rb") as f:
        assert pq.read_table(f).num_rows == 12


def test_a_store_that_stays_down_fails_the_job_in_one_line_with_no_quarantine(data, proxy, ray_cluster):
    bucket, fs = data["bucket"], data["fs"]
    proxy.slowdown_every, proxy.burst = 1, 10**6  # every object read answers 503 SlowDown
    # botocore's own attempts down to 1 (the user's setting wins over ours), so this takes seconds
    opts = {**proxy.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}}}
    result = run_cli("preprocess", f"s3://{bucket}/raw", "--output", f"s3://{bucket}/down", "--quiet",
                     "--storage-options", json.dumps(opts))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1  # besides it, only the shard tasks' forwarded warnings (retries)
    assert f"s3://{bucket}/raw/shard-" in lines[0] and "try again later" in lines[0]
    assert proxy.counts["slowdown"] > 0
    names = listing(fs, f"{bucket}/down")
    assert not [n for n in names if n.endswith((".done.json", ".quarantine.parquet"))]
    assert "_quarantine.parquet" not in names and "_stats.json" not in names


def test_403_on_one_shard_fails_train_in_one_line(data, proxy, ray_cluster, tmp_path):
    """The training workers meet the refusal (the driver reads no shard of raw input): Ray
    Train reports the failed worker, and the CLI shows the store's one line, not its report."""
    bucket = data["bucket"]
    proxy.deny = on_object(bucket, f"raw/{SHARDS[1]}")
    r = run_cli("train", "--data", f"s3://{bucket}/raw", "--run-dir", tmp_path / "run", "--max-steps", "2",
                "--batch-size", "4", "--max-failures", "0", "--storage-options", json.dumps(proxy.storage_options))
    assert r.returncode == 2, r.stderr[-3000:]
    lines = error_lines(r)
    assert len(lines) == 1, r.stderr[-3000:]
    assert f"s3://{bucket}/raw/{SHARDS[1]}" in lines[0] and "access refused" in lines[0], lines[0]
    assert proxy.denied >= 1


def test_403_inside_a_task_of_several_shards_names_that_shard_in_one_line(data, proxy, ray_cluster):
    # three shards in one Ray task: the store refuses the second; the driver cannot ask the
    # (failing) store where the task stopped, so the task names the shard itself
    bucket = data["bucket"]
    proxy.deny = on_object(bucket, f"raw/{SHARDS[1]}")
    with pytest.raises(StoreError) as e:
        preprocess([f"s3://{bucket}/raw"], f"s3://{bucket}/outbatch", storage_options=proxy.storage_options,
                   progress=False, shards_per_task=3)
    message = str(e.value)
    assert "\n" not in message and "access refused" in message, message
    assert f"raw/{SHARDS[1]} -> s3://{bucket}/outbatch/{SHARDS[1]}" in message, message
    assert proxy.denied >= 1
