"""A Ray cluster of several nodes on this machine: loopback only, token authentication on.

    python -m clusters.local start [--workers N] [--cpus-per-node C] [--head-cpus H] [--temp-dir D]
    python -m clusters.local status [--temp-dir D] [--json]
    python -m clusters.local env [--temp-dir D]          # `eval "$(...)"`: the job commands' settings
    python -m clusters.local stop [--temp-dir D] [--clean]

Each node runs in its own process group with its own Ray temp dir under D (default
/tmp/raymm-local-UID): D/head and D/worker-1..N. `D/cluster.json` records the node processes,
ports and where the token comes from (never the token). `stop` stops exactly those nodes (and
job drivers running inside them); other Ray instances on the machine are left alone. How the
nodes start (and why the workers are not `ray start --address`) is clusters/local_nodes.py.

Token: `--token-file F`, else RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token
(Ray's own order, clusters/auth.py), else a new random token is written to D/auth_token (mode
0600). The nodes get RAY_AUTH_MODE=token and the token (by file path where there is a file).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request

from pipelines.errors import UserError
from pipelines.processes import process_runs

from . import auth
from .local_nodes import (LocalClusterError, free_port, node_env, plain_number, start_head, start_worker,
                          stop_nodes, wait_ready)

STATE_NAME = "cluster.json"
# a node's unix sockets live at NODE_DIR/session_<date>_<pid>/sockets/plasma_store: 62 characters
# past NODE_DIR, and a unix socket path has at most 107
SOCKET_SUFFIX = 62
SOCKET_MAX = 107


def default_dir() -> str:
    return os.environ.get("RAYMM_LOCAL_CLUSTER_DIR") or f"/tmp/raymm-local-{os.getuid()}"


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


def _existing_state(temp_dir: str | None) -> dict:
    temp_dir = os.path.abspath(os.path.expanduser(temp_dir or default_dir()))
    state = load_state(temp_dir)
    if state is None:
        raise LocalClusterError(f"no local cluster was started from {temp_dir} (no {STATE_NAME} there)")
    return state


def _write_state(state: dict) -> None:
    path = state_path(state["temp_dir"])
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)


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


# --- token ------------------------------------------------------------------------------

def _resolve_token(temp_dir: str, token_file: str | None) -> tuple[str | None, str, bool]:
    """(file the nodes read the token from or None for RAY_AUTH_TOKEN, where it came from, generated)."""
    place = auth.locate(token_file)
    if place is not None:
        return place.path, place.source, False
    path = os.path.join(temp_dir, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path, "generated", True


def _cluster_token(state: dict) -> str | None:
    """The cluster's token, for this module's own requests (never printed); None once its file is
    gone: the dashboard then refuses, which `status` reports."""
    try:
        return auth.TokenPlace(state["token_source"], state.get("token_file")).read()
    except auth.TokenError:
        return None


# --- the dashboard ----------------------------------------------------------------------

def dashboard_get(state: dict, path: str, timeout: float = 10) -> dict:
    req = urllib.request.Request(state["dashboard_url"] + path, headers=auth.auth_header(_cluster_token(state)))
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


# --- start, stop, status, env -----------------------------------------------------------

def start(temp_dir: str | None = None, *, workers: int = 1, cpus_per_node: int = 2, head_cpus: int | None = None,
          object_store_mb: int = 512, token_file: str | None = None, dashboard_port: int | None = None,
          port: int | None = None, timeout: float = 120) -> dict:
    """Start a head and `workers` worker nodes; returns the state (also written to D/cluster.json)."""
    temp_dir = _checked_temp_dir(temp_dir, workers, cpus_per_node, head_cpus)
    token_path, token_source, generated = _resolve_token(temp_dir, token_file)
    gcs_port = free_port(port or 6379)
    dash_port = free_port(dashboard_port or 8265)
    gcs_address = f"127.0.0.1:{gcs_port}"
    env = node_env(gcs_address, token_path)
    osm = int(object_store_mb) * 1024 * 1024
    state = {
        "temp_dir": temp_dir, "gcs_address": gcs_address, "dashboard_url": f"http://127.0.0.1:{dash_port}",
        "token_source": token_source, "token_file": token_path, "token_generated": generated,
        "created": time.time(), "python": sys.executable, "nodes": [],
    }
    deadline = time.time() + timeout
    try:  # every node is in the state as soon as it is spawned: a failure stops exactly those
        state["nodes"].append(start_head(temp_dir, env, gcs_port=gcs_port, dashboard_port=dash_port,
                                         cpus=cpus_per_node if head_cpus is None else head_cpus,
                                         object_store_bytes=osm))
        _write_state(state)
        wait_ready(state["nodes"], deadline)
        for i in range(1, workers + 1):
            state["nodes"].append(start_worker(temp_dir, f"worker-{i}", env, gcs_address=gcs_address,
                                               cpus=cpus_per_node, object_store_bytes=osm))
        _write_state(state)
        wait_ready(state["nodes"][1:], deadline)
        nodes = _wait_registered(state, workers + 1, deadline)
    except BaseException:
        stop_nodes(state)
        _remove_state(state)
        raise
    state["cpus"] = sum(n["cpus"] for n in nodes)
    _write_state(state)
    return state


def _checked_temp_dir(temp_dir: str | None, workers: int, cpus_per_node: int, head_cpus: int | None) -> str:
    """The cluster's folder, made ready for a new cluster: refuses counts below 0, a folder too
    long for Ray's sockets and one a cluster still runs from; removes a stopped one's token."""
    temp_dir = os.path.abspath(os.path.expanduser(temp_dir or default_dir()))
    if workers < 0 or cpus_per_node < 0 or (head_cpus is not None and head_cpus < 0):
        raise LocalClusterError("--workers, --cpus-per-node and --head-cpus must not be negative")
    longest = len(os.path.join(temp_dir, f"worker-{max(workers, 1)}")) + SOCKET_SUFFIX
    if longest > SOCKET_MAX:
        raise LocalClusterError(f"--temp-dir {temp_dir} is too long for Ray's unix sockets "
                                f"({longest} > {SOCKET_MAX} characters); use a short one such as /tmp/rc1")
    old = load_state(temp_dir)
    if old and any(process_runs(n["pid"]) for n in old["nodes"]):
        raise LocalClusterError(f"a local cluster already runs from {temp_dir} (dashboard {old['dashboard_url']}); "
                                f"stop it first: python -m clusters.local stop --temp-dir {temp_dir}")
    os.makedirs(temp_dir, mode=0o700, exist_ok=True)
    if old and old.get("token_generated") and old.get("token_file"):
        try:
            os.remove(old["token_file"])
        except FileNotFoundError:
            pass
    return temp_dir


def stop(temp_dir: str | None = None, *, clean: bool = False) -> dict:
    temp_dir = os.path.abspath(os.path.expanduser(temp_dir or default_dir()))
    state = _existing_state(temp_dir)
    stop_nodes(state)
    _remove_state(state)
    if clean:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return state


def status(temp_dir: str | None = None) -> dict:
    state = _existing_state(temp_dir)
    out = {k: state[k] for k in ("temp_dir", "gcs_address", "dashboard_url", "token_source", "token_file")}
    out["processes"] = {n["name"]: process_runs(n["pid"]) for n in state["nodes"]}
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

def _cli_start(a) -> int:
    st = start(a.temp_dir, workers=a.workers, cpus_per_node=a.cpus_per_node, head_cpus=a.head_cpus,
               object_store_mb=a.object_store_mb, token_file=a.token_file, port=a.port,
               dashboard_port=a.dashboard_port, timeout=a.timeout)
    if a.json:
        print(json.dumps(st, indent=1))
        return 0
    print(f"started a local Ray cluster: {len(st['nodes'])} nodes, {plain_number(st['cpus'])} CPUs, "
          f"token authentication on (token from {st['token_source']})")
    print(f"  dashboard / jobs API : {st['dashboard_url']}   (127.0.0.1 only)")
    print(f"  GCS address          : {st['gcs_address']}")
    print(f"  state and logs       : {st['temp_dir']}")
    print("  use it:")
    for line in env_lines(st):
        print(f"    {line}")
    print("    python ray_job.py submit --wait -- preprocess /abs/raw --output /abs/clean")
    print(f"  stop it: python -m clusters.local stop --temp-dir {st['temp_dir']}")
    return 0


def _cli_status(a) -> int:
    out = status(a.temp_dir)
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        procs = ", ".join(f"{k} {'up' if v else 'DOWN'}" for k, v in out["processes"].items())
        print(f"{'healthy' if out['healthy'] else 'NOT healthy'}: {out['alive_nodes']} alive nodes, "
              f"{plain_number(out.get('cpus', 0))} CPUs; {procs}; dashboard {out['dashboard_url']}"
              + (f"; {out['error']}" if out.get("error") else ""))
    return 0 if out["healthy"] else 1


def _cli_env(a) -> int:
    print("\n".join(env_lines(_existing_state(a.temp_dir))))
    return 0


def _cli_stop(a) -> int:
    st = stop(a.temp_dir, clean=a.clean)
    print(f"stopped the local Ray cluster in {st['temp_dir']} ({len(st['nodes'])} nodes)")
    return 0


# subcommand: (what it does, what runs it)
COMMANDS = {
    "start": ("start a head and worker nodes on this machine", _cli_start),
    "status": ("is the cluster up", _cli_status),
    "env": ("shell exports for the job commands", _cli_env),
    "stop": ("stop exactly this cluster's nodes", _cli_stop),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clusters.local", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    parsers = {name: sub.add_parser(name, help=text) for name, (text, _) in COMMANDS.items()}
    sp = parsers["start"]
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
    parsers["status"].add_argument("--json", action="store_true")
    parsers["stop"].add_argument("--clean", action="store_true", help="also remove the temp dir (logs, spilled objects)")
    for s in parsers.values():
        s.add_argument("--temp-dir", help=f"the cluster's folder (default {default_dir()}, or RAYMM_LOCAL_CLUSTER_DIR)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        return COMMANDS[a.command][1](a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
