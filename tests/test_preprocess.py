"""The preprocessing job end to end, on real tars, a real Ray cluster and a real S3 server."""
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

import other_tools
from conftest import ROOT
from pipelines import reasons
from pipelines.corpus import make_corpus
from pipelines.preprocess import OutputConflict, preprocess
from pipelines.shard_tasks import MAX_SHARDS_PER_TASK, batch_size
from pipelines.config import DataConfig, ImageConfig, TextConfig


def files_of(folder):
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = p
    return out


def comparable(path):
    """File content, minus timings (the only thing allowed to differ between runs)."""
    if path.endswith(".json"):
        d = json.load(open(path))
        for k in ("seconds", "worker_seconds", "stage_cpu_s"):
            d.pop(k, None)
        return d
    return open(path, "rb").read()


@pytest.fixture(scope="session")
def defect_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("defects")
    info = make_corpus(str(out), 48, 3, seed=1, defects=True)
    return out, info


@pytest.fixture(scope="session")
def defect_output(defect_corpus, ray_cluster, tmp_path_factory):
    corpus, info = defect_corpus
    out = tmp_path_factory.mktemp("defects_out") / "clean"
    stats = preprocess([str(corpus)], str(out), progress=False)
    return out, stats


def test_every_planted_defect_is_quarantined_with_its_reason(defect_corpus, defect_output):
    _, info = defect_corpus
    out, stats = defect_output
    q = pq.read_table(out / "_quarantine.parquet").to_pylist()
    got = {(r["key"], r["reason"], r["kind"]) for r in q}
    for d in info["defects"]:
        assert (d["key"], d["reason"], d["kind"]) in got, d
    assert len(q) == len(info["defects"])  # and nothing else was rejected
    assert all(r["source"] and r["detail"] for r in q)


def test_good_samples_all_come_out_once(defect_corpus, defect_output):
    corpus, info = defect_corpus
    out, stats = defect_output
    manifest = pq.read_table(out / "_manifest.parquet").to_pylist()
    assert len(manifest) == info["good_total"] == stats["written"]
    ids = [(r["source"], r["key"]) for r in manifest]
    assert len(set(ids)) == len(ids)
    truncated = {r["key"] for r in manifest if r["source"].endswith("shard-trunc.tar")}
    assert truncated == set(info["good_keys_in_truncated_shard"])
    # accounting: every record read is written or quarantined, never lost
    q_rows = pq.read_table(out / "_quarantine.parquet").num_rows
    assert stats["read"] == stats["written"] + q_rows
    assert sum(stats["quarantined"].values()) + sum(stats["filtered"].values()) + stats["duplicates"] == q_rows
    # valid variants travel through: members in folders, gzip members, missing modalities
    keys = {r["key"] for r in manifest}
    assert any("/" in k for k in keys)
    assert {r["modalities"] for r in manifest} >= {"image,text,audio"}
    assert any(len(r["modalities"].split(",")) < 3 for r in manifest)


def test_output_is_read_by_tarfile_and_webdataset(defect_output):
    import webdataset as wds

    out, stats = defect_output
    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    names = []
    for s in shards:
        with tarfile.open(s) as t:
            for m in t.getmembers():
                assert m.isreg() and not m.name.startswith(("/", "..")) and ".." not in m.name.split("/")
                names.append(m.name)
    assert len(names) == len(set(names))
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("rgb8"))
    assert len(samples) == stats["written"]
    for s in samples:
        meta = s["json"]
        if "jpg" in s:
            assert s["jpg"].shape == (224, 224, 3)
        if "mel.npy" in s:
            assert s["mel.npy"].shape == (80, 1001) and s["mel.npy"].dtype == np.float16
            assert 0 < meta["mel_frames"] <= 1001
        if "txt" in s:
            assert 3 <= len(s["txt"]) <= 1000 and s["txt"] == " ".join(s["txt"].split())
        assert meta["key"] == s["__key__"]


def test_stats_file(defect_output):
    out, stats = defect_output
    on_disk = json.load(open(out / "_stats.json"))
    assert on_disk["written"] == stats["written"] and on_disk["read"] == stats["read"]
    assert on_disk["quarantined"][reasons.UNSAFE_MEMBER_NAME] == 3
    assert on_disk["filtered"][reasons.IMAGE_TOO_SMALL] == 1
    assert on_disk["bytes_in"] > on_disk["bytes_out"] > 0
    assert on_disk["data"]["image"]["size"] == 224


