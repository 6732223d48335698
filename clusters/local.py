"""A Ray cluster of several nodes on this machine: loopback only, token authentication on.

    python -m clusters.local start [--workers N] [--cpus-per-node C] [--head-cpus H] [--temp-dir D]
    python -m clusters.local status [--temp-dir D] [--json]
    python -m clusters.local env [--temp-dir D]          # `eval "$(...)"`: the job commands' settings
    python -m clusters.local stop [--temp-dir D] [--clean]

Each node runs in its own process group with its own Ray temp dir under D (default
/tmp/raymm-local-UID): D/head and D/worker-1..N. `D/cluster.json` records the node processes,
ports and where the token comes from (never the token). `stop` stops exactly those nodes (and
job drivers running inside them); other Ray instances on the machine are left alone.

How the nodes start, and why not `ray start --address` for the workers: Ray 2.60 maps
`--node-ip-address=127.0.0.1` to the machine's network address and binds GCS, raylet and
agents on all interfaces, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its single-machine mode,
everything on 127.0.0.1) — and in that mode `ray start --address=...` refuses to add a node. So
the head is `ray start --head --block` in single-machine mode, and every worker node is started
by this module the way `ray.cluster_utils.Cluster.add_node` (Ray's own multi-node-on-one-host
tool) starts one: `ray._private.node.Node(head=False)` with its own temp dir and ports, in a
process that blocks like `ray start --block`. Every port is picked free, so several clusters
(and other Ray instances) can share the machine.

Token: `--token-file F`, else RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token
(Ray's own order), else a new random token is written to D/auth_token (mode 0600). The nodes get
RAY_AUTH_MODE=token and the token (by file path where there is a file).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pipelines.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_NAME = "cluster.json"
READY = "Ray runtime started."
# a node's unix sockets live at NODE_DIR/session_<date>_<pid>/sockets/plasma_store: 62 characters
# past NODE_DIR, and a unix socket path has at most 107
SOCKET_SUFFIX = 62
SOCKET_MAX = 107


class LocalClusterError(UserError):
    """Printed as one line, exit code 2."""


def default_dir() -> str:
    return os.environ.get("RAYMM_LOCAL_CLUSTER_DIR") or f"/tmp/raymm-local-{os.getuid()}"


def free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise LocalClusterError("no free port on 127.0.0.1")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


# --- state ------------------------------------------------------------------------------

def state_path(temp_dir: str) -> str:
    return os.path.join(temp_dir, STATE_NAME)


def load_state(temp_dir: str | None = None) -> dict | None:
    path = state_path(os.path.abspath(temp_dir or default_dir()))
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise LocalClusterError(f"{path} is not valid JSON ({e.msg}); remove it if no cluster runs from there")


def _write_state(state: dict) -> None:
    path = state_path(state["temp_dir"])
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)


def read_token(state: dict) -> str | None:
    """The cluster's token, for this module's own requests (never printed)."""
    path = state.get("token_file")
    if path:
        try:
            with open(path) as f:
                return f.read().strip() or None
        except OSError:
            return None
    return os.environ.get("RAY_AUTH_TOKEN", "").strip() or None


# --- token ------------------------------------------------------------------------------

def _resolve_token(temp_dir: str, token_file: str | None) -> tuple[str | None, str, bool]:
    """(file the nodes read the token from or None for RAY_AUTH_TOKEN, where it came from, generated)."""
    def usable(path: str, what: str) -> str:
        path = os.path.abspath(os.path.expanduser(path))
        try:
            with open(path) as f:
                if not f.read().strip():
                    raise LocalClusterError(f"{what} {path} is empty; put the token in it or leave it out to generate one")
        except OSError as e:
            raise LocalClusterError(f"cannot read {what} {path} ({e.strerror})")
        return path

    if token_file:
        return usable(token_file, "--token-file"), "--token-file", False
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return None, "RAY_AUTH_TOKEN", False
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return usable(os.environ["RAY_AUTH_TOKEN_PATH"], "RAY_AUTH_TOKEN_PATH"), "RAY_AUTH_TOKEN_PATH", False
    home = os.path.expanduser("~/.ray/auth_token")
    if os.path.isfile(home):
        return usable(home, "~/.ray/auth_token"), "~/.ray/auth_token", False
    path = os.path.join(temp_dir, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path, "generated", True


# --- nodes ------------------------------------------------------------------------------

def _node_env(gcs_address: str, token_file: str | None) -> dict:
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


def _spawn(cmd: list[str], env: dict, log_path: str, cwd: str) -> int:
    os.makedirs(cwd, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


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


def _wait_ready(nodes: list[dict], deadline: float) -> None:
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
            elif not _alive(node["pid"]):
                raise LocalClusterError(f"{node['name']} node exited while starting: {_last_error(node['log'])} "
                                        f"(log: {node['log']})")
        if pending and time.time() > deadline:
            raise LocalClusterError(f"{pending[0]['name']} node did not start in time (log: {pending[0]['log']})")
        time.sleep(0.2)


def dashboard_get(state: dict, path: str, timeout: float = 10) -> dict:
    req = urllib.request.Request(state["dashboard_url"] + path)
    token = read_token(state)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def alive_nodes(state: dict) -> list[dict]:
    """The cluster's alive nodes as the GCS sees them (through the dashboard)."""
    data = dashboard_get(state, "/nodes?view=summary")
    out = []
    for n in data.get("data", {}).get("summary", []):
        raylet = n.get("raylet", {})
        if raylet.get("state") == "ALIVE":
            out.append({"node_id": raylet.get("nodeId"), "ip": n.get("ip"),
                        "is_head": bool(raylet.get("isHeadNode")),
                        "cpus": raylet.get("resourcesTotal", {}).get("CPU", 0)})
    return out


