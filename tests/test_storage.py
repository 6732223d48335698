"""pipelines/storage.py, the one way from a URL to a filesystem, on local disk and on a real
S3 server (moto): what a URL is (protocol, locality, joins, canonical names), the retry
defaults every filesystem gets, and listings that see what other writers add."""
from __future__ import annotations

import os

import pytest

from pipelines.retry import S3_RETRIES
from pipelines.storage import OutputStore, canonical_url, filesystem, is_local, join, listing, protocol_of


def test_what_a_url_is():
    assert [protocol_of(u) for u in ("/data/x", "file:///data/x", "s3://b/k", "gs://b/k", "https://h/x")] == \
        ["file", "file", "s3", "gs", "https"]
    assert is_local("/data/x") and is_local("file:///data/x") and not is_local("s3://b/k")
    assert join("s3://b/out/", "_parts", "x.json") == "s3://b/out/_parts/x.json"
    assert join("/data/out", "a") == "/data/out/a"


def test_local_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = filesystem("rel/shard.tar")
    assert protocol_of(fs) == "file" and is_local(fs)
    assert canonical_url(fs, path) == str(tmp_path / "rel" / "shard.tar")


def test_local_listing(tmp_path):
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "a.txt").write_bytes(b"abc")
    (tmp_path / "out" / "sub" / "b.bin").write_bytes(b"12345")
    (tmp_path / "out" / "empty").mkdir()
    assert listing(str(tmp_path / "out")) == {"a.txt": 3, "sub/b.bin": 5}
    assert listing(f"file://{tmp_path}/out/sub") == {"b.bin": 5}
    assert listing(str(tmp_path / "absent")) == {}


def test_s3_filesystem_has_retry_defaults(s3_server):
    # a fresh instance: botocore rewrites a connected client's retries dict in place
    # (max_attempts -> total_max_attempts), and fsspec hands out cached instances
    opts = {**s3_server["storage_options"], "skip_instance_cache": True}
    fs, path = filesystem("s3://bucket/some/key", opts)
    assert protocol_of(fs) == "s3" and not is_local(fs) and path == "bucket/some/key"
    assert fs.config_kwargs["retries"] == S3_RETRIES
    assert canonical_url(fs, path) == "s3://bucket/some/key"
    own = {**opts, "config_kwargs": {"retries": {"max_attempts": 2}}}
    assert filesystem("s3://bucket/k", own)[0].config_kwargs["retries"] == {"max_attempts": 2}  # theirs win
    assert "retries" not in (opts.get("config_kwargs") or {})  # the caller's options are not changed


def test_s3_listing_sees_other_writers(s3_bucket, s3_server):
    bucket, writer = s3_bucket  # another filesystem instance: another process, as far as caches go
    opts = s3_server["storage_options"]
    url = f"s3://{bucket}/run"
    assert listing(url, opts) == {}
    writer.pipe_file(f"{bucket}/run/a.txt", b"abc")
    assert listing(url, opts) == {"a.txt": 3}
    writer.pipe_file(f"{bucket}/run/sub/b.bin", b"12345")
    writer.pipe_file(f"{bucket}/runner/c.txt", b"not below run/")
    assert listing(url, opts) == {"a.txt": 3, "sub/b.bin": 5}
    assert listing(join(url, "sub"), opts) == {"b.bin": 5}
    # a listing leaves no cached folder behind that would hide a later file from a lookup
    writer.pipe_file(f"{bucket}/run/sub/later.bin", b"1")
    fs, path = filesystem(url, opts)
    assert fs.exists(join(path, "sub", "later.bin"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_output_store_list(where, tmp_path, request):
    if where == "local":
        url, opts = str(tmp_path / "out"), None
    else:
        bucket, _ = request.getfixturevalue("s3_bucket")
        url, opts = f"s3://{bucket}/out", request.getfixturevalue("s3_server")["storage_options"]
    store = OutputStore(url, opts)
    assert store.list() == [] and store.list("_parts") == []
    store.write_bytes("_parts/0.done.json", b"{}")
    store.write_bytes("shard-000000.tar", b"x")
    assert store.list("_parts") == ["_parts/0.done.json"]
    assert store.list() == ["_parts/0.done.json", "shard-000000.tar"]
    if where == "local":
        assert not [n for n in os.listdir(store.root) if ".tmp-" in n]


def test_a_parquet_file_is_read_on_the_calling_thread_only(tmp_path):
    """Arrow threads that read a Python file can be left waiting for the GIL at exit, which
    aborts a process that did its work (rc -6, seen on `ray_job.py audit`): the manifest
    readers read the file on the caller's thread only, and give the same table."""
    import io
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.retry import read_parquet_file

    buf = io.BytesIO()
    table = pa.table({"key": [f"k{i}" for i in range(50_000)], "n": list(range(50_000))})
    pq.write_table(table, buf, row_group_size=5_000)

    class Spy(io.BytesIO):
        """Notes the thread of every call that reads or moves in the file."""
        def __init__(self):
            super().__init__(buf.getvalue())
            self.threads = set()

        def _seen(self, name, *a):
            self.threads.add(threading.get_ident())
            return getattr(io.BytesIO, name)(self, *a)

        def read(self, *a):
            return self._seen("read", *a)

        def readinto(self, *a):
            return self._seen("readinto", *a)

        def seek(self, *a):
            return self._seen("seek", *a)

    f = Spy()
    assert read_parquet_file(f, ["key"]).equals(table.select(["key"]))
    assert f.threads == {threading.get_ident()}
    # the property is worth a test: pyarrow's own reader reads from other threads
    f = Spy()
    pq.read_table(f, columns=["key"], use_threads=False, pre_buffer=False)
    assert f.threads - {threading.get_ident()}
