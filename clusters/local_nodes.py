"""The node processes of a local cluster (`clusters.local`): how each one starts, waiting until
it runs, and stopping exactly those of one cluster.

Why the worker nodes are not `ray start --address`: Ray 2.60 maps
`--node-ip-address=127.0.0.1` to the machine's network address and binds GCS, raylet and
agents on all interfaces, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its single-machine mode,
everything on 127.0.0.1), and in that mode `ray start --address=...` refuses to add a node. So
the head is `ray start --head --block` in single-machine mode, and every worker node is started
here the way `ray.cluster_utils.Cluster.add_node` (Ray's own multi-node-on-one-host tool) starts
one: `ray._private.node.Node(head=False)` with its own temp dir and ports, in a process that
blocks like `ray start --block`. Every port is picked free, so several clusters (and other Ray
instances) can share the machine. Each node runs in its own process group.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

from pipelines.errors import UserError
from pipelines.processes import process_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = "Ray runtime started."


class LocalClusterError(UserError):
    """Printed as one line, exit code 2."""


# Ports this process has handed out. A port bound and released is free again at once, so two
# calls can get the same one back from the kernel; Ray then refuses to start ("port ... is used
# by other components"). Remembering them makes every port of one cluster distinct.
_HANDED_OUT: set[int] = set()


def free_port(preferred: int | None = None) -> int:
    """A port free on 127.0.0.1 now and not handed out before by this process: `preferred`
    when it is, else one the kernel picks."""
    candidates = ([preferred] if preferred else []) + [0] * 64
    for port in candidates:
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            got = s.getsockname()[1]
        if got not in _HANDED_OUT:
            _HANDED_OUT.add(got)
            return got
    raise LocalClusterError("no free port on 127.0.0.1")


def plain_number(x: float) -> str:
    """2 for 2.0: how Ray's flags and our messages write a CPU count."""
    return str(int(x)) if float(x).is_integer() else str(x)


def node_env(gcs_address: str, token_file: str | None) -> dict:
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "token",
        # Ray's single-machine mode: every node binds 127.0.0.1 only
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # the cluster's own processes (job drivers, Ray Train's state queries) must find this
        # cluster, never guess among other Ray instances on the machine
        "RAY_ADDRESS": gcs_address,
        "RAY_USAGE_STATS_ENABLED": "0",
        # a stopped local node has nothing to drain: shut down at once
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # `python` in a job's entrypoint is the interpreter that runs this cluster
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    })
    # fixed-port metrics endpoints of the head's monitor and dashboard: free ones instead, so
    # this cluster and any other Ray on the machine do not fight over them
    env["AUTOSCALER_METRIC_PORT"] = str(free_port())
    env["DASHBOARD_METRIC_PORT"] = str(free_port())
    env.pop("RAY_API_SERVER_ADDRESS", None)
    if token_file:
        env.pop("RAY_AUTH_TOKEN", None)
        env["RAY_AUTH_TOKEN_PATH"] = token_file
    return env


# --- starting ---------------------------------------------------------------------------

def _record(temp_dir: str, name: str) -> dict:
    return {"name": name, "pid": 0, "temp_dir": os.path.join(temp_dir, name),
            "log": os.path.join(temp_dir, f"{name}.log")}


def _spawn(node: dict, cmd: list[str], env: dict) -> dict:
    os.makedirs(node["temp_dir"], exist_ok=True)
    with open(node["log"], "ab") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=node["temp_dir"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    node["pid"] = proc.pid
    return node


def start_head(temp_dir: str, env: dict, *, gcs_port: int, dashboard_port: int, cpus: float,
               object_store_bytes: int) -> dict:
    """Spawns the head (`ray start --head --block`, everything on 127.0.0.1); its node record."""
    node = _record(temp_dir, "head")
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--num-cpus={plain_number(cpus)}", "--num-gpus=0",
        f"--object-store-memory={object_store_bytes}", f"--temp-dir={node['temp_dir']}", "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
    ]
    return _spawn(node, cmd, env)


def start_worker(temp_dir: str, name: str, env: dict, *, gcs_address: str, cpus: float,
                 object_store_bytes: int) -> dict:
    """Spawns a worker node (`node_main` in its own process); its node record."""
    node = _record(temp_dir, name)
    ports = {"agent_http": free_port(), "agent_grpc": free_port(), "metrics": free_port(),
             "runtime_env": free_port()}
    cmd = [sys.executable, "-c",
           f"import sys; sys.path.insert(0, {ROOT!r}); import clusters.local_nodes as m; m.node_main(sys.argv[1:])",
           "--gcs", gcs_address, "--temp-dir", node["temp_dir"], "--num-cpus", plain_number(cpus),
           "--object-store-memory", str(object_store_bytes), "--ports", json.dumps(ports)]
    return _spawn(node, cmd, env)