def _wait_registered(state: dict, want: int, deadline: float) -> list[dict]:
    nodes: list[dict] = []
    last_error = ""
    while time.time() < deadline:
        try:
            nodes = alive_nodes(state)
            if len(nodes) >= want:
                return nodes
        except (OSError, ValueError, urllib.error.URLError) as e:
            last_error = f": {e}"
        time.sleep(0.5)
    raise LocalClusterError(f"only {len(nodes)} of {want} nodes registered with the head in time{last_error}")


def start(temp_dir: str | None = None, *, workers: int = 1, cpus_per_node: int = 2, head_cpus: int | None = None,
          object_store_mb: int = 512, token_file: str | None = None, dashboard_port: int | None = None,
          port: int | None = None, timeout: float = 120) -> dict:
    """Start a head and `workers` worker nodes; returns the state (also written to D/cluster.json)."""
    temp_dir = os.path.abspath(os.path.expanduser(temp_dir or default_dir()))
    if workers < 0 or cpus_per_node < 0 or (head_cpus is not None and head_cpus < 0):
        raise LocalClusterError("--workers, --cpus-per-node and --head-cpus must not be negative")
    longest = len(os.path.join(temp_dir, f"worker-{max(workers, 1)}")) + SOCKET_SUFFIX
    if longest > SOCKET_MAX:
        raise LocalClusterError(f"--temp-dir {temp_dir} is too long for Ray's unix sockets "
                                f"({longest} > {SOCKET_MAX} characters); use a short one such as /tmp/rc1")
    old = load_state(temp_dir)
    if old and any(_alive(n["pid"]) for n in old["nodes"]):
        raise LocalClusterError(f"a local cluster already runs from {temp_dir} (dashboard {old['dashboard_url']}); "
                                f"stop it first: python -m clusters.local stop --temp-dir {temp_dir}")
    os.makedirs(temp_dir, mode=0o700, exist_ok=True)
    if old and old.get("token_generated") and old.get("token_file"):
        try:
            os.remove(old["token_file"])
        except FileNotFoundError:
            pass
    token_path, token_source, generated = _resolve_token(temp_dir, token_file)
    gcs_port = free_port(port or 6379)
    dash_port = free_port(dashboard_port or 8265)
    gcs_address = f"127.0.0.1:{gcs_port}"
    env = _node_env(gcs_address, token_path)
    osm = int(object_store_mb) * 1024 * 1024
    state = {
        "temp_dir": temp_dir, "gcs_address": gcs_address, "dashboard_url": f"http://127.0.0.1:{dash_port}",
        "token_source": token_source, "token_file": token_path, "token_generated": generated,
        "created": time.time(), "python": sys.executable, "nodes": [],
    }

    def node_record(name: str, pid: int) -> dict:
        return {"name": name, "pid": pid, "temp_dir": os.path.join(temp_dir, name),
                "log": os.path.join(temp_dir, f"{name}.log")}

    head_dir = os.path.join(temp_dir, "head")
    head_cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--num-cpus={_num(head_cpus if head_cpus is not None else cpus_per_node)}", "--num-gpus=0",
        f"--object-store-memory={osm}", f"--temp-dir={head_dir}", "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
    ]
    deadline = time.time() + timeout
    try:
        head = node_record("head", 0)
        head["pid"] = _spawn(head_cmd, env, head["log"], head_dir)
        state["nodes"].append(head)
        _write_state(state)
        _wait_ready([head], deadline)
        for i in range(1, workers + 1):
            name = f"worker-{i}"
            node_dir = os.path.join(temp_dir, name)
            ports = {"agent_http": free_port(), "agent_grpc": free_port(), "metrics": free_port(),
                     "runtime_env": free_port()}
            cmd = [sys.executable, "-c",
                   f"import sys; sys.path.insert(0, {ROOT!r}); import clusters.local as m; m._node_main(sys.argv[1:])",
                   "--gcs", gcs_address, "--temp-dir", node_dir, "--num-cpus", _num(cpus_per_node),
                   "--object-store-memory", str(osm), "--ports", json.dumps(ports)]
            rec = node_record(name, 0)
            rec["pid"] = _spawn(cmd, env, rec["log"], node_dir)
            state["nodes"].append(rec)
        _write_state(state)
        _wait_ready(state["nodes"][1:], deadline)
        nodes = _wait_registered(state, workers + 1, deadline)
    except BaseException:
        _stop_nodes(state)
        _remove_state(state)
        raise
    state["cpus"] = sum(n["cpus"] for n in nodes)
    _write_state(state)
    return state


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _node_main(argv: list[str]) -> None:
    """One worker node, blocking like `ray start --block` (run by `start`, not by hand)."""
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
        gcs_address=a.gcs, node_ip_address="127.0.0.1", num_cpus=a.num_cpus, num_gpus=0, object_store_memory=a.object_store_memory, temp_dir=a.temp_dir,
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


