"""An output has one owner: never an input, never someone else's folder, never two running jobs;
a dead driver's lock is taken over; a job deletes only its own temporaries.

Real tars, a real Ray cluster, real concurrent CLI processes, a real S3 server (moto) where the
lock works differently (a PUT with `If-None-Match: *` instead of a hard link), and a real slow
store (s3_access.py) that keeps a first job running while a second one starts."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from s3_access import access_proxy, on_object  # noqa: F401  (the fixture)
from pipelines.config import DataConfig
from pipelines.corpus import make_corpus
from pipelines.ownership import OutputBusy, OutputConflict, acquire, check_no_overlap, holder_state
from pipelines.processes import process_start
from pipelines.preprocess import fingerprint, preprocess
from pipelines.shards import expand_shards
from pipelines.storage import OutputStore


def tree_hashes(folder):
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = (hashlib.sha256(open(p, "rb").read()).hexdigest()
                                               if os.path.isfile(p) else "dir")
    return out


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "ray_job.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=kw.pop("cwd", ROOT), timeout=600, **kw)


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    make_corpus(str(root / "D"), 8, 2, seed=2)
    return root / "D"


@pytest.mark.parametrize("inputs, output", [
    (["{D}"], "{D}"),                                   # preprocess D --output D
    (["{D}"], "{D}/clean"),                             # the output inside an input folder
    (["{D}/*.tar"], "{D}/clean"),                       # ... the folder a glob lists
    (["{D}"], "{D}/../D/."),                            # not normalized
    (["{D}"], "file://{D}"),                            # a URL of the same place
    (["{D}/shard-000000.tar"], "{D}"),                  # an input inside the output
    (["{D}/shard-{{000000..000001}}.tar"], "{D}/.."),   # ... two levels up, through a brace pattern
    (["{D}"], "{link}"),                                # a symlink to the input folder
    (["{D}"], "D"),                                     # relative to the working directory
])
def test_an_output_that_overlaps_an_input_is_refused_and_the_input_is_unchanged(corpus, tmp_path, inputs, output,
                                                                                monkeypatch):
    link = tmp_path / "link"
    link.symlink_to(corpus)
    monkeypatch.chdir(corpus.parent)
    before = tree_hashes(corpus)
    fill = {"D": corpus, "link": link}
    with pytest.raises(OutputConflict, match="overlaps the input|contains the input"):
        preprocess([i.format(**fill) for i in inputs], output.format(**fill), progress=False)
    assert tree_hashes(corpus) == before


def test_cli_refuses_d_into_d_in_one_line(corpus):
    before = tree_hashes(corpus)
    line = one_error_line(run_cli("preprocess", corpus, "--output", corpus))
    assert "overlaps the input" in line and str(corpus) in line
    assert tree_hashes(corpus) == before


def test_overlap_on_object_stores_compares_normalized_keys():
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    shards = ["s3://b/raw/shard-000000.tar"]
    for out in ("s3://b/raw", "s3://b/raw/clean", "s3a://b/raw/x/..", "s3://b/", "s3://b/raw//"):
        with pytest.raises(OutputConflict):
            check_no_overlap(["s3://b/raw"], shards, out, opts)
    check_no_overlap(["s3://b/raw"], shards, "s3://b/clean", opts)  # a sibling is fine
    check_no_overlap(["s3://b/raw"], shards, "s3://b/raw-clean", opts)  # a name that only starts alike


def test_a_folder_with_foreign_files_is_refused(corpus, tmp_path):
    out = tmp_path / "theirs"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("someone's")
    before = tree_hashes(out)
    line = one_error_line(run_cli("preprocess", corpus, "--output", out))
    assert "not empty and holds no preprocess output" in line
    assert tree_hashes(out) == before


def test_a_file_as_output_is_refused(corpus, tmp_path):
    (tmp_path / "f.tar").write_bytes(b"mine")
    line = one_error_line(run_cli("preprocess", corpus, "--output", tmp_path / "f.tar"))
    assert "is a file" in line and (tmp_path / "f.tar").read_bytes() == b"mine"


def test_a_prefix_with_foreign_objects_is_refused_on_s3(corpus, s3_bucket, s3_server):
    bucket, fs = s3_bucket
    fs.pipe_file(f"{bucket}/theirs/report.csv", b"a,b\n")
    with pytest.raises(OutputConflict, match="not empty and holds no preprocess output"):
        preprocess([str(corpus)], f"s3://{bucket}/theirs", storage_options=s3_server["storage_options"],
                   progress=False)
    fs.invalidate_cache()
    assert fs.find(f"{bucket}/theirs") == [f"{bucket}/theirs/report.csv"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exclusive_create_lets_one_writer_win(where, tmp_path, s3_bucket, s3_server):
    if where == "local":
        store = OutputStore(str(tmp_path / "o"))
    else:
        store = OutputStore(f"s3://{s3_bucket[0]}/o", s3_server["storage_options"])
    assert store.create_exclusive("_lock/00000001.json", b"first") is True
    assert store.create_exclusive("_lock/00000001.json", b"second") is False
    assert store.read_bytes("_lock/00000001.json") == b"first"
    if where == "local":
        assert os.listdir(tmp_path / "o" / "_lock") == ["00000001.json"]  # no temporary left


def _wait_for(predicate, what, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def test_a_second_job_into_a_running_jobs_output_is_refused_in_one_line(ray_cluster, corpus, access_proxy,
                                                                        s3_bucket, tmp_path):
    # the first job reads its input from a store that holds the reads of one shard until the
    # test lets them through: it is surely running while the other jobs start
    bucket, fs = s3_bucket
    for name in ("shard-000000.tar", "shard-000001.tar"):
        fs.put_file(str(corpus / name), f"{bucket}/raw/{name}")
    access_proxy.hold = on_object(bucket, "raw/shard-000001.tar", "GET")
    raw, out = f"s3://{bucket}/raw", tmp_path / "out"
    opts = json.dumps(access_proxy.storage_options)
    first = subprocess.Popen([sys.executable, str(ROOT / "ray_job.py"), "preprocess", raw, "--output", str(out),
                              "--quiet", "--storage-options", opts], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: access_proxy.held or first.poll() is not None, "the first job's read")
        assert first.poll() is None, first.communicate()[1][-3000:]

        same = one_error_line(run_cli("preprocess", raw, "--output", out, "--quiet", "--storage-options", opts))
        assert "is being written by another preprocess" in same
        assert f"pid {first.pid} on {socket.gethostname()}" in same
        other = one_error_line(run_cli("preprocess", raw, "--output", out, "--quiet", "--image-size", "64",
                                       "--storage-options", opts))
        assert "another preprocess" in other
        assert first.poll() is None  # still held: both were refused while it ran
        access_proxy.gate.set()
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert pq.read_table(out / "_manifest.parquet").num_rows == 8
    lock = json.loads((out / "_lock" / "00000001.json").read_text())
    assert lock["pid"] == first.pid and lock["released"] is True


def test_a_killed_drivers_lock_on_s3_is_taken_over_and_the_run_says_so(ray_cluster, corpus, s3_bucket, s3_server):
    bucket, fs = s3_bucket
    out = f"s3://{bucket}/clean"
    opts = s3_server["storage_options"]
    # a real driver process takes the lock and is killed with it held
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, json, time; sys.path.insert(0, sys.argv[1]);"
        "from pipelines.storage import OutputStore; from pipelines.ownership import acquire;"
        "acquire(OutputStore(sys.argv[2], json.loads(sys.argv[3])), 'x'); print('held', flush=True); time.sleep(600)"),
        str(ROOT), out, json.dumps(opts)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # while it runs, the lock (a PUT with If-None-Match) keeps everyone else out
        with pytest.raises(OutputBusy, match=f"pid {holder.pid} on"):
            preprocess([str(corpus)], out, storage_options=opts, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    said = []
    stats = preprocess([str(corpus)], out, storage_options=opts, progress=False, say=said.append)
    assert stats["written"] == 8 and stats["this_run"]["took_over_from"]["pid"] == holder.pid
    assert len(said) == 1 and said[0].startswith(f"taking over {out}") and f"pid {holder.pid}" in said[0]
    fs.invalidate_cache()
    locks = sorted(fs.find(f"{bucket}/clean/_lock"))
    assert [json.loads(fs.cat(p))["released"] for p in locks] == [False, True]


def test_a_lock_from_another_host_is_taken_over_only_when_its_lease_ran_out(tmp_path):
    store = OutputStore(str(tmp_path / "o"))
    record = {"owner": "x", "host": "some-other-host", "pid": 1, "pid_started": "1", "started": time.time(),
              "renewed": time.time(), "lease_seconds": 60, "released": False, "fingerprint": "f"}
    assert store.create_exclusive("_lock/00000001.json", json.dumps(record).encode())
    with pytest.raises(OutputBusy, match="pid 1 on some-other-host"):
        acquire(store, "f")  # renewed just now: that job may well be running
    stale = {**record, "owner": "y", "renewed": time.time() - 61}
    assert store.create_exclusive("_lock/00000002.json", json.dumps(stale).encode())
    said = []
    lock = acquire(store, "f", say=said.append)
    try:
        assert lock.name == "_lock/00000003.json" and lock.took_over["owner"] == "y"
        assert len(said) == 1 and "pid 1 on some-other-host" in said[0]
        with pytest.raises(OutputBusy):  # and now this process holds it
            acquire(store, "f")
    finally:
        lock.release()
    assert sorted(os.listdir(tmp_path / "o" / "_lock")) == ["00000002.json", "00000003.json"]


def test_only_this_jobs_temporaries_are_deleted(ray_cluster, corpus, tmp_path):
    out = tmp_path / "out"
    preprocess([str(corpus)], str(out), progress=False)
    fp = fingerprint(expand_shards([str(corpus)]), DataConfig())
    (out / "_stats.json").unlink()  # as if killed during the commit
    ours = [out / f"shard-000000.tar.tmp-{fp}-0123456789ab", out / "_parts" / f"x.json.tmp-{fp}-0123456789ab"]
    theirs = [out / "_parts" / "x.json.tmp-feedfacefeedface-0123456789ab",  # another job's tag
              out / "shard-000001.tar.tmp-0123456789ab",                    # untagged
              out / "nested" / f"shard-000000.tar.tmp-{fp}-0123456789ab"]   # below the output's own folders
    for p in ours + theirs:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
    stats = preprocess([str(corpus)], str(out), progress=False)
    assert stats["written"] == 8
    assert [p.exists() for p in ours] == [False, False]
    assert [p.exists() for p in theirs] == [True, True, True]


def test_the_holder_renews_its_lease_and_notices_when_its_lock_was_replaced(tmp_path):
    store = OutputStore(str(tmp_path / "o"))
    lock = acquire(store, "f", lease_seconds=0.6)  # renewed every 0.1 s
    try:
        first = lock.record["renewed"]
        _wait_for(lambda: json.loads(store.read_bytes(lock.name))["renewed"] > first, "a renewal", timeout=60)
        # a store without exclusive create let another job write over it: the holder stops.
        # (Written until noticed: a renewal that read the record just before may write over it.)
        def replace():
            if not lock._lost:
                store.write_json(lock.name, {**lock.record, "owner": "someone-else"})
            return lock._lost

        _wait_for(replace, "the holder to notice", timeout=60)
        with pytest.raises(OutputBusy, match="replaced this job's lock"):
            lock.ensure_held()
    finally:
        lock.release()
    assert json.loads(store.read_bytes(lock.name))["owner"] == "someone-else"  # not written over again


def test_a_holder_on_this_host_is_alive_exactly_while_its_process_runs():
    child = subprocess.Popen(["sleep", "600"])
    try:
        record = {"host": socket.gethostname(), "pid": child.pid, "pid_started": process_start(child.pid)}
        assert holder_state(record) == "alive"
        assert holder_state({**record, "pid_started": "1"}) == "dead"  # its pid, reused by another process
        assert holder_state({**record, "released": True}) == "released"
        child.kill()
        _wait_for(lambda: holder_state(record) == "dead", "the kill")  # killed, not yet reaped: a zombie
    finally:
        child.kill()
        child.wait()
    assert holder_state(record) == "dead"
