"""The preprocessing job's written guarantees (README, "Output" and "Fault tolerance"), each tried
where it can break:

- `kill -9` at several precise moments (before any shard is finished; before the commit;
  half-way through the cross-shard dedup rewrite of an output shard; half-way through writing
  `_manifest.parquet`, `_quarantine.parquet`, `_stats.json`), then the same command again: the
  output is byte-identical to an uninterrupted run's, with no temporary file left;
- a store that stays down, through the CLI: one line on stderr, exit 2, nothing quarantined
  and nothing marked done, and the same command processes everything once the store is back;
- an object-store upload that fails or is killed mid-way leaves nothing under its final name.

The kills come from tests/kill_at.py, which runs the CLI with a library function of the driver
wrapped to SIGKILL its own process at the chosen moment (test code; the product has no hook).
Real Ray (the session cluster), real tars, a real S3 server behind tests/faulty_s3.py.
"""
import fnmatch
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import boto3
import psutil
import pytest

from conftest import ROOT
from faulty_s3 import faulty_s3  # noqa: F401  (the fixture)
from pipelines.corpus import make_corpus
from pipelines.preprocess import preprocess
from pipelines.source import base_plus_ext
from pipelines.storage import TMP_MARK, OutputStore
from tarutil import write_tar

KILL_AT = ROOT / "tests" / "kill_at.py"
TIMINGS = ("seconds", "worker_seconds", "stage_cpu_s")  # the only content allowed to differ between two runs


def samples_of(tar_path) -> list[list[tuple[str, bytes]]]:
    """The members of a tar, grouped by sample key, in order."""
    samples, keys = [], []
    with tarfile.open(tar_path) as t:
        for m in t.getmembers():
            key, _ = base_plus_ext(m.name)
            if not keys or keys[-1] != key:
                keys.append(key)
                samples.append([])
            samples[-1].append((m.name, t.extractfile(m).read()))
    return samples


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 samples in 4 shards, and 2 more shards that each hold copies of 2 samples of an earlier
    shard (under other keys) beside 2 new ones: the commit rewrites both without the copies."""
    root = tmp_path_factory.mktemp("guarantees")
    make_corpus(str(root / "raw"), 24, 4, seed=7)
    make_corpus(str(root / "extra"), 4, 2, seed=8)
    for i in (0, 1):
        copies = [(f"dup-{name}", data) for sample in samples_of(root / "raw" / f"shard-00000{i}.tar")[:2]
                  for name, data in sample]
        new = [m for sample in samples_of(root / "extra" / f"shard-00000{i}.tar") for m in sample]
        write_tar(root / "raw" / f"shard-00000{4 + i}.tar", copies + new)
    return root / "raw"


def snapshot(folder) -> dict:
    """Every file under `folder` by relative path: its bytes, or for JSON its content minus timings.
    The lock records (`_lock/`: pids and times of the runs) are left out."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(dirpath, n)
            if os.path.relpath(path, folder).startswith("_lock/"):
                continue
            data = open(path, "rb").read()
            if n.endswith(".json"):
                data = {k: v for k, v in json.loads(data).items() if k not in TIMINGS}
            out[os.path.relpath(path, folder)] = data
    return out


