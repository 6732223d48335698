"""Fault tolerance end to end: real Ray Train + DeepSpeed runs are killed (a node, the driver,
the driver in the middle of a save) and must finish with every sample of every epoch trained
on exactly once (checked through the audit) and, in deterministic mode, with the last step's
loss of the uninterrupted run. A killed worker process is tried by tests/test_secrets.py, on
the same corpus and against the same reference (tests/fault_runs.py), in the run that also
carries credentials.

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

import psutil
import pytest

from conftest import ROOT
from fault_runs import STEPS, assert_exactly_once, assert_same_loss, command, resumed_at, run_to_end
from mmtrain.audit import check
from mmtrain.checkpoint import CheckpointStore, staging_dir
from mmtrain.run_lock import LOCK_NAME
from paused_run import start_paused


@pytest.fixture(scope="session")  # session: the lost-node test runs last (see conftest)
def data(fault_data):
    return fault_data


@pytest.fixture(scope="session")
def reference(fault_reference):
    return fault_reference


def replace_arg(cmd, flag, new_flag, value):
    i = cmd.index(flag)
    return [*cmd[:i], new_flag, str(value), *cmd[i + 2:]]


def kill_driver(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


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


def test_the_driver_killed_in_a_save_then_the_same_command_resumes_from_the_previous_checkpoint(
        data, reference, tmp_path):
    """Also the run lock through the CLI: refused while the driver lives, taken over once it is killed."""
    run = tmp_path / "run"
    cmd = command(data, run, "--deterministic")
    first = start_paused(cmd, run, "save@4:120")
    try:
        # one train per run directory (mmtrain/run_lock.py): a second one is refused in one line
        # while the first lives
        second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.startswith(f"error: another train is running on {run} (pid {first.pid} on ")
        assert second.stderr.count("\n") == 1, second.stderr
    finally:
        kill_driver(first)  # the whole train command, mid-save
    store = CheckpointStore(str(run / "train"))
    assert not any(c.endswith("_000000004") and store.problem(c) is None for c in store.list())
    out = run_to_end(cmd)
    # the killed driver's lock is taken over, and the run says so
    assert f"taking over the lock on {run}: the train that held it (pid {first.pid} on " in out
    assert "is gone (its process no longer exists)" in out and f"trained {STEPS} steps" in out
    assert not (run / LOCK_NAME).exists()
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

def node_of(pid, state):
    """The name of the cluster node whose process tree holds `pid`."""
    nodes = {n["pid"]: n["name"] for n in state["nodes"]}
    try:
        parents = psutil.Process(pid).parents()
    except psutil.NoSuchProcess:
        return None
    return next((nodes[p.pid] for p in parents if p.pid in nodes), None)


@pytest.mark.loses_a_node
def test_a_lost_node_is_replaced_and_the_run_finishes(data, tmp_path, multi_node_cluster):
    state = multi_node_cluster
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