# --- stop -------------------------------------------------------------------------------

def _cluster_processes(state: dict) -> list[int]:
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
        left = [p for p in pids if _alive(p)]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


def _stop_nodes(state: dict) -> None:
    workers = [n["pid"] for n in state["nodes"] if n["name"] != "head" and n["pid"]]
    heads = [n["pid"] for n in state["nodes"] if n["name"] == "head" and n["pid"]]
    for group in (workers, heads):  # workers first, then the head they report to
        for pid in group:
            _signal(pid, signal.SIGTERM)
        for pid in _wait_gone(group, 20):
            _signal(pid, signal.SIGKILL, group=True)
    # each node's process group, then whatever of the cluster is left (e.g. a job's driver)
    for pid in workers + heads:
        _signal(pid, signal.SIGKILL, group=True)
    leftovers = _cluster_processes(state)
    for pid in leftovers:
        _signal(pid, signal.SIGTERM)
    for pid in _wait_gone(leftovers, 5):
        _signal(pid, signal.SIGKILL)
    _wait_gone(leftovers, 5)


def _remove_state(state: dict) -> None:
    try:
        os.remove(state_path(state["temp_dir"]))
    except FileNotFoundError:
        pass
    if state.get("token_generated") and state.get("token_file"):
        try:
            os.remove(state["token_file"])
        except FileNotFoundError:
            pass


def stop(temp_dir: str | None = None, *, clean: bool = False) -> dict:
    temp_dir = os.path.abspath(os.path.expanduser(temp_dir or default_dir()))
    state = load_state(temp_dir)
    if state is None:
        raise LocalClusterError(f"no local cluster was started from {temp_dir} (no {STATE_NAME} there)")
    _stop_nodes(state)
    _remove_state(state)
    if clean:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return state


def status(temp_dir: str | None = None) -> dict:
    temp_dir = os.path.abspath(os.path.expanduser(temp_dir or default_dir()))
    state = load_state(temp_dir)
    if state is None:
        raise LocalClusterError(f"no local cluster was started from {temp_dir} (no {STATE_NAME} there)")
    out = {k: state[k] for k in ("temp_dir", "gcs_address", "dashboard_url", "token_source", "token_file")}
    out["processes"] = {n["name"]: _alive(n["pid"]) for n in state["nodes"]}
    try:
        nodes = alive_nodes(state)
        out["alive_nodes"] = len(nodes)
        out["cpus"] = sum(n["cpus"] for n in nodes)
    except (OSError, ValueError, urllib.error.URLError) as e:
        out["alive_nodes"] = 0
        out["error"] = f"dashboard not answering: {getattr(e, 'reason', e)}"
    out["healthy"] = all(out["processes"].values()) and out["alive_nodes"] == len(state["nodes"])
    return out


