"""Checkpoints in object storage: real Ray Train + DeepSpeed runs on 2 CPU workers keep their
checkpoints in a real S3 server (moto, on loopback) given as --checkpoint-storage, resume from
them (at another worker count too) and export from them; damaged checkpoint objects are
detected; bad storage is a one-line error before Ray starts."""
import json
import os
from pathlib import Path

import ray_job
from conftest import cli
from mmtrain.audit import read_audit
from mmtrain.checkpoint import ABANDONED, CheckpointStore, checkpoint_name, read_by, restore_dir, step_of


def names(checkpoints):
    return [os.path.basename(c) for c in checkpoints]


def test_a_run_checkpoints_to_s3_resumes_from_it_on_other_worker_counts_and_exports(
        small_data, s3_server, s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    opts = s3_server["storage_options"]
    run, root = tmp_path / "run", f"s3://{bucket}/run/train"
    store = CheckpointStore(root, opts)
    train = ["train", "--data", small_data, "--run-dir", run, "--batch-size", 8, "--checkpoint-every", 1,
             "--audit-samples", "--storage-options", json.dumps(opts)]

    cli(*train, "--checkpoint-storage", f"s3://{bucket}/run", "--workers", 1, "--max-steps", 2)
    assert names(store.list()) == ["checkpoint_000000001", "checkpoint_000000002"]
    assert all(store.problem(c) is None for c in store.list())
    assert CheckpointStore(str(run / "train")).list() == []  # nothing in the run directory

    # 1 -> 2 workers: rank 0 converts checkpoint 2 to DeepSpeed's universal format and uploads
    # it, rank 1 reads it from the bucket
    out = cli(*train, "--checkpoint-storage", f"s3://{bucket}/run", "--workers", 2, "--max-steps", 3)
    text = out.stdout + out.stderr
    assert f"resuming from {root}/checkpoint_000000002 (written by 1 workers, now 2: elastic resume)" in text
    assert "(universal, new worker count)" in text
    universal = f"{bucket}/run/train/checkpoint_000000002"
    assert fs.exists(f"{universal}/done/ds_universal") and fs.find(f"{universal}/ds_universal")

    # the same worker count, storage found from the run directory: each rank reads its own partition
    out = cli(*train, "--workers", 2, "--max-steps", 4)
    assert f"resuming from {root}/checkpoint_000000003" in out.stdout + out.stderr
    kept = store.list()
    assert names(kept) == [f"checkpoint_{s:09d}" for s in (2, 3, 4)]  # keep_checkpoints 3
    assert all(store.problem(c) is None for c in kept)
    assert len(fs.glob(f"{bucket}/run/train/checkpoint_000000004/ds/*optim_states.pt")) == 2
    rows = read_audit(str(run))
    assert [min(r["step"] for r in rows if r["attempt"] == a) for a in range(3)] == [1, 3, 4]
    assert not any(os.path.exists(restore_dir(c, r)) for c in kept for r in range(2))  # local copies removed

    # credentials stay out of what is saved with the run, in the bucket too
    assert opts["secret"] not in (run / "run_config.json").read_text()
    assert opts["secret"] not in fs.cat(f"{bucket}/run/train/checkpoint_000000004/run_config.json").decode()

    out = cli("export", "--run-dir", run, "--output", tmp_path / "model.safetensors", "--storage-options",
              json.dumps(opts))
    assert f"from {root}/checkpoint_000000004" in out.stdout and "matches the training engine" in out.stdout


def put_checkpoint(fs, url, tmp_path, step):
    """A 2-rank ZeRO-2 checkpoint in the layout staged_checkpoint writes (contents are stand-ins)."""
    local = tmp_path / f"checkpoint_{step:09d}"
    for rank in range(2):
        part = {f"ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": b"o" * 500,
                f"position/rank_{rank:05d}.json": b"{}", f"rng/rank_{rank:05d}.pt": b"r" * 20}
        if rank == 0:
            part.update({"train_state.json": json.dumps({"step": step, "world_size": 2, "zero_stage": 2}).encode(),
                         "ds/mp_rank_00_model_states.pt": b"m" * 300})
        part[f"done/rank_{rank:05d}"] = json.dumps({n: len(d) for n, d in part.items()}).encode()
        for name, data in part.items():
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(data)
    fs.put(str(local), url.removeprefix("s3://") + "/", recursive=True)


def test_a_truncated_or_unfinished_checkpoint_in_s3_is_incomplete(s3_server, s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    opts = s3_server["storage_options"]
    root = f"s3://{bucket}/run/train"
    store = CheckpointStore(root, opts)
    for step in (2, 4, 6):
        put_checkpoint(fs, root, tmp_path, step)
    assert names(store.list()) == [f"checkpoint_{s:09d}" for s in (2, 4, 6)]
    assert all(store.problem(c) is None for c in store.list())

    # 6: rank 1's upload never finished; 4: an object cut short
    fs.rm(f"{bucket}/run/train/checkpoint_000000006/done/rank_00001")
    fs.pipe_file(f"{bucket}/run/train/checkpoint_000000004/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", b"o" * 10)
    assert store.problem(f"{root}/checkpoint_000000004") == \
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt (rank 1) has 10 bytes, 500 were written"
    said = []
    assert store.latest_complete(said.append) == f"{root}/checkpoint_000000002"
    assert "rank 1 of 2 did not finish its part" in said[0] and "checkpoint_000000004" in said[1]
    assert step_of(store.select(f"{root}/checkpoint_000000004", said.append)) == 2

    # resuming from 2 abandons 4 and 6: each is emptied down to its marker object (the prefix must
    # not vanish while Ray Train still lists it), and a new save of their steps takes a fresh name
    store.discard_newer(2, said.append)
    for step in (4, 6):
        assert fs.ls(f"{bucket}/run/train/checkpoint_{step:09d}") == [
            f"{bucket}/run/train/checkpoint_{step:09d}/{ABANDONED}"]
    assert names(store.list()) == ["checkpoint_000000002"]
    assert checkpoint_name(4, set(store.folders())) == "checkpoint_000000004_r1"

    # a rank restores from a local copy of the files it reads: not the other rank's partition or RNG
    with store.local_copy(f"{root}/checkpoint_000000002", read_by(1, universal=False)) as local:
        copied = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    assert copied == ["ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                      "position/rank_00000.json", "position/rank_00001.json", "rng/rank_00001.pt", "train_state.json"]
    assert not os.path.exists(local)


def test_bad_checkpoint_storage_is_one_line_before_ray_starts(s3_server, s3_bucket, tmp_path, capsys):
    bucket, _ = s3_bucket
    opts = json.dumps(s3_server["storage_options"])
    run = tmp_path / "run"
    base = ["train", "--data", str(tmp_path), "--run-dir", str(run), "--storage-options", opts]
    cases = [
        (["--checkpoint-storage", "nosuch://bucket/run"], "checkpoint storage nosuch://bucket/run: Protocol not known"),
        (["--checkpoint-storage", "s3://no-such-bucket/run"],
         "cannot write checkpoints to s3://no-such-bucket/run/train: FileNotFoundError"),
    ]
    for extra, message in cases:
        assert ray_job.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (run / "run_config.json").exists()  # refused before the run began

    # a run's checkpoint storage cannot change under it
    run.mkdir(exist_ok=True)
    (run / "run_config.json").write_text(json.dumps({"checkpoint_storage": f"s3://{bucket}/run"}))
    assert ray_job.main([*base, "--checkpoint-storage", f"s3://{bucket}/other"]) == 2
    err = capsys.readouterr().err
    assert f"keeps its checkpoints in s3://{bucket}/run/train; pass --checkpoint-storage s3://{bucket}/run" in err
    assert err.count("\n") == 1