@pytest.fixture(scope="module")
def reference(corpus, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "clean"
    stats = preprocess([str(corpus)], str(out), progress=False)
    # the dedup rewrite really runs: 2 copies dropped from each of the last two shards
    assert stats["written"] == 28 and stats["duplicates"] == 4
    assert [len(samples_of(out / f"shard-00000{i}.tar")) for i in (4, 5)] == [2, 2]
    return snapshot(out)


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "ray_job.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def killed_at(point: str, corpus, out):
    """`preprocess corpus --output out` through kill_at.py; asserts it died where aimed."""
    r = subprocess.run([sys.executable, str(KILL_AT), point, str(out), "--", "preprocess", str(corpus), "--output",
                        str(out), "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == -9 and "kill_at: killed" in r.stderr, (r.returncode, r.stderr[-3000:])
    return r.stderr


def temporaries(folder) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if TMP_MARK in n]


def wait_until_the_dead_drivers_tasks_are_gone(stderr: str) -> None:
    """A killed driver's shard tasks run on until Ray reaps them (its job is over); one still
    writing while the re-run starts would race with it. Waits for Ray to have killed them: no
    worker process of this cluster still runs a task of that job."""
    import ray
    from ray.util.state import list_tasks

    job = next(line.split()[-1] for line in stderr.splitlines() if line.startswith("kill_at: ray job"))
    assert ray.is_initialized()
    deadline = time.time() + 120
    while time.time() < deadline:
        tasks = list_tasks(filters=[("job_id", "=", job)], detail=True, raise_on_missing_output=False)
        pids = {t.worker_pid for t in tasks if t.worker_pid}
        if pids and not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                            for p in pids):
            return
        time.sleep(0.5)
    raise AssertionError(f"the killed driver's tasks still run after 2 minutes: {sorted(pids)}")


def assert_rerun_gives_the_reference(corpus, out, reference):
    r = run_cli("preprocess", corpus, "--output", out, "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert temporaries(out) == []
    got = snapshot(out)
    assert sorted(got) == sorted(reference)  # nothing missing, nothing extra
    for name in reference:
        assert got[name] == reference[name], name


def test_killed_before_any_shard_is_finished(corpus, reference, tmp_path):
    out = tmp_path / "clean"
    stderr = killed_at("shard-started", corpus, out)
    # kill_at saw a shard's temporary and no finished shard at the moment it killed the driver.
    # The temporary itself may be gone by now: the dead driver's shard tasks run on until Ray
    # reaps them, and one may finish its shard in between.
    assert re.search(r"with [1-9]\d* shard\(s\) started and none finished", stderr), stderr[-2000:]
    wait_until_the_dead_drivers_tasks_are_gone(stderr)
    assert_rerun_gives_the_reference(corpus, out, reference)


@pytest.fixture(scope="module")
def shards_done(corpus, ray_cluster, tmp_path_factory):
    """An output whose every shard is done and whose commit has not begun (a kill landed there)."""
    out = tmp_path_factory.mktemp("shards_done") / "clean"
    killed_at("commit", corpus, out)
    assert len(fnmatch.filter(os.listdir(out / "_parts"), "*.done.json")) == 6
    assert not (out / "_manifest.parquet").exists()
    return out


@pytest.mark.parametrize("point", [
    None,                         # killed just before the commit (shards_done itself)
    "write:shard-*.tar#2",        # in the dedup rewrite of the 2nd shard, the 1st already rewritten
    "write:_manifest.parquet",
    "write:_quarantine.parquet",  # _manifest.parquet already written
    "write:_stats.json",          # both parquet files written; _stats.json marks the output complete
])
def test_killed_in_the_commit(corpus, reference, shards_done, tmp_path, point):
    out = tmp_path / "clean"
    shutil.copytree(shards_done, out)
    before = {n: (out / n).read_bytes() for n in ("shard-000004.tar", "shard-000005.tar")}
    if point is not None:
        killed_at(point, corpus, out)
        half_written = temporaries(out)
        target = point[len("write:"):].split("#")[0]
        assert len(half_written) == 1 and fnmatch.fnmatch(os.path.basename(half_written[0]).split(TMP_MARK)[0],
                                                          target), half_written
        assert not (out / "_stats.json").exists()
        if target == "shard-*.tar":
            # the shard being rewritten is untouched, the one before it already rewritten
            assert (out / "shard-000005.tar").read_bytes() == before["shard-000005.tar"]
            assert (out / "shard-000004.tar").read_bytes() != before["shard-000004.tar"]
        else:
            assert not (out / target).exists()
    assert_rerun_gives_the_reference(corpus, out, reference)


# --- object storage -------------------------------------------------------------------------

@pytest.mark.parametrize("outage", ["reads", "everything"])
def test_a_store_that_stays_down_fails_the_job_in_one_line_and_marks_nothing_done(
        ray_cluster, s3_bucket, faulty_s3, tmp_path, outage):
    bucket, fs = s3_bucket
    make_corpus(str(tmp_path / "raw"), 8, 2, seed=5)
    for p in sorted((tmp_path / "raw").glob("*.tar")):
        fs.put_file(str(p), f"{bucket}/raw/{p.name}")
    if outage == "reads":  # listings pass, every read of an object answers 503: the shard tasks meet it
        faulty_s3.slowdown_every, faulty_s3.cut_every, faulty_s3.burst = 1, 0, 10**9
    else:  # every request answers 503: the driver meets it listing the input
        faulty_s3.down = True
    # botocore's own attempts down to 1 and s3fs's default 5: the outage is declared in seconds
    opts = {**faulty_s3.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}}}
    out = f"s3://{bucket}/clean"
    r = run_cli("preprocess", f"s3://{bucket}/raw", "--output", out, "--storage-options", json.dumps(opts),
                "--quiet")
    assert r.returncode == 2, r.stderr[-3000:]
    # retry warnings come first (the shard tasks', forwarded by Ray as "(run_one pid=...) ...", and the
    # driver's own, e.g. renewing the output's lock); then the one error line, no traceback
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", r.stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, r.stderr[-3000:]
    assert "unreachable" in errors[0], errors[0]
    if outage == "reads":
        assert f"s3://{bucket}/raw/shard-00000" in errors[0], errors[0]  # the shard whose reads failed
    assert faulty_s3.counts["slowdown" if outage == "reads" else "down"] > 0
    fs.invalidate_cache()
    written = [p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/clean")]
    assert not [n for n in written if "quarantine" in n or n.endswith(".done.json") or n.startswith("_manifest")]

    faulty_s3.heal()  # the store is back: the same command processes every shard
    r = run_cli("preprocess", f"s3://{bucket}/raw", "--output", out, "--storage-options", json.dumps(opts),
                "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processed now, 0 already done" in r.stdout and "written 8" in r.stdout, r.stdout


# an abandoned upload's file object must not try to finish the upload when it is collected
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_an_upload_that_fails_midway_leaves_nothing_under_its_name(s3_bucket, faulty_s3):
    bucket, fs = s3_bucket
    part = 5 * 1024 * 1024  # S3's smallest multipart part
    opts = {**faulty_s3.storage_options, "default_block_size": part,
            "config_kwargs": {"retries": {"max_attempts": 1}}}
    store = OutputStore(f"s3://{bucket}/out", opts)
    store.fs.retries = 2  # s3fs's own attempts (5 by default, with waits): the test takes seconds
    faulty_s3.fail_writes(f"{bucket}/out/big.tar", after=2)  # the upload's start and first part pass
    with pytest.raises(OSError):
        with store.open_atomic("big.tar") as f:
            for _ in range(3):
                f.write(os.urandom(part))
    # the last part (sent when the file is closed) fails
    faulty_s3.fail_writes(f"{bucket}/out/last.tar", after=2)
    with pytest.raises(OSError):
        with store.open_atomic("last.tar") as f:
            f.write(os.urandom(part + 1000))
    # a one-shot upload (smaller than a part) that fails, and one whose writer raises half-way
    faulty_s3.fail_writes(f"{bucket}/out/small.json")
    with pytest.raises(OSError):
        store.write_bytes("small.json", b"{}")
    faulty_s3.heal()
    with pytest.raises(ZeroDivisionError):
        with store.open_atomic("cut.tar") as f:
            f.write(b"x" * 1000)
            1 / 0
    gc.collect()
    assert faulty_s3.counts["write_slowdown"] >= 3
    fs.invalidate_cache()
    assert fs.find(f"{bucket}/out") == []
    uploads = boto3.client("s3", endpoint_url=faulty_s3.storage_options["client_kwargs"]["endpoint_url"],
                           aws_access_key_id="testing", aws_secret_access_key="testing",
                           region_name="us-east-1").list_multipart_uploads(Bucket=bucket)
    assert uploads.get("Uploads", []) == []  # the cut multipart upload was aborted, not left behind


UPLOADER = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from pipelines.storage import OutputStore
store = OutputStore(sys.argv[2], json.loads(sys.argv[3]))
with store.open_atomic("big.tar") as f:
    for _ in range(3):
        f.write(os.urandom(5 * 1024 * 1024))
"""


def test_a_process_killed_mid_upload_leaves_nothing_under_the_name(s3_bucket, faulty_s3):
    bucket, fs = s3_bucket
    opts = {**faulty_s3.storage_options, "default_block_size": 5 * 1024 * 1024}
    faulty_s3.hold_writes(f"{bucket}/out/big.tar", after=2)  # start and part 1 pass, part 2 hangs
    proc = subprocess.Popen([sys.executable, "-c", UPLOADER, str(ROOT), f"s3://{bucket}/out", json.dumps(opts)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if not faulty_s3.held.wait(timeout=120):
        proc.kill()
        pytest.fail(f"the upload never reached its second part: {proc.communicate()[1][-2000:]}")
    proc.kill()
    proc.wait()
    faulty_s3.release()
    fs.invalidate_cache()
    assert fs.find(f"{bucket}/out") == []
    client = boto3.client("s3", endpoint_url=faulty_s3.storage_options["client_kwargs"]["endpoint_url"],
                          aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    # the kill landed mid-upload: an unfinished multipart upload of the name, invisible as an object
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == ["out/big.tar"]
    with pytest.raises(client.exceptions.ClientError):
        client.head_object(Bucket=bucket, Key="out/big.tar")