def test_rerun_does_nothing_and_changes_nothing(defect_corpus, defect_output):
    corpus, _ = defect_corpus
    out, _ = defect_output
    before = {n: (os.stat(p).st_mtime_ns, os.path.getsize(p)) for n, p in files_of(out).items()}
    stats = preprocess([str(corpus)], str(out), progress=False)
    assert stats["this_run"]["processed_shards"] == 0
    after = {n: (os.stat(p).st_mtime_ns, os.path.getsize(p)) for n, p in files_of(out).items()}
    assert after == before


def test_other_settings_into_same_output_are_refused(defect_corpus, defect_output):
    corpus, _ = defect_corpus
    out, _ = defect_output
    with pytest.raises(OutputConflict, match="another preprocess job"):
        preprocess([str(corpus)], str(out), cfg=DataConfig(image=ImageConfig(size=128)), progress=False)


def test_duplicates_across_shards_keep_the_first(ray_cluster, tmp_path):
    corpus = tmp_path / "c"
    make_corpus(str(corpus), 20, 2, seed=3)
    # a second copy of shard 0 under a later name: all of its samples are exact duplicates
    (corpus / "shard-000009.tar").write_bytes((corpus / "shard-000000.tar").read_bytes())
    stats = preprocess([str(corpus)], str(tmp_path / "o"), progress=False)
    assert stats["written"] == 20 and stats["duplicates"] == 10
    q = pq.read_table(tmp_path / "o" / "_quarantine.parquet").to_pylist()
    assert {r["source"].rsplit("/", 1)[-1] for r in q} == {"shard-000009.tar"}
    assert all(r["reason"] == reasons.DUPLICATE_CONTENT and "shard-000000.tar" in r["detail"] for r in q)
    with tarfile.open(tmp_path / "o" / "shard-000002.tar") as t:
        assert t.getmembers() == []  # the copy's output shard was rewritten without them


def test_several_shards_per_task_write_the_same_output(ray_cluster, tmp_path):
    """Shards run several to a Ray task (tiny shards) give the bytes of one shard per task."""
    make_corpus(str(tmp_path / "raw"), 30, 7, seed=5, defects=True)  # 7 shards + a truncated one
    one = preprocess([str(tmp_path / "raw")], str(tmp_path / "one"), shards_per_task=1, progress=False)
    four = preprocess([str(tmp_path / "raw")], str(tmp_path / "four"), shards_per_task=4, progress=False)
    a, b = files_of(tmp_path / "one"), files_of(tmp_path / "four")
    assert sorted(a) == sorted(b) and one["shards"] == 8 and one["written"] == four["written"] > 0
    for name in a:
        if not name.startswith("_lock"):
            assert comparable(a[name]) == comparable(b[name]), name
    # the default: one shard per task for a few shards, up to MAX_SHARDS_PER_TASK for many,
    # and single shards again for the last ones of a job
    assert [batch_size(n, 4) for n in (1, 7, 31, 32, 64, 10_000)] == [1, 1, 1, 1, 2, MAX_SHARDS_PER_TASK]
    assert batch_size(2, 4, fixed=4) == 2 and batch_size(9, 4, fixed=4) == 4


def test_other_tools_shards_preprocess(ray_cluster, tmp_path):
    """Shards GNU tar and gzip wrote (tests/other_tools.py), with the shapes of webdataset's own
    test shards: 28x28 PNG digits, gzip members with long web texts, members in a folder."""
    testgz, distinct = other_tools.gz_members_tar(tmp_path / "made")
    inputs = [str(other_tools.png_cls_tgz(tmp_path / "made")), str(other_tools.folder_members_tar(tmp_path / "made")),
              str(testgz)]
    # these shards hold 28x28 digits and long web texts: loosen the default filters for them
    cfg = DataConfig(image=ImageConfig(min_size=8), text=TextConfig(max_chars=100_000))
    stats = preprocess(inputs, str(tmp_path / "o"), cfg=cfg, progress=False)
    manifest = pq.read_table(tmp_path / "o" / "_manifest.parquet").to_pylist()
    by_source = {}
    for r in manifest:
        by_source.setdefault(r["source"].rsplit("/", 1)[-1], []).append(r)
    assert len(by_source["sample.tgz"]) == 90
    assert all(r["modalities"] == "image" for r in by_source["sample.tgz"])
    assert [r["key"] for r in by_source["compressed.tar"]] == ["compressed/0001", "compressed/0002",
                                                              "compressed/0003"]
    assert len(by_source["testgz.tar"]) == distinct and stats["duplicates"] == 120 - distinct
    assert stats["quarantined"] == {} and stats["filtered"] == {}
    with tarfile.open(tmp_path / "o" / by_source["sample.tgz"][0]["output_shard"]) as t:
        names = t.getnames()
    assert "10.cls" in names  # the user's other members travel along


