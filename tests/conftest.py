"""Shared test infrastructure: one real Ray head per test session (loopback only), a real
S3-compatible server (moto in server mode) on loopback, and corpora made in code."""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Ray 2.60 turns token authentication on by default. This session's cluster gets its own
# token, inherited by every CLI subprocess, so no ~/.ray/auth_token of another run interferes.
# Set before anything imports ray: Ray reads the mode once per process.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Ray's single-machine mode: every node of the test cluster on 127.0.0.1
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_processes_under(folder: str) -> None:
    """Stop this session's Ray only (not `ray stop`, which ends every Ray on the machine): its
    GCS, raylet and helpers name the session's temp dir on their command line, and its
    workers exit when their raylet is gone."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if any(folder in a for a in p.info["cmdline"] or [])]
    # and their descendants: some retitle themselves (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`)
    # and the Ray Client server does not name the folder, so only the process tree finds them
    for p in list(procs):
        try:
            procs += [c for c in p.children(recursive=True) if c not in procs]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray head shared by the whole session; CLI subprocesses join it through
    RAY_ADDRESS, so each of them skips Ray's start-up."""
    import ray

    port, dashboard = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    address = f"127.0.0.1:{port}"
    # the cluster's own processes get RAY_ADDRESS too: Ray Train's state queries inside the
    # cluster must not guess among other Ray instances on the machine.
    # 4 logical CPUs on 2 cores: 2 training workers plus the data tasks that feed them.
    env = {**os.environ, "RAY_ADDRESS": address}
    old = os.environ.get("RAY_ADDRESS")
    try:  # a head that failed half-way is stopped too
        subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
             "--node-ip-address=127.0.0.1", "--num-cpus=4", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             "--disable-usage-stats", f"--temp-dir={temp}"],
            check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.environ["RAY_ADDRESS"] = address
        from pipelines.runtime import init_ray

        init_ray(address)
        yield address
    finally:
        ray.shutdown()
        _stop_processes_under(str(temp))
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old


@pytest.fixture(scope="session")
def small_data(ray_cluster, tmp_path_factory):
    """48 preprocessed samples in 4 shards: 3 steps per epoch for 2 workers x 8."""
    from pipelines.corpus import make_corpus
    from pipelines.preprocess import preprocess

    root = tmp_path_factory.mktemp("traindata")
    make_corpus(str(root / "raw"), 48, 4, seed=11)
    preprocess([str(root / "raw")], str(root / "clean"), progress=False)
    return root / "clean"


LOSES_A_NODE = "loses_a_node"


def pytest_configure(config):
    config.addinivalue_line("markers", f"{LOSES_A_NODE}: kills a node of the shared multi_node_cluster; "
                                       "runs after every other test")


def pytest_collection_modifyitems(items):
    # the multi-node cluster is started once per session: a test that takes one of its nodes
    # away runs after every test that needs all three (a stable sort keeps the rest in order)
    items.sort(key=lambda item: item.get_closest_marker(LOSES_A_NODE) is not None)


@pytest.fixture(scope="session")
def multi_node_cluster():
    """A real multi-node Ray cluster on loopback with token authentication (`python -m
    clusters.local`): a 0-CPU head, like a production head, and two worker nodes of 2 CPUs.
    Yields its state, plus "printed": what `start` printed. Stopped (and its folder removed)
    at the end of the session."""
    # short: Ray's unix socket paths live under it
    folder = tempfile.mkdtemp(prefix="rjc-", dir="/tmp")
    # not the default 8265: every embedded Ray on the machine (other test sessions) tries that one
    r = subprocess.run([sys.executable, "-m", "clusters.local", "start", "--workers", "2", "--cpus-per-node", "2",
                        "--head-cpus", "0", "--object-store-mb", "256", "--dashboard-port", str(free_port()),
                        "--temp-dir", folder, "--json"], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    yield {**json.loads(r.stdout), "printed": r.stdout + r.stderr}
    r = subprocess.run([sys.executable, "-m", "clusters.local", "stop", "--temp-dir", folder, "--clean"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert not os.path.exists(folder)


@pytest.fixture(scope="session")
def demo_workdir(ray_cluster, tmp_path_factory):
    """The README's demo, run once per session as the README runs it (`ray_job.py demo`, on an
    embedded Ray of its own): a trained run (run/), its export (model.safetensors), the raw and
    preprocessed corpora (raw/, clean/) and the held-out 16-way shards (heldout_raw/, heldout/).
    Yields (workdir, the completed process). MMTRAIN_TEST_DEMO_DIR names a folder to keep it in
    between sessions (a developer's shortcut): a finished demo there is used as it is, without
    running anything, and the process is None."""
    kept = os.environ.get("MMTRAIN_TEST_DEMO_DIR")
    if kept and (Path(kept) / "summary.json").exists():
        return Path(kept), None
    work = Path(kept or tmp_path_factory.mktemp("demo") / "demo")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "demo", "--workdir", str(work)],
                       capture_output=True, text=True, cwd=ROOT, timeout=1500, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return work, r


@pytest.fixture(scope="session")
def fault_data(ray_cluster, tmp_path_factory):
    """The fault-tolerance corpus (tests/fault_runs.py): 64 preprocessed samples in 8 shards."""
    from fault_runs import make_data

    return make_data(tmp_path_factory.mktemp("ftdata"))


@pytest.fixture(scope="session")
def fault_reference(fault_data, tmp_path_factory):
    """The uninterrupted deterministic run on `fault_data` that interrupted runs are compared with;
    an assertion failing in it fails every test that uses it, with that assertion's message."""
    from fault_runs import make_reference

    return make_reference(fault_data, tmp_path_factory.mktemp("reference") / "run")


def cli(*args, timeout=900, cwd=ROOT):
    """`python ray_job.py ARGS...` (joining the session's cluster through RAY_ADDRESS); must succeed."""
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def fresh_embedded_python(script: str, cwd, tag: str, timeout: int = 240) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -c SCRIPT` in a fresh process that starts its own embedded Ray (never the session's:
    no RAY_ADDRESS); must succeed. Returns it and the JSON of its last stdout line `TAG {...}`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(tag + " ")]
    assert lines, r.stdout[-2000:] + r.stderr[-2000:]
    return r, json.loads(lines[-1][len(tag) + 1:])


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; yields storage options for fsspec/s3fs."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint,
                                                                       "region_name": "us-east-1"}}
    yield {"endpoint": endpoint, "storage_options": opts}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def s3_bucket(s3_server, request):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    name = f"b{abs(hash(request.node.nodeid)) % 10**8}-{int(time.time() * 1000) % 10**6}"
    import boto3

    boto3.client("s3", endpoint_url=s3_server["endpoint"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)
    fs.invalidate_cache()
    yield name, fs


def s3_raw_corpus(s3_server, root: Path, bucket_prefix: str, shards: list[str], samples: int, seed: int) -> dict:
    """A new bucket holding a raw corpus made in code (`samples` over len(`shards`) shards) under
    raw/; the local copy under ROOT/raw is the reference for what a read must give."""
    import boto3
    import s3fs

    from pipelines.corpus import make_corpus

    make_corpus(str(root / "raw"), samples, len(shards), seed=seed)
    bucket = f"{bucket_prefix}-{int(time.time() * 1000) % 10**9}"
    boto3.client("s3", endpoint_url=s3_server["endpoint"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server["storage_options"])
    for name in shards:
        fs.put_file(str(root / "raw" / name), f"{bucket}/raw/{name}")
    return {"bucket": bucket, "local": root / "raw", "fs": fs}
