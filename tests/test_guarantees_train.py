"""Training's written guarantees (README, "Fault tolerance"), each tried where it can break, in as
few real runs (Ray Train + DeepSpeed ZeRO-2, 2 CPU workers, the tiny model) as possible:

- a corpus that divides evenly over nothing: 37 samples in shards of 2, 4, 6 and 25, 2 workers,
  batches of 8. With --deterministic each rank reads whole shards, so one rank runs out long
  before the other (the lockstep steps it on empty batches) and last batches are partial (padded).
  `python ray_job.py audit` must still find every sample of each epoch trained on once;
- the `train` command killed while Ray Train uploads a checkpoint to object storage (moto behind
  tests/faulty_s3.py, which lets two files of checkpoint 4 through and holds the rest: the kill
  lands mid-upload whatever the timing), then the same command: it resumes from checkpoint 2, the
  audit shows exactly-once, and every logged step (log_every 1: the killed attempt's and the
  resumed one's) equals the uninterrupted run's;
- the negative control: another seed differs from the uninterrupted run at some logged step, so
  the step-by-step comparison can fail.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT
from faulty_s3 import faulty_s3  # noqa: F401  (the fixture)
from mmtrain.audit import read_audit
from mmtrain.checkpoint import CheckpointStore
from mmtrain.metrics import read_metric_lines
from pipelines.corpus import make_corpus
from pipelines.preprocess import preprocess

SHARD_SIZES = (2, 4, 6, 25)
SAMPLES = sum(SHARD_SIZES)  # 37
SEED = 1  # its shard order gives one rank 16 rows over the two epochs, the other 58
# what a logged step says about the model and the data: equal at every step of a deterministic resume.
# Not "epoch": it is rank 0's newest epoch so far, which a resumed rank 0 that has run out of rows
# does not know (the uninterrupted run's rank 0 saw epoch 1 rows before the checkpoint)
COMPARED = ("loss", "loss_image_text", "loss_image_audio", "loss_text_audio", "loss_caption", "grad_norm",
            "samples", "lr")


@pytest.fixture(scope="module")
def data(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    os.makedirs(root / "raw")
    for i, n in enumerate(SHARD_SIZES):
        make_corpus(str(root / f"part{i}"), n, 1, seed=20 + i)
        shutil.copy(root / f"part{i}" / "shard-000000.tar", root / "raw" / f"shard-{i:06d}.tar")
    stats = preprocess([str(root / "raw")], str(root / "clean"), progress=False)
    assert stats["written"] == SAMPLES
    config = root / "log_every_step.json"
    config.write_text(json.dumps({"train": {"log_every": 1}}))
    return {"clean": root / "clean", "config": config}


def command(data, run, *extra, seed=SEED, length=("--epochs", 2)):
    return [sys.executable, str(ROOT / "ray_job.py"), "train", "--data", str(data["clean"]), "--run-dir", str(run),
            "--config", str(data["config"]), *map(str, length), "--batch-size", "8", "--checkpoint-every", "2",
            "--workers", "2", "--seed", str(seed), "--deterministic", "--audit-samples", *map(str, extra)]


def run_to_end(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r.stdout + r.stderr


def audit_cli(run, data):
    return subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "audit", "--run-dir", str(run), "--data",
                           str(data["clean"])], capture_output=True, text=True, cwd=ROOT, timeout=300)


def logged_steps(run) -> list[dict]:
    """Every line of RUN/metrics.jsonl, in order (a resumed run logs its replayed steps again)."""
    return read_metric_lines(str(run))


def differences(run_rows: list[dict], reference_rows: list[dict]) -> list[str]:
    """Where logged steps differ from the reference's step of the same number (relative 1e-5:
    a deterministic resume matches to the printed digits)."""
    ref = {r["step"]: r for r in reference_rows}
    out = []
    for row in run_rows:
        for key in COMPARED:
            a, b = row[key], ref[row["step"]][key]
            if (a is None) != (b is None) or a is not None and abs(a - b) > 1e-5 * max(abs(b), 1e-8):
                out.append(f"step {row['step']} {key}: {a} != {b}")
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run, and what it proves about the uneven corpus."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(command(data, run))
    r = audit_cli(run, data)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    for epoch in (0, 1):
        assert f"epoch {epoch}: {SAMPLES} samples, 0 served twice, 0 never served" in r.stdout, r.stdout
    assert "exactly once: yes" in r.stdout
    rows = read_audit(str(run))
    steps = max(r["step"] for r in rows)
    ranks_at = {s: {r["rank"] for r in rows if r["step"] == s} for s in range(1, steps + 1)}
    # the corpus really is uneven: a rank that ran out stepped on empty batches (no audit row) while
    # the other still trained, and partial batches were padded to 8
    assert any(ranks == {1} for ranks in ranks_at.values()) and all(ranks_at.values()), ranks_at
    assert any(0 < len(r["ids"]) < 8 for r in rows)
    metrics = logged_steps(run)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    # every line has the efficiency metrics (their parts: tests/test_efficiency.py), steps on empty
    # batches included; a CPU has no peak of its own (mfu) and no GPU memory
    assert all(m["tflops_per_s"] > 0 and m["mfu"] is None and m["gpu_mem_allocated_gb"] is None
               and m["gpu_mem_reserved_gb"] is None for m in metrics), metrics
    assert steps >= 6  # room for checkpoints 2 and 4 before the end
    return {"run": run, "metrics": metrics, "steps": steps}


def training_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a["pid"] for a in actors]


def test_a_train_killed_while_a_checkpoint_uploads_resumes_from_the_previous_one_step_for_step(
        data, reference, s3_bucket, faulty_s3, tmp_path):
    bucket, direct = s3_bucket  # direct: s3fs on the moto server itself, not through the proxy
    run = tmp_path / "run"
    storage = f"s3://{bucket}/run"
    cmd = command(data, run, "--checkpoint-storage", storage, "--storage-options",
                  json.dumps(faulty_s3.storage_options))
    # checkpoint 4's upload: two files pass, then every write into it hangs until the test says
    faulty_s3.hold_writes(f"{bucket}/run/train/checkpoint_000000004/*", after=2)
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        if not faulty_s3.held.wait(timeout=600):
            pytest.fail("checkpoint 4 was never uploaded: " + open(tmp_path / "killed.log").read()[-3000:])
        workers = training_worker_pids()
        ckpt4 = f"{storage}/train/checkpoint_000000004"
        direct.invalidate_cache()
        uploaded = direct.find(ckpt4.removeprefix("s3://"))
        assert len(uploaded) == 2, uploaded  # the kill lands mid-upload
        os.killpg(proc.pid, signal.SIGKILL)  # the whole train command, as kill -9 or a closed laptop would
        proc.wait(timeout=60)
        # Ray ends the dead driver's workers; until they are gone their uploads stay held
        deadline = time.time() + 120
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers):
            assert time.time() < deadline, f"the killed run's workers {workers} are still alive"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        faulty_s3.heal()
    assert CheckpointStore.containing(ckpt4, faulty_s3.storage_options).problem(ckpt4) is not None

    out = run_to_end(cmd)
    assert "checkpoint_000000004 is incomplete" in out and "falling back" in out, out[-3000:]
    assert "resuming from" in out and "checkpoint_000000002" in out, out[-3000:]
    r = audit_cli(run, data)
    assert r.returncode == 0 and "exactly once: yes" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "from 2 attempt(s)" in r.stdout
    assert min(row["step"] for row in read_audit(str(run)) if row["attempt"] == 1) == 3

    metrics = logged_steps(run)
    # the killed attempt logged steps 1-4, the resumed one 3 to the end: every one is compared
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, *range(3, reference["steps"] + 1)]
    assert differences(metrics, reference["metrics"]) == []


def test_another_seed_differs_at_some_logged_step(data, reference, tmp_path):
    run = tmp_path / "run"
    # with a configured peak a CPU run has an mfu too (metrics.jsonl rounds both to 6 decimals)
    run_to_end(command(data, run, "--set", "train.peak_tflops=0.5", seed=SEED + 1, length=("--max-steps", 2)))
    metrics = logged_steps(run)
    assert [m["step"] for m in metrics] == [1, 2]
    efficiency = [(m["tflops_per_s"], m["mfu"]) for m in metrics]
    assert all(tflops > 0 and abs(mfu - tflops / 0.5) < 1e-5 for tflops, mfu in efficiency), efficiency
    assert differences(metrics, reference["metrics"])


# the speed switches against the default: rounding differs (compiled kernels, float32 sums in another
# order), and a few optimizer steps carry it along
SWITCHES_TOLERANCE = 1e-4


def test_the_speed_switches_train_like_the_default(data, reference, tmp_path):
    """--compile, activation checkpointing, the local contrastive loss and math attention together,
    on this corpus's empty lockstep batches and padded last batches: every logged step as the
    default run's (tests/test_speed_switches.py checks each switch alone)."""
    run = tmp_path / "run"
    run_to_end(command(data, run, "--compile", "--activation-checkpointing", "--contrastive-loss", "local",
                       "--attention", "math"))
    config = json.load(open(run / "run_config.json"))
    assert (config["model"]["gradient_checkpointing"], config["model"]["contrastive_loss"],
            config["model"]["attention"], config["train"]["compile"]) == (True, "local", "math", True)
    metrics = logged_steps(run)
    assert [m["step"] for m in metrics] == [m["step"] for m in reference["metrics"]]
    worst = max(abs(m[k] - r[k]) / max(abs(r[k]), 1e-8)
                for m, r in zip(metrics, reference["metrics"]) for k in COMPARED)
    print(f"speed switches: largest relative difference from the default run {worst:.2e}")
    assert worst <= SWITCHES_TOLERANCE
