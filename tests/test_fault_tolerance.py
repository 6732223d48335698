"""Fault tolerance end to end: real Ray Train + DeepSpeed runs are killed (a worker process, a
node, the driver, the driver in the middle of a save) and must finish with every sample of
every epoch trained on exactly once (checked through the audit) and, in deterministic mode,
with the last step's loss of the uninterrupted run.

64 samples in 8 shards, 2 workers x 8 per step: 4 steps per epoch, 2 epochs, a checkpoint
every 2 steps. MMTRAIN_FAULT_PAUSE holds the first attempt at a chosen point so the kill
lands where it is meant to (see mmtrain/fault_injection.py).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import psutil
import pytest

from conftest import ROOT
from mmtrain.audit import check, manifest_ids, read_audit
from mmtrain.checkpoint import CheckpointStore, staging_dir
from mmtrain.metrics import read_metric_lines
from paused_run import start_paused
from pipelines.corpus import make_corpus
from pipelines.preprocess import preprocess

STEPS = 8  # 2 epochs x 4 steps


@pytest.fixture(scope="module")
def data(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ftdata")
    make_corpus(str(root / "raw"), 64, 8, seed=7)
    preprocess([str(root / "raw")], str(root / "clean"), progress=False)
    config = root / "log_every_step.json"
    config.write_text(json.dumps({"train": {"log_every": 1}}))
    return {"clean": root / "clean", "config": config, "ids": manifest_ids([str(root / "clean")])}


def command(data, run, *extra, workers=2):
    return [sys.executable, str(ROOT / "ray_job.py"), "train", "--data", str(data["clean"]), "--run-dir", str(run),
            "--config", str(data["config"]), "--epochs", "2", "--batch-size", "8", "--checkpoint-every", "2",
            "--workers", str(workers), "--audit-samples", *map(str, extra)]


def replace_arg(cmd, flag, new_flag, value):
    i = cmd.index(flag)
    return [*cmd[:i], new_flag, str(value), *cmd[i + 2:]]


def run_to_end(cmd, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r.stdout + r.stderr


def kill_driver(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def last_loss(run):
    lines = read_metric_lines(str(run))
    assert lines[-1]["step"] == STEPS
    return lines[-1]["loss"]


def assert_exactly_once(run, data, attempts):
    report = check(str(run), data["ids"])
    assert report["attempts"] == attempts, report
    assert sorted(report["epochs"]) == [0, 1], report
    for epoch in report["epochs"].values():
        assert epoch["samples"] == 64 and epoch["served_twice"] == 0 and epoch["never_served"] == 0, report
    return report


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted deterministic run every interrupted one is compared with."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(command(data, run, "--deterministic"))
    assert_exactly_once(run, data, attempts=1)
    # checkpoints at 2, 4, 6, 8; keep_checkpoints (3) keeps the last three, all complete
    store = CheckpointStore(str(run / "train"))
    kept = store.list()
    assert [os.path.basename(c) for c in kept] == [f"checkpoint_{s:09d}" for s in (4, 6, 8)]
    assert all(store.problem(c) is None for c in kept)
    return {"run": run, "loss": last_loss(run)}


def resumed_at(run):
    """The first step the second attempt ran."""
    return min(r["step"] for r in read_audit(str(run)) if r["attempt"] == 1)


def assert_same_loss(run, reference):
    loss = last_loss(run)
    assert abs(loss - reference["loss"]) <= 1e-3 * abs(reference["loss"]), (loss, reference["loss"])


def test_the_audit_command_proves_exactly_once_and_catches_a_repeat(data, reference, tmp_path):
    cmd = [sys.executable, str(ROOT / "ray_job.py"), "audit", "--run-dir", str(reference["run"]),
           "--data", str(data["clean"])]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "epoch 1: 64 samples, 0 served twice, 0 never served" in r.stdout, r.stdout
    # a copy of the run whose audit shows one sample trained on twice in epoch 0, in the same attempt
    run = tmp_path / "run"
    shutil.copytree(reference["run"] / "audit", run / "audit")
    path = sorted((run / "audit").glob("*.jsonl"))[0]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[-1]["ids"].append(rows[0]["ids"][0])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([*cmd[:4], str(run), *cmd[5:]], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "1 served twice" in r.stdout and "exactly once: NO" in r.stdout, r.stdout


def test_a_killed_worker_process_is_replaced_and_the_run_finishes(data, reference, tmp_path):
    import ray
    from ray.util.state import list_actors

    run = tmp_path / "run"
    proc = start_paused(command(data, run, "--deterministic"), run, "step@3:120")
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert len(workers) == 2 and ray.is_initialized()
    os.kill(workers[0]["pid"], signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, open(f"{run}.log").read()[-4000:]
    assert_exactly_once(run, data, attempts=2)
    assert resumed_at(run) == 3  # the replacement workers went on from checkpoint 2
    assert_same_loss(run, reference)


def test_the_driver_killed_in_a_save_then_the_same_command_resumes_from_the_previous_checkpoint(
        data, reference, tmp_path):
    run = tmp_path / "run"
    cmd = command(data, run, "--deterministic")
    kill_driver(start_paused(cmd, run, "save@4:120"))  # the whole train command, mid-save
    store = CheckpointStore(str(run / "train"))
    assert not any(c.endswith("_000000004") and store.problem(c) is None for c in store.list())
    out = run_to_end(cmd)
    assert "resuming from" in out and "checkpoint_000000002" in out
    assert_exactly_once(run, data, attempts=2)
    assert resumed_at(run) == 3
    assert_same_loss(run, reference)
    # the killed save's staging files were cleared by the next save of the same rank
    assert not any(os.path.exists(staging_dir(str(run), r)) for r in range(2))


def test_a_checkpoint_resumes_on_fewer_then_more_workers_and_a_damaged_one_is_skipped(data, tmp_path):
    run = tmp_path / "run"
    run_to_end(replace_arg(command(data, run, workers=2), "--epochs", "--max-steps", 3))
    # 2 -> 1 worker: checkpoint 3 (2 ranks' ZeRO partitions) resumes on 1; it saves 4 and 6
    out = run_to_end(replace_arg(command(data, run, workers=1), "--epochs", "--max-steps", 6))
    assert "written by 2 workers, now 1: elastic resume" in out
    assert "(universal, new worker count)" in out  # DeepSpeed's universal copy was made and loaded
    # damage checkpoint 6 as a half-copied or lost file would: the next run says so and goes
    # on from 4 instead (also 1 -> 2 workers), still serving every sample of each epoch once
    optim = next((run / "train" / "checkpoint_000000006" / "ds").glob("*optim_states.pt"))
    with open(optim, "r+b") as f:
        f.truncate(100)
    out = run_to_end(command(data, run, workers=2))
    assert "checkpoint_000000006 is incomplete" in out and "falling back" in out
    assert "resuming from" in out and "checkpoint_000000004" in out
    assert "written by 1 workers, now 2: elastic resume" in out and "(universal, new worker count)" in out
    # the damaged checkpoint's folder was emptied, not removed: Ray Train still listed it and
    # deleted it itself when three newer ones were kept (a missing folder would fail the run);
    # the new save of step 6 took another name
    assert not (run / "train" / "checkpoint_000000006").exists()
    assert "checkpoint_000000006_r1" in out
    report = check(str(run), data["ids"])
    assert report["attempts"] == 3 and report["exactly_once"] and sorted(report["epochs"]) == [0, 1], report
    assert all(e["samples"] == 64 for e in report["epochs"].values()), report
    assert report["superseded_rows"] > 0  # steps 5-6 of the second attempt were trained again


# --- a node of a multi-node cluster goes away ------------------------------------------

@pytest.fixture()
def three_node_cluster():
    folder = tempfile.mkdtemp(prefix="rft-", dir="/tmp")
    r = subprocess.run([sys.executable, "-m", "clusters.local", "start", "--workers", "2", "--cpus-per-node", "2",
                        "--head-cpus", "0", "--object-store-mb", "256", "--temp-dir", folder, "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    yield json.loads(r.stdout)
    subprocess.run([sys.executable, "-m", "clusters.local", "stop", "--temp-dir", folder, "--clean"],
                   capture_output=True, cwd=ROOT, timeout=120)


def node_of(pid, state):
    """The name of the cluster node whose process tree holds `pid`."""
    nodes = {n["pid"]: n["name"] for n in state["nodes"]}
    try:
        parents = psutil.Process(pid).parents()
    except psutil.NoSuchProcess:
        return None
    return next((nodes[p.pid] for p in parents if p.pid in nodes), None)


def test_a_lost_node_is_replaced_and_the_run_finishes(data, tmp_path, three_node_cluster):
    state = three_node_cluster
    run = tmp_path / "run"
    config = tmp_path / "half_cpu.json"
    # half a CPU per training worker: the surviving node (2 CPUs) holds both workers and the data tasks
    config.write_text(json.dumps({"train": {"log_every": 1}, "scale": {"cpus_per_worker": 0.5}}))
    cmd = command({**data, "config": config}, run)
    submit = [sys.executable, str(ROOT / "ray_job.py"), "submit", "--address", state["dashboard_url"], "--wait",
              "--env", "MMTRAIN_FAULT_PAUSE=step@3:120", "--", *cmd[2:]]
    proc = start_paused(submit, run, "step@3:120")  # the job gets the hold through --env
    # the training workers are the cluster's processes titled ray::RayTrainWorker
    workers = [p.pid for p in psutil.process_iter(["cmdline"])
               if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and node_of(p.pid, state)]
    assert len(workers) == 2, workers
    victim = node_of(workers[0], state)
    assert victim != "head"
    os.killpg(next(n["pid"] for n in state["nodes"] if n["name"] == victim), signal.SIGKILL)
    assert proc.wait(timeout=900) == 0, open(f"{run}.log").read()[-4000:]
    report = check(str(run), data["ids"])
    assert report["attempts"] == 2 and report["exactly_once"] and sorted(report["epochs"]) == [0, 1], report
    assert resumed_at(run) == 3  # from checkpoint 2, on the node that was left