def test_s3_input_and_output(ray_cluster, s3_bucket, s3_server, tmp_path):
    bucket, fs = s3_bucket
    corpus = tmp_path / "c"
    make_corpus(str(corpus), 16, 2, seed=5)
    for p in sorted(corpus.glob("*.tar")):
        fs.put_file(str(p), f"{bucket}/raw/{p.name}")
    opts = s3_server["storage_options"]
    stats = preprocess([f"s3://{bucket}/raw/shard-{{000000..000001}}.tar"], f"s3://{bucket}/clean",
                       storage_options=opts, progress=False)
    assert stats["written"] == 16
    fs.invalidate_cache()
    listing = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/clean"))
    assert {"_manifest.parquet", "_quarantine.parquet", "_stats.json", "shard-000000.tar",
            "shard-000001.tar"} <= set(listing)
    assert not [n for n in listing if ".tmp-" in n]
    with fs.open(f"{bucket}/clean/_manifest.parquet", "rb") as f:
        manifest = pq.read_table(f).to_pylist()
    assert {r["source"] for r in manifest} == {f"s3://{bucket}/raw/shard-00000{i}.tar" for i in range(2)}
    local = tmp_path / "down.tar"
    fs.get_file(f"{bucket}/clean/shard-000001.tar", str(local))
    with tarfile.open(local) as t:
        assert len([n for n in t.getnames() if n.endswith(".json")]) == 8
    again = preprocess([f"s3://{bucket}/raw"], f"s3://{bucket}/clean", storage_options=opts, progress=False)
    assert again["this_run"]["processed_shards"] == 0


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "ray_job.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, **kw)


def test_kill9_then_rerun_gives_the_uninterrupted_output(ray_cluster, tmp_path):
    corpus = tmp_path / "c"
    make_corpus(str(corpus), 120, 8, seed=7)
    reference = tmp_path / "ref"
    preprocess([str(corpus)], str(reference), progress=False)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "ray_job.py"), "preprocess", str(corpus), "--output",
                             str(out), "--quiet", "--workers", "2"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        parts = os.listdir(out / "_parts") if (out / "_parts").exists() else []
        if any(p.endswith(".done.json") for p in parts):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "_stats.json").exists()
    time.sleep(3)  # Ray reaps the dead driver's workers; none may write after the re-run starts

    result = run_cli("preprocess", str(corpus), "--output", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "already done" in result.stdout
    # the killed driver's lock is taken over, and the run says so in one line
    took = [line for line in result.stderr.splitlines() if line.startswith("taking over")]
    assert len(took) == 1 and f"(pid {proc.pid} on {socket.gethostname()}, started" in took[0], result.stderr
    locks = sorted(n for n in files_of(out) if n.startswith("_lock/"))
    # the lock the killed driver held stays (superseded); the re-run's says it ended
    first, last = (json.load(open(out / n)) for n in locks)
    assert first["pid"] == proc.pid and not first["released"]
    assert last["pid"] != proc.pid and last["released"]
    # the lock records pids and times, nothing else may differ
    ref_files = {n: p for n, p in files_of(reference).items() if not n.startswith("_lock/")}
    got_files = {n: p for n, p in files_of(out).items() if not n.startswith("_lock/")}
    assert sorted(got_files) == sorted(ref_files)  # no temporaries left, nothing missing
    for name in ref_files:
        assert comparable(got_files[name]) == comparable(ref_files[name]), name


@pytest.mark.parametrize("args, words", [
    (["preprocess", "/nonexistent/x.tar", "--output", "/tmp/never"], "no such shard"),
    (["preprocess", "/nonexistent/sample.tgz", "--output", "/tmp/never", "--workers", "0"], "--workers"),
    (["make-corpus", "/tmp/never", "--samples", "0"], "at least 1"),
    (["preprocess", "/nonexistent/sample.tgz", "--output", "/tmp/never", "--storage-options", "{x"],
     "not valid JSON"),
])
def test_cli_errors_are_one_line(args, words):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("error: ")
