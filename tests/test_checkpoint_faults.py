"""Checkpoints are never destroyed by doubt: faults injected on a real S3 server (moto on
loopback, behind tests/faulty_s3.py's proxy, or objects doctored directly).

- a store error (403, 503 after retries) on train_state.json or done/rank_N of the newest
  complete checkpoint fails the resume in one line and leaves every object as it was;
- a file replaced by one of the same size passes the size check on the listing but not its
  sha256 where a rank loads it, and the run falls back to the previous checkpoint;
- keys that escape the checkpoint folder are refused before anything is copied;
- with no complete checkpoint nothing is emptied.
Function-level first, then one real `train` through the CLI on moto.
"""
import json
import os
import random
import subprocess
import sys

import boto3
import numpy as np
import pytest
import s3fs
import torch

from conftest import ROOT
from faulty_s3 import FaultyS3Proxy, _object_of
from mmtrain.checkpoint import (ABANDONED, CheckpointStore, CheckpointUnreadable, UnsafeKey, fetch, record_of,
                                restore_dir)
from mmtrain.export import CheckpointDamaged, load_checkpoint
from mmtrain.seeding import rng_state, set_rng_state

DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
               b"<Message>Access Denied</Message><RequestId>faulty</RequestId></Error>")


class TargetedFaults(FaultyS3Proxy):
    """The proxy, answering every GET/HEAD of the objects whose key ends with a suffix in
    `deny` with 403 AccessDenied, and every GET of those in `throttle` with 503 SlowDown."""

    def __init__(self, upstream):
        super().__init__(upstream)
        self.deny, self.throttle = set(), set()
        proxy, base = self, self._server.RequestHandlerClass

        class Handler(base):
            def _forward(self):
                obj = _object_of("GET", self.path) if self.command in ("GET", "HEAD") else None
                if obj and any(obj.endswith(s) for s in proxy.deny):
                    self._request_body()
                    proxy.counts["denied"] += 1
                    return self._reply(403, [("Content-Type", "application/xml")], DENIED_BODY)
                return super()._forward()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server.RequestHandlerClass = Handler

    def decide(self, method, path):
        obj = _object_of(method, path)
        if obj and any(obj.endswith(s) for s in self.throttle):
            self.counts["slowdown"] += 1
            return "slowdown"
        return None