def _last_error(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if any(w in line for w in ("Error", "ERROR", "error", "Exception", "abort")):
            return line[-300:]
    return lines[-1][-300:] if lines else "empty log"


def wait_ready(nodes: list[dict], deadline: float) -> None:
    """Until every node's log says it runs; one line naming the node that exited or is late."""
    pending = list(nodes)
    while pending:
        for node in list(pending):
            try:
                with open(node["log"], errors="replace") as f:
                    ready = READY in f.read()
            except OSError:
                ready = False
            if ready:
                pending.remove(node)
            elif not process_runs(node["pid"]):
                raise LocalClusterError(f"{node['name']} node exited while starting: {_last_error(node['log'])} "
                                        f"(log: {node['log']})")
        if pending and time.time() > deadline:
            raise LocalClusterError(f"{pending[0]['name']} node did not start in time (log: {pending[0]['log']})")
        time.sleep(0.2)


def node_main(argv: list[str]) -> None:
    """One worker node, blocking like `ray start --block` (run by `start_worker`, not by hand)."""
    p = argparse.ArgumentParser(prog="clusters.local node")
    p.add_argument("--gcs", required=True)
    p.add_argument("--temp-dir", required=True)
    p.add_argument("--num-cpus", type=int, required=True)
    p.add_argument("--object-store-memory", type=int, required=True)
    p.add_argument("--ports", type=json.loads, required=True)
    a = p.parse_args(argv)
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    params = RayParams(
        gcs_address=a.gcs, node_ip_address="127.0.0.1", num_cpus=a.num_cpus, num_gpus=0,
        object_store_memory=a.object_store_memory, temp_dir=a.temp_dir,
        min_worker_port=0, max_worker_port=0, node_manager_port=0,
        dashboard_agent_listen_port=a.ports["agent_http"], metrics_agent_port=a.ports["agent_grpc"],
        metrics_export_port=a.ports["metrics"], runtime_env_agent_port=a.ports["runtime_env"],
        # every node has its own temp dir, hence its own logs: each needs its log monitor to
        # stream its workers' output to the drivers
        include_log_monitor=True,
    )
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(READY, flush=True)
    expected = (0, signal.SIGTERM, -signal.SIGTERM, 128 + signal.SIGTERM)
    while True:
        time.sleep(1)
        dead = [(kind, proc) for kind, proc in node.dead_processes() if proc.returncode not in expected]
        if dead:
            print(f"Ray processes exited unexpectedly: {', '.join(kind for kind, _ in dead)}; stopping the node",
                  flush=True)
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            sys.exit(1)


# --- stopping ---------------------------------------------------------------------------

def cluster_processes(state: dict) -> list[int]:
    """Processes of this cluster: a command line or working directory inside one of its node
    dirs (Ray's processes, and job drivers/workers running in a job's working_dir), started
    after the cluster. Never this process or its ancestors."""
    import psutil

    roots = [n["temp_dir"] for n in state["nodes"]]
    me = psutil.Process()
    skip = {me.pid} | {p.pid for p in me.parents()}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "create_time", "uids"]):
        info = proc.info
        if info["pid"] in skip or (info["create_time"] or 0) < state["created"] - 2:
            continue
        if info["uids"] is not None and info["uids"].real != os.getuid():
            continue
        cmd = " ".join(info["cmdline"] or [])
        cwd = info["cwd"] or ""
        if any(r in cmd or cwd == r or cwd.startswith(r + os.sep) for r in roots):
            found.append(info["pid"])
    return found


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while True:
        left = [p for p in pids if process_runs(p)]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


def stop_nodes(state: dict) -> None:
    """Stops the cluster's nodes (workers first, then the head they report to), then whatever of
    the cluster is left (a job's driver)."""
    workers = [n["pid"] for n in state["nodes"] if n["name"] != "head" and n["pid"]]
    heads = [n["pid"] for n in state["nodes"] if n["name"] == "head" and n["pid"]]
    for group in (workers, heads):
        for pid in group:
            _signal(pid, signal.SIGTERM)
        for pid in _wait_gone(group, 20):
            _signal(pid, signal.SIGKILL, group=True)
    for pid in workers + heads:  # each node's process group
        _signal(pid, signal.SIGKILL, group=True)
    leftovers = cluster_processes(state)
    for pid in leftovers:
        _signal(pid, signal.SIGTERM)
    for pid in _wait_gone(leftovers, 5):
        _signal(pid, signal.SIGKILL)
    _wait_gone(leftovers, 5)
