"""An elastic run (`train --workers 1-2`) on a local 3-node cluster that loses a node and gets one
back, with no person in between: tests/test_elastic.py checks it, benchmarks/resume.py times it.

The cluster: a head of 1 CPU (the job's driver and the data tasks) and two worker nodes of 2
CPUs, each holding one training worker whole (scale.cpus_per_worker 2), so Ray Train's elastic
policy counts exactly one worker per worker node. The run (64 samples, 2 epochs, global batch
16, a checkpoint every 2 steps, audited) is held twice with MMTRAIN_FAULT_PAUSE:
  1. after step 3 on 2 workers: a worker node is SIGKILLed; Ray Train restarts the group on the
     1 worker that fits (gradient accumulation 2), from checkpoint 2;
  2. after step 5 on that 1 worker (attempt 1): a new worker node joins; Ray Train's resize check
     restarts the group on 2 workers, from checkpoint 4, and the run ends there.
The holds only make the moments sure (without the second, 1 worker could end the run before the
new node is seen); nothing restarts the run by hand.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CPUS_PER_NODE = 2   # one training worker per worker node
HEAD_CPUS = 1       # the data tasks': the training workers hold the worker nodes whole
RESIZE_CHECK_S = 5  # scale.resize_check_s: Ray Train's look for room to grow into
HOLD_S = 600        # longer than any restart: the holds end when Ray Train stops the group
PAUSE = f"step@3:{HOLD_S},step@5:{HOLD_S}/1"


def start_cluster(folder: str) -> dict:
    from clusters.local_nodes import free_port

    r = subprocess.run([sys.executable, "-m", "clusters.local", "start", "--workers", "2",
                        "--cpus-per-node", str(CPUS_PER_NODE), "--head-cpus", str(HEAD_CPUS), "--object-store-mb",
                        "256", "--dashboard-port", str(free_port()), "--temp-dir", folder, "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=240)
    if r.returncode != 0:
        raise RuntimeError(f"the local cluster did not start: {r.stderr[-3000:]}")
    return json.loads(r.stdout)


def stop_cluster(folder: str) -> None:
    subprocess.run([sys.executable, "-m", "clusters.local", "stop", "--temp-dir", folder, "--clean"],
                   capture_output=True, text=True, cwd=ROOT, timeout=120)


def add_node(state: dict, name: str) -> None:
    """A new worker node joins the cluster, as a replaced spot node does; recorded in the
    cluster's state so that `clusters.local stop` stops it too."""
    from clusters.local import _write_state
    from clusters.local_nodes import node_env, start_worker, wait_ready

    env = node_env(state["gcs_address"], state.get("token_file"))
    node = start_worker(state["temp_dir"], name, env, gcs_address=state["gcs_address"], cpus=CPUS_PER_NODE,
                        object_store_bytes=256 * 1024 * 1024)
    state["nodes"].append(node)
    _write_state(state)
    wait_ready([node], time.time() + 120)


def kill_node(state: dict, name: str) -> None:
    os.killpg(next(n["pid"] for n in state["nodes"] if n["name"] == name), signal.SIGKILL)


def write_config(path: str) -> str:
    with open(path, "w") as f:
        json.dump({"train": {"log_every": 1}, "scale": {"cpus_per_worker": CPUS_PER_NODE,
                                                         "resize_check_s": RESIZE_CHECK_S}}, f)
    return path


def wait_for(log_path: str, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while text not in open(log_path, errors="replace").read():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before {text!r}:\n{open(log_path).read()[-4000:]}")
        if time.time() > deadline:
            raise RuntimeError(f"no {text!r} in {timeout:g} s:\n{open(log_path).read()[-4000:]}")
        time.sleep(0.2)


def run_through_loss_and_rejoin(state: dict, data: str, run: str, config: str) -> dict:
    """The run, its node loss and its new node; returns when the job has ended: the times (s)
    from the loss to the first step on 1 worker and from the join to the first step on 2, the
    job's return code and its output."""
    from mmtrain.metrics import read_metric_lines
    from paused_run import start_paused

    submit = [sys.executable, os.path.join(ROOT, "ray_job.py"), "submit", "--address", state["dashboard_url"],
              "--wait", "--env", f"MMTRAIN_FAULT_PAUSE={PAUSE}", "--", "train", "--data", data, "--run-dir", run,
              "--config", config, "--epochs", "2", "--batch-size", "8", "--checkpoint-every", "2",
              "--workers", "1-2", "--audit-samples"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = start_paused(submit, run, PAUSE, env=env, timeout=900)  # the job gets the holds through --env
    try:
        kill_node(state, "worker-1")
        lost = time.time()
        wait_for(f"{run}.log", "pausing after step 5 (attempt 1", proc, timeout=900)
        add_node(state, "worker-3")
        joined = time.time()
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = read_metric_lines(run)
    smaller = next(m for m in lines if m["time"] > lost and m["world_size"] == 1)
    larger = next(m for m in lines if m["time"] > joined and m["world_size"] == 2)
    return {"returncode": rc, "output": open(f"{run}.log", errors="replace").read(), "lines": lines,
            "loss_to_first_smaller_step_s": smaller["time"] - lost, "first_smaller_step": smaller["step"],
            "join_to_first_larger_step_s": larger["time"] - joined, "first_larger_step": larger["step"]}