@pytest.fixture()
def proxy(s3_server):
    p = TargetedFaults(s3_server["endpoint"]).start()
    base = s3_server["storage_options"]
    # few retries, so that a 503 "after retries" comes in seconds
    p.storage_options = {**base, "client_kwargs": {**base["client_kwargs"], "endpoint_url": p.endpoint},
                         "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 2}}}
    yield p
    p.stop()


def put_checkpoint(fs, root, tmp_path, step):
    """A 2-rank checkpoint in the layout staged_checkpoint writes, records with hashes
    (contents are stand-ins, not pickles: nothing here may unpickle them)."""
    local = tmp_path / f"checkpoint_{step:09d}"
    for rank in range(2):
        part = {f"ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": bytes([rank + step]) * 500,
                f"position/rank_{rank:05d}.json": b"{}", f"rng/rank_{rank:05d}.json": b"{}"}
        if rank == 0:
            part.update({"train_state.json": json.dumps({"step": step, "world_size": 2, "zero_stage": 2}).encode(),
                         "ds/mp_rank_00_model_states.pt": bytes([step]) * 300, "run_config.json": b"{}"})
        for name, data in part.items():
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(data)
        (local / "done").mkdir(exist_ok=True)
        (local / "done" / f"rank_{rank:05d}").write_text(json.dumps(record_of(str(local), sorted(part))))
    fs.put(str(local), root.removeprefix("s3://") + "/", recursive=True)
    return f"{root}/checkpoint_{step:09d}"


def snapshot(fs, bucket):
    fs.invalidate_cache()
    return {k: (v["size"], v.get("ETag")) for k, v in fs.find(bucket, detail=True).items()}


@pytest.mark.parametrize("fault", ["deny", "throttle"])
@pytest.mark.parametrize("target", ["train_state.json", "done/rank_00001"])
def test_a_store_error_on_the_newest_checkpoint_fails_the_resume_and_deletes_nothing(
        s3_bucket, proxy, tmp_path, fault, target, monkeypatch):
    bucket, fs = s3_bucket
    root = f"s3://{bucket}/run/train"
    for step in (2, 4, 6):
        put_checkpoint(fs, root, tmp_path, step)
    before = snapshot(fs, bucket)
    getattr(proxy, fault).add(f"checkpoint_000000006/{target}")
    # s3fs's own attempts (5, a class setting, on top of botocore's) only add waits to a store
    # that stays throttled: one s3fs attempt, botocore's 2 behind it, still ends "after retries"
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    store = CheckpointStore(root, proxy.storage_options)
    said = []
    for resume in (lambda: store.select(f"{root}/checkpoint_000000006", said.append),
                   lambda: store.latest_complete(said.append)):
        with pytest.raises(CheckpointUnreadable) as e:
            resume()
        message = str(e.value)
        assert message.startswith(f"cannot read {root}/checkpoint_000000006/{target} (") and "\n" not in message
        assert "nothing was deleted" in message
    assert said == []  # not reported as incomplete, not fallen back from
    assert proxy.counts["denied" if fault == "deny" else "slowdown"] > 0
    assert snapshot(fs, bucket) == before
    # the same store answering again: the newest is complete and nothing was lost on the way
    getattr(proxy, fault).clear()
    assert store.select(f"{root}/checkpoint_000000006") == f"{root}/checkpoint_000000006"


def test_a_same_size_replacement_fails_its_hash_where_it_is_loaded_and_falls_back(s3_bucket, s3_server, tmp_path):
    bucket, fs = s3_bucket
    opts = s3_server["storage_options"]
    root = f"s3://{bucket}/run/train"
    store = CheckpointStore(root, opts)
    two, four = (put_checkpoint(fs, root, tmp_path, s) for s in (2, 4))
    victim = f"{bucket}/run/train/checkpoint_000000004/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    fs.pipe_file(victim, b"x" * 500)  # the size it was written with, other bytes
    assert store.problem(four) is None  # the listing cannot tell
    assert fetch(store, four, 0) is None  # rank 0 does not load rank 1's partition
    why = fetch(store, four, 1)
    assert why == "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt does not match the sha256 it was written with"
    assert not os.path.exists(restore_dir(four, 1))  # the copy that failed is not kept
    said = []
    assert store.latest_complete(said.append, before=four) == two
    assert all(fetch(store, two, r) is None for r in (0, 1))
    # export and evaluate check what they unpickle too: the stand-in bytes are never loaded
    fs.pipe_file(f"{bucket}/run/train/checkpoint_000000002/ds/mp_rank_00_model_states.pt", b"y" * 300)
    with pytest.raises(CheckpointDamaged, match="checkpoint_000000002 is incomplete .*mp_rank_00_model_states.pt "
                                                "does not match the sha256"):
        load_checkpoint(store, two)


def test_a_file_planted_beside_the_recorded_ones_is_not_loaded(s3_bucket, s3_server, tmp_path):
    bucket, fs = s3_bucket
    opts = s3_server["storage_options"]
    four = put_checkpoint(fs, f"s3://{bucket}/run/train", tmp_path, 4)
    store = CheckpointStore.containing(four, opts)
    # DeepSpeed finds model files by pattern: an extra one would be unpickled
    fs.pipe_file(f"{bucket}/run/train/checkpoint_000000004/ds/mp_rank_01_model_states.pt", b"evil")
    assert store.problem(four) is None
    assert fetch(store, four, 0) == \
        "ds/mp_rank_01_model_states.pt is not in any done record (not written by this run's save)"


@pytest.mark.parametrize("key", ["ds/../../../../escaped", "ds/..\\..\\escaped", "ds//escaped"])
def test_keys_that_escape_the_checkpoint_folder_are_refused(s3_bucket, s3_server, tmp_path, key):
    bucket, fs = s3_bucket
    opts = s3_server["storage_options"]
    four = put_checkpoint(fs, f"s3://{bucket}/run/train", tmp_path, 4)
    # boto3, not s3fs: the key must reach the store exactly as written
    boto3.client("s3", endpoint_url=s3_server["endpoint"], aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").put_object(Bucket=bucket, Key=f"run/train/checkpoint_000000004/{key}",
                                                     Body=b"x")
    assert any(k.endswith("escaped") for k in snapshot(fs, bucket))
    store = CheckpointStore.containing(four, opts)
    with pytest.raises(UnsafeKey, match="refusing .*escaped.*: it has") as e:
        store.problem(four)
    assert "\n" not in str(e.value)
    with pytest.raises(UnsafeKey):
        fetch(store, four, 0)
    local = restore_dir(four, 0)
    assert not os.path.exists(os.path.normpath(os.path.join(local, key))) and not os.path.exists(local)


def test_a_record_naming_a_path_outside_the_folder_is_refused(s3_bucket, s3_server, tmp_path):
    bucket, fs = s3_bucket
    opts = s3_server["storage_options"]
    four = put_checkpoint(fs, f"s3://{bucket}/run/train", tmp_path, 4)
    fs.pipe_file(f"{bucket}/run/train/checkpoint_000000004/done/rank_00001",
                 json.dumps({"format": 2, "files": {"../../outside": {"size": 1, "sha256": "0" * 64}}}).encode())
    with pytest.raises(UnsafeKey, match="/../../outside': it has a '..'"):
        CheckpointStore.containing(four, opts).problem(four)


def test_with_no_complete_checkpoint_nothing_is_emptied(s3_bucket, s3_server, tmp_path):
    bucket, fs = s3_bucket
    opts = s3_server["storage_options"]
    root = f"s3://{bucket}/run/train"
    for step in (2, 4):
        put_checkpoint(fs, root, tmp_path, step)
        fs.rm(f"{bucket}/run/train/checkpoint_{step:09d}/done/rank_00001")  # neither finished
    before = snapshot(fs, bucket)
    said, store = [], CheckpointStore(root, opts)
    chosen = store.select(f"{root}/checkpoint_000000004", said.append)
    assert chosen is None and len(said) == 2 and all("did not finish its part" in s for s in said)
    store.discard_newer(None, said.append)  # what the loop does when nothing is chosen
    assert snapshot(fs, bucket) == before and len(said) == 2
    assert not any(k.endswith(ABANDONED) for k in before)
    assert len(store.list()) == 2


def test_size_only_records_of_older_checkpoints_still_load(s3_bucket, s3_server, tmp_path):
    bucket, fs = s3_bucket
    opts = s3_server["storage_options"]
    four = put_checkpoint(fs, f"s3://{bucket}/run/train", tmp_path, 4)
    for rank in range(2):
        done = f"{bucket}/run/train/checkpoint_000000004/done/rank_{rank:05d}"
        record = json.loads(fs.cat(done))
        fs.pipe_file(done, json.dumps({n: v["size"] for n, v in record["files"].items()}).encode())
    store = CheckpointStore.containing(four, opts)
    assert store.problem(four) is None and fetch(store, four, 1) is None
    fs.pipe_file(f"{bucket}/run/train/checkpoint_000000004/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", b"o" * 9)
    assert "has 9 bytes, 500 were written" in store.problem(four)


def test_rng_states_round_trip_through_json():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def train(data, run, storage, opts, steps):
    cmd = [sys.executable, str(ROOT / "ray_job.py"), "train", "--data", str(data), "--run-dir", str(run),
           "--checkpoint-storage", storage, "--storage-options", json.dumps(opts), "--workers", "1",
           "--batch-size", "8", "--checkpoint-every", "1", "--max-steps", str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    return r.returncode, r.stdout + r.stderr, r.stderr


def test_train_on_s3_stops_on_a_store_error_and_falls_back_past_a_replaced_file(
        small_data, s3_bucket, proxy, tmp_path):
    bucket, fs = s3_bucket
    opts, run, root = proxy.storage_options, tmp_path / "run", f"s3://{bucket}/run/train"
    code, out, _ = train(small_data, run, f"s3://{bucket}/run", opts, 2)
    assert code == 0, out[-4000:]
    before = snapshot(fs, bucket)

    # 403 on the newest checkpoint's train_state.json: one line, exit 2, every object as it was
    proxy.deny.add("checkpoint_000000002/train_state.json")
    code, out, err = train(small_data, run, f"s3://{bucket}/run", opts, 3)
    assert code == 2 and err.count("\n") == 1, out[-4000:]
    assert err.startswith(f"error: cannot read {root}/checkpoint_000000002/train_state.json (PermissionError")
    assert snapshot(fs, bucket) == before
    proxy.deny.clear()

    # the same bytes count, others in them: rank 0's hash check falls back to checkpoint 1
    model = f"{bucket}/run/train/checkpoint_000000002/ds/mp_rank_00_model_states.pt"
    data = bytearray(fs.cat(model))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(model, bytes(data))
    code, out, _ = train(small_data, run, f"s3://{bucket}/run", opts, 3)
    assert code == 0, out[-4000:]
    assert ("checkpoint checkpoint_000000002 is incomplete (rank 0: ds/mp_rank_00_model_states.pt does not match "
            "the sha256 it was written with)") in out
    assert f"rank 0: resuming from {root}/checkpoint_000000001" in out
    # the replaced checkpoint is abandoned (emptied to its marker), its step saved again under a new
    # name; Ray Train's keep-3 rotation dropped checkpoint 1 once 2_r1 and 3 were registered
    assert fs.ls(f"{bucket}/run/train/checkpoint_000000002") == [f"{bucket}/run/train/checkpoint_000000002/{ABANDONED}"]
    names = [os.path.basename(c) for c in CheckpointStore(root, opts).list()]
    assert names == ["checkpoint_000000002_r1", "checkpoint_000000003"]
