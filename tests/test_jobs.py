"""Cluster jobs end to end: a real multi-node Ray cluster on loopback with token authentication
(`python -m clusters.local`), steps submitted, followed, listed and stopped through the Ray Jobs
API by `ray_job.py`. The head has 0 CPUs, like a production head: the job's driver runs there
(entrypoint_num_cpus 0) and every task and training worker runs on the two worker nodes."""
import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from pipelines.corpus import make_corpus

# conftest puts the session's token in os.environ at import; the cluster is started with it
TOKEN = os.environ["RAY_AUTH_TOKEN"]
OUTPUTS: list[str] = []  # everything any command of this module printed: checked for the token at the end


def run(args, *, env=None, timeout=300, module=None):
    cmd = [sys.executable, "-m", module] if module else [sys.executable, str(ROOT / "ray_job.py")]
    r = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                       env=env or dict(os.environ), timeout=timeout)
    OUTPUTS.append(r.stdout + r.stderr)
    return r


def ok(r):
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def error_lines(r):
    return [line for line in r.stderr.splitlines() if line.strip()]


def no_token_env(tmp_path, **extra):
    """The CLI's environment with no token anywhere: no RAY_AUTH_TOKEN(_PATH), an empty HOME."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(home)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cluster(multi_node_cluster):
    OUTPUTS.append(multi_node_cluster["printed"])  # `start`'s output is checked for the token too
    return multi_node_cluster


@pytest.fixture(scope="module")
def url(cluster):
    return cluster["dashboard_url"]


def job_id_of(r):
    return r.stdout.strip().splitlines()[-1]


def test_local_cluster_is_up_on_loopback_only(cluster):
    import psutil

    from clusters import local_nodes

    r = ok(run(["status", "--temp-dir", cluster["temp_dir"], "--json"], module="clusters.local"))
    st = json.loads(r.stdout)
    assert st["healthy"] and st["alive_nodes"] == 3 and st["cpus"] == 4
    assert st["token_source"] == "RAY_AUTH_TOKEN"
    # every socket the cluster's processes listen on is bound to loopback
    pids = set(local_nodes.cluster_processes(cluster))
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(listening) >= 6  # GCS, dashboard, 3 raylets, agents...
    bad = [(c.laddr, psutil.Process(c.pid).name()) for c in listening
           if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not bad, bad
    state_file = os.path.join(cluster["temp_dir"], "cluster.json")
    assert os.stat(state_file).st_mode & 0o077 == 0
    exports = ok(run(["env", "--temp-dir", cluster["temp_dir"]], module="clusters.local")).stdout
    assert f"RAY_API_SERVER_ADDRESS={cluster['dashboard_url']}" in exports and "RAY_AUTH_MODE=token" in exports


def test_preprocess_and_train_jobs_succeed_with_workers_on_other_nodes(cluster, url, tmp_path):
    make_corpus(str(tmp_path / "raw"), 24, 2, seed=5)
    clean, run_dir = tmp_path / "clean", tmp_path / "run"
    r = ok(run(["submit", "--address", url, "--wait", "--name", "prep", "--",
                "preprocess", tmp_path / "raw", "--output", clean, "--quiet"]))
    assert "written 24" in r.stdout  # the driver's summary, streamed back
    assert "warning" not in r.stderr and error_lines(r)[-1].startswith("job prep-") and "succeeded" in r.stderr
    assert pq.read_table(clean / "_manifest.parquet").num_rows == 24

    # the driver on the 0-CPU head, the 2 training workers (1 CPU each) and the data tasks on the
    # worker nodes: data and gradients cross nodes
    r = ok(run(["submit", "--address", url, "--wait", "--", "train", "--data", clean, "--run-dir", run_dir,
                "--max-steps", 2, "--batch-size", 4, "--workers", 2]))
    assert "trained 2 steps" in r.stdout
    assert (run_dir / "train" / "checkpoint_000000002").is_dir()
    job = error_lines(r)[-1].split()[1]

    st = json.loads(ok(run(["status", job, "--address", url, "--json"])).stdout)
    assert st["status"] == "SUCCEEDED" and st["entrypoint"].startswith("python ray_job.py train")
    listing = ok(run(["list", "--address", url])).stdout
    assert job in listing and "prep-" in listing


def test_a_failing_job_exits_nonzero_with_one_line(url, tmp_path):
    r = run(["submit", "--address", url, "--wait", "--", "preprocess", tmp_path / "missing",
             "--output", tmp_path / "out"])
    assert r.returncode == 1
    last = error_lines(r)[-1]
    assert last.startswith("error: job ") and " failed" in last and "\n" not in last


def test_refused_without_the_token_or_with_a_wrong_one(url, tmp_path):
    before = len(json.loads(ok(run(["list", "--address", url, "--json"])).stdout))

    r = run(["submit", "--address", url, "--", "make-corpus", tmp_path / "c", "--samples", 1],
            env=no_token_env(tmp_path))
    assert r.returncode == 2
    assert len(error_lines(r)) == 1, r.stderr  # one line, nothing else (no traceback, no Ray warning)
    line = error_lines(r)[0]
    assert line.startswith("error: ") and "requires a token and none was found" in line
    assert "RAY_AUTH_TOKEN" in line and "RAY_AUTH_TOKEN_PATH" in line and "~/.ray/auth_token" in line

    for args in (["list", "--address", url], ["status", "anything", "--address", url]):
        r = run(args, env=no_token_env(tmp_path))
        assert r.returncode == 2 and len(error_lines(r)) == 1 and "requires a token" in r.stderr

    r = run(["list", "--address", url], env=no_token_env(tmp_path, RAY_AUTH_TOKEN="0" * 64))
    assert r.returncode == 2 and len(error_lines(r)) == 1
    assert "refused the token read from RAY_AUTH_TOKEN" in r.stderr

    # nothing was submitted by the refused calls
    assert len(json.loads(ok(run(["list", "--address", url, "--json"])).stdout)) == before

    # the token from a file (RAY_AUTH_TOKEN_PATH), RAY_AUTH_MODE not even set on this side, and
    # the address from RAY_API_SERVER_ADDRESS
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = no_token_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(token_file), RAY_API_SERVER_ADDRESS=url)
    env.pop("RAY_AUTH_MODE", None)
    ok(run(["list"], env=env))


def test_address_must_be_the_dashboard_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_API_SERVER_ADDRESS",)}
    env["RAY_ADDRESS"] = "127.0.0.1:6379"
    r = run(["list"], env=env)
    assert r.returncode == 2 and len(error_lines(r)) == 1
    assert "GCS address" in r.stderr and "http://HEAD:8265" in r.stderr


def test_relative_paths_warn_and_strict_refuses():
    r = ok(run(["submit", "--dry-run", "--", "train", "--data", "data/clean", "--run-dir", "runs/a",
                "--config", "configs/tiny.json"]))
    warnings = [line for line in error_lines(r) if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "--data data/clean" in warnings[0] and "--run-dir runs/a" in warnings[0]
    assert "configs/tiny.json" not in warnings[0]  # shipped in the uploaded working dir: fine
    plan = json.loads(r.stdout)
    assert plan["entrypoint"].startswith("python ray_job.py train")
    renv = plan["runtime_env"]
    assert renv["working_dir"] == str(ROOT) and "__pycache__" in renv["excludes"]
    assert plan["uploaded"] == [".gitignore", "clusters", "configs", "mmtrain", "pipelines", "pyproject.toml",
                                "ray_job.py"]
    assert "pip" not in renv  # installing is opt-in
    assert plan["package_bytes"] < 20 * 1024 * 1024

    r = run(["submit", "--strict", "--dry-run", "--", "preprocess", "raw", "--output", "/abs/out"])
    assert r.returncode == 2 and len(error_lines(r)) == 1 and "INPUT raw" in r.stderr

    ok(run(["submit", "--strict", "--dry-run", "--", "preprocess", "/abs/raw", "s3://bucket/x-{000..009}.tar",
            "--output", "/abs/out"]))

    r = ok(run(["submit", "--dry-run", "--pip", "tokenizers>=0.19", "--env", "FOO=1", "--", "make-corpus", "/abs/c",
                "--samples", 1]))
    renv = json.loads(r.stdout)["runtime_env"]
    assert renv["pip"]["packages"] == ["tokenizers>=0.19"] and renv["env_vars"]["FOO"] == "1"
    r = run(["submit", "--dry-run", "--env", "RAY_AUTH_TOKEN=x", "--", "make-corpus", "/abs/c", "--samples", 1])
    assert r.returncode == 2 and "secrets" in r.stderr


def test_stop_a_running_job_and_fetch_its_logs(url, tmp_path):
    out = tmp_path / "big"
    # far more than it will get to write: it runs until stopped
    r = ok(run(["submit", "--address", url, "--name", "long", "--", "make-corpus", out, "--samples", 200000,
                "--shards", 20000]))
    job = job_id_of(r)
    assert job.startswith("long-")
    deadline = time.time() + 90
    while True:
        st = json.loads(ok(run(["status", job, "--address", url, "--json"])).stdout)["status"]
        if st == "RUNNING" and os.path.isdir(out):
            break
        assert st in ("PENDING", "RUNNING") and time.time() < deadline, st
        time.sleep(0.5)
    r = ok(run(["stop", job, "--address", url]))
    assert r.stdout.strip() == f"{job}: STOPPED"
    assert json.loads(ok(run(["status", job, "--address", url, "--json"])).stdout)["status"] == "STOPPED"
    logs = ok(run(["logs", job, "--address", url])).stdout
    assert f"Running entrypoint for job {job}" in logs and "make-corpus" in logs
    # stopping it again is not an error
    assert "had already ended" in ok(run(["stop", job, "--address", url])).stdout
    shutil.rmtree(out, ignore_errors=True)


def test_the_token_is_never_printed_nor_stored_with_a_job(cluster, url):
    from clusters.job_client import Cluster

    assert OUTPUTS and not any(TOKEN in o for o in OUTPUTS)
    with open(os.path.join(cluster["temp_dir"], "cluster.json")) as f:
        assert TOKEN not in f.read()
    c = Cluster(url)
    for job in c.list():
        if not job.submission_id:
            continue
        info = c.info(job.submission_id)
        assert TOKEN not in json.dumps(info.runtime_env or {}) and TOKEN not in json.dumps(info.metadata or {})
        assert TOKEN not in (info.entrypoint or "")