def env_lines(state: dict) -> list[str]:
    """Shell lines that point the job commands at this cluster (no secret in them)."""
    lines = ["export RAY_AUTH_MODE=token"]
    if state.get("token_file"):
        lines.append(f"export RAY_AUTH_TOKEN_PATH={state['token_file']}")
    lines.append(f"export RAY_API_SERVER_ADDRESS={state['dashboard_url']}")
    return lines


# --- command line -----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clusters.local", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("start", help="start a head and worker nodes on this machine")
    sp.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
    sp.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs of each node (default 2)")
    sp.add_argument("--head-cpus", type=int, help="logical CPUs of the head (default: --cpus-per-node; "
                                                      "0 keeps tasks off the head like a production head)")
    sp.add_argument("--object-store-mb", type=int, default=512, help="object store per node, MiB (default 512)")
    sp.add_argument("--token-file", help="file holding the token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, "
                                         "~/.ray/auth_token, else a new one in TEMP_DIR/auth_token)")
    sp.add_argument("--port", type=int, help="GCS port (default 6379 if free, else any)")
    sp.add_argument("--dashboard-port", type=int, help="dashboard port (default 8265 if free, else any)")
    sp.add_argument("--timeout", type=float, default=120)
    sp.add_argument("--json", action="store_true", help="print the state as JSON")
    for name, text in (("status", "is the cluster up"), ("env", "shell exports for the job commands"),
                       ("stop", "stop exactly this cluster's nodes")):
        s = sub.add_parser(name, help=text)
        if name == "status":
            s.add_argument("--json", action="store_true")
        if name == "stop":
            s.add_argument("--clean", action="store_true", help="also remove the temp dir (logs, spilled objects)")
    for s in sub.choices.values():
        s.add_argument("--temp-dir", help=f"the cluster's folder (default {default_dir()}, or RAYMM_LOCAL_CLUSTER_DIR)")
    a = p.parse_args(argv)
    try:
        if a.command == "start":
            st = start(a.temp_dir, workers=a.workers, cpus_per_node=a.cpus_per_node, head_cpus=a.head_cpus,
                       object_store_mb=a.object_store_mb, token_file=a.token_file, port=a.port,
                       dashboard_port=a.dashboard_port, timeout=a.timeout)
            if a.json:
                print(json.dumps(st, indent=1))
            else:
                print(f"started a local Ray cluster: {len(st['nodes'])} nodes, {_num(st['cpus'])} CPUs, "
                      f"token authentication on (token from {st['token_source']})")
                print(f"  dashboard / jobs API : {st['dashboard_url']}   (127.0.0.1 only)")
                print(f"  GCS address          : {st['gcs_address']}")
                print(f"  state and logs       : {st['temp_dir']}")
                print("  use it:")
                for line in env_lines(st):
                    print(f"    {line}")
                print("    python ray_job.py submit --wait -- preprocess /abs/raw --output /abs/clean")
                print(f"  stop it: python -m clusters.local stop --temp-dir {st['temp_dir']}")
        elif a.command == "status":
            out = status(a.temp_dir)
            if a.json:
                print(json.dumps(out, indent=1))
            else:
                procs = ", ".join(f"{k} {'up' if v else 'DOWN'}" for k, v in out["processes"].items())
                print(f"{'healthy' if out['healthy'] else 'NOT healthy'}: {out['alive_nodes']} alive nodes, "
                      f"{_num(out.get('cpus', 0))} CPUs; {procs}; dashboard {out['dashboard_url']}"
                      + (f"; {out['error']}" if out.get("error") else ""))
            return 0 if out["healthy"] else 1
        elif a.command == "env":
            st = load_state(a.temp_dir)
            if st is None:
                raise LocalClusterError(f"no local cluster was started from {a.temp_dir or default_dir()}")
            print("\n".join(env_lines(st)))
        elif a.command == "stop":
            st = stop(a.temp_dir, clean=a.clean)
            print(f"stopped the local Ray cluster in {st['temp_dir']} ({len(st['nodes'])} nodes)")
    except LocalClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
