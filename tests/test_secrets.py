"""Secrets stay secret: a fake but distinctive credential given to a real `train` with
`--storage-options` (data and checkpoints on the loopback S3 server, so the driver, the data
tasks and every training worker need it) is found nowhere it could be read from later: Ray's
dashboard (Train state API, Jobs API, Data API), `ray_job.py list`/`status`, the driver's
output, Ray's session folder (every log of the cluster), the run directory and the
checkpoints in the bucket. A training worker is killed mid-run: the replacement worker group
still gets the credentials (they travel as an object reference) and restores from S3.
`submit` refuses credentials on a job's command line in one line, without echoing them."""
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT
from fault_runs import STEPS, assert_exactly_once, assert_same_loss, command, resumed_at
from mmtrain.audit import manifest_ids
from mmtrain.credentials import looks_like_secret, redacted_argv, secret_arguments, secret_paths, without_secrets


def fake_credentials():
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    return {"key": "AKIAFAKE" + "".join(secrets.choice(alphabet) for _ in range(12)),
            "secret": f"s3cr3t-{secrets.token_hex(12)}", "token": f"t0ken-{secrets.token_hex(12)}"}


def dashboard_get(url):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "ray_job.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def files_under(folder):
    for root, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            if os.path.isfile(path) and not os.path.islink(path):
                yield path


def wait_for(log, text, proc, timeout=600):
    deadline = time.time() + timeout
    while text not in open(log).read():
        assert proc.poll() is None, open(log).read()[-4000:]
        assert time.time() < deadline, f"never saw {text!r}"
        time.sleep(0.5)


def test_a_credential_given_to_train_is_nowhere_and_a_restarted_worker_group_still_has_it(
        ray_cluster, fault_data, fault_reference, s3_server, s3_bucket, tmp_path):
    """Also fault tolerance's killed worker process (tests/fault_runs.py: its corpus, 2 epochs,
    deterministic): the replacement group goes on from checkpoint 2, every sample of each epoch
    is trained on once, and the last loss is the uninterrupted run's."""
    import ray
    from ray.util.state import list_actors

    bucket, fs = s3_bucket
    fs.put(str(fault_data["clean"]), f"{bucket}/clean", recursive=True)
    creds = fake_credentials()
    needles = [v.encode() for v in creds.values()]
    opts = {**creds, "client_kwargs": s3_server["storage_options"]["client_kwargs"]}
    run, log = tmp_path / "run", tmp_path / "driver.log"
    data = {**fault_data, "clean": f"s3://{bucket}/clean"}
    cmd = command(data, run, "--deterministic", "--checkpoint-storage", f"s3://{bucket}/run",
                  "--storage-options", json.dumps(opts))
    env = {**os.environ, "RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "MMTRAIN_FAULT_PAUSE": "step@3:120"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    try:
        wait_for(log, "fault injection: pausing", proc)
        dashboard = "http://" + ray._private.worker.get_dashboard_url()
        shown = {}  # everything the dashboard serves, by route
        status, shown["train_v2_runs"] = dashboard_get(f"{dashboard}/api/train/v2/runs/v1")
        assert status == 200, shown["train_v2_runs"][:500]
        ours = [r for r in json.loads(shown["train_v2_runs"])["train_runs"]
                if (r["run_settings"]["train_loop_config"] or {}).get("storage") == f"s3://{bucket}/run/train"]
        assert len(ours) == 1  # the Train API serves our run's config (so the check below means something)
        assert not any(n.decode() in shown["train_v2_runs"] for n in needles), "a credential is in the Train API"
        config = ours[0]["run_settings"]["train_loop_config"]
        assert config["storage_options"].startswith("ObjectRef(")
        assert set(config["run"]["storage_options"]) == {"client_kwargs"}  # deeper levels are shown as "..."

        # a training worker dies: Ray Train starts a new worker group, which resolves the reference
        # again and restores checkpoint 2 from the bucket with the credentials
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        assert len(workers) == 2
        os.kill(workers[0]["pid"], signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, open(log).read()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    driver = open(log).read()
    assert f"trained {STEPS} steps" in driver
    assert json.load(open(run / "attempts.json"))["started"] == 2  # the second group ran
    assert fs.exists(f"{bucket}/run/train/checkpoint_{STEPS:09d}/done/rank_00001")
    assert_exactly_once(run, {**data, "ids": manifest_ids([data["clean"]], opts)}, attempts=2)
    assert resumed_at(run) == 3  # the replacement workers went on from checkpoint 2
    assert_same_loss(run, fault_reference)

    for route in ("/api/train/v2/runs/v1", "/api/train/v2/runs", "/api/jobs/"):
        shown[route] = dashboard_get(dashboard + route)[1]
    jobs = [j for j in json.loads(shown["/api/jobs/"]) if str(run) in (j.get("entrypoint") or "")]
    assert len(jobs) == 1 and "ray_job.py train" in jobs[0]["entrypoint"]  # Ray records the driver's command line
    job_id = jobs[0]["job_id"]
    status, shown["data"] = dashboard_get(f"{dashboard}/api/data/datasets/{job_id}")
    assert status == 200 and "WebDataset" in shown["data"]  # the training dataset's operators are listed
    printed = [cli("list", "--address", dashboard), cli("list", "--address", dashboard, "--json"),
               cli("status", job_id, "--address", dashboard, "--json")]
    assert all(r.returncode == 0 for r in printed) and str(run) in printed[1].stdout
    texts = {"driver output": driver, **shown, **{f"cli {i}": r.stdout + r.stderr for i, r in enumerate(printed)}}
    for what, text in texts.items():
        for needle in needles:
            assert needle.decode() not in text, f"a credential is in {what}"

    session = ray._private.worker._global_node.get_session_dir_path()
    places = [("Ray session", session), ("run directory", str(run))]
    seen_logs = False
    for what, folder in places:
        for path in files_under(folder):
            with open(path, "rb") as f:
                data = f.read()
            seen_logs |= b"fault injection: pausing" in data and what == "Ray session"
            for needle in needles:
                assert needle not in data, f"a credential is in {path}"
    assert seen_logs  # the workers' logs of this run are among the files searched
    objects = fs.find(f"{bucket}/run")
    assert any(f"checkpoint_{STEPS:09d}" in o for o in objects)
    for path in objects:
        data = fs.cat(path)
        for needle in needles:
            assert needle not in data, f"a credential is in s3://{path}"


def test_submit_refuses_credentials_on_the_command_line_in_one_line_without_echoing_them(tmp_path):
    creds = fake_credentials()
    opts = json.dumps({**creds, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}})
    for job in (["train", "--data", "/abs/d", "--run-dir", "/abs/r", "--storage-options", opts],
                ["preprocess", "s3://b/raw", "--output", "s3://b/clean", f"--storage-options={opts}"],
                ["preprocess", "/abs/raw", "--output", "/abs/out", "--aws-secret-access-key", creds["secret"]],
                ["make-corpus", creds["key"], "--samples", "1"]):
        r = cli("submit", "--dry-run", "--", *job)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and not r.stdout, r.stderr
        assert "stored with the job" in lines[0] and "AWS_SECRET_ACCESS_KEY" in lines[0]
        assert "clusters.local start" in lines[0]
        assert not any(v in r.stderr for v in creds.values())
    r = cli("submit", "--dry-run", "--", "train", "--data", "/abs/d", "--run-dir", "/abs/r", "--storage-options", opts)
    assert "--storage-options key, secret, token" in r.stderr
    r = cli("submit", "--dry-run", "--env", f"FOO={creds['key']}", "--", "make-corpus", "/abs/c", "--samples", 1)
    assert r.returncode == 2 and "--env FOO" in r.stderr and creds["key"] not in r.stderr
    # endpoint and region alone are fine
    r = cli("submit", "--dry-run", "--", "preprocess", "s3://b/raw", "--output", "s3://b/clean", "--storage-options",
            json.dumps({"anon": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000",
                                                         "region_name": "us-east-1"}}))
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


@pytest.mark.parametrize("options, found", [
    ({"key": "k", "secret": "s", "token": "t", "anon": False}, ["key", "secret", "token"]),
    ({"token": "anon"}, []),  # gcsfs: a mechanism, not a credential
    ({"client_kwargs": {"endpoint_url": "http://h:9000", "aws_secret_access_key": "s", "aws_access_key_id": "a",
                        "aws_session_token": "t"}},
     ["client_kwargs.aws_secret_access_key", "client_kwargs.aws_access_key_id", "client_kwargs.aws_session_token"]),
    ({"username": "u", "password": "p", "account_key": "x", "sas_token": "y", "connection_string": "z",
      "client_secret": "c", "credentials": {"type": "service_account", "private_key": "pk"}},
     ["username", "password", "account_key", "sas_token", "connection_string", "client_secret",
      "credentials.private_key"]),
    ({"client_kwargs": {"headers": {"Authorization": "Bearer x"}}}, ["client_kwargs.headers.Authorization"]),
    ({"client_kwargs": {"endpoint_url": "https://user:pass@h"}}, ["client_kwargs.endpoint_url"]),
    ({"profile": "AKIAIOSFODNN7EXAMPLE"}, ["profile"]),  # a key id under any name
    ({"anon": True, "requester_pays": True, "default_block_size": 1 << 20}, []),
])
def test_one_detector_finds_credentials_at_any_depth(options, found):
    assert secret_paths(options) == found
    assert secret_paths(without_secrets(options)) == []
    assert not any(k in json.dumps(without_secrets(options)) for k in ("Bearer", "pass@", "AKIA", '"s"', '"pk"'))


def test_values_that_look_like_credentials_and_values_that_do_not():
    for value in ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                  "-----BEGIN RSA PRIVATE KEY-----\nMII", "https://b.s3.amazonaws.com/x?X-Amz-Signature=ab12",
                  "https://me:hunter2@example.com/x.tar", "ghp_" + "a1B2" * 9):
        assert looks_like_secret(value), value
    for value in ("/mnt/shared/runs/clip_vitB32_laion400m_epoch10", "s3://bucket/shard-{000000..000999}.tar",
                  "configs/large.json", "MyVeryLongRunDirectoryName2024Version3", "a" * 64,
                  "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "http://127.0.0.1:9000"):
        assert not looks_like_secret(value), value
    argv = ["train", "--storage-options", '{"secret": "s"}', "--aws-session-token=abc", "--data", "/d"]
    assert secret_arguments(argv) == ["--storage-options secret", "--aws-session-token"]
    assert redacted_argv(argv) == ["train", "--storage-options", '{"secret": "<redacted>"}',
                                   "--aws-session-token=<redacted>", "--data", "/d"]


def test_set_items_that_carry_credentials_are_found_redacted_and_refused(tmp_path):
    creds = fake_credentials()
    argv = ["train", "--set", f"storage_options.secret={creds['secret']}", "--set", "train.lr=3e-4",
            f"--set=client.aws_secret_access_key={creds['secret']}", "--set", "data.audio.seconds=5"]
    assert secret_arguments(argv) == ["--set storage_options.secret", "--set client.aws_secret_access_key"]
    assert redacted_argv(argv) == ["train", "--set", "storage_options.secret=<redacted>", "--set", "train.lr=3e-4",
                                   "--set=client.aws_secret_access_key=<redacted>", "--set", "data.audio.seconds=5"]
    # a job carrying one is refused before anything is stored, and train itself takes storage
    # options only through --storage-options (where they are hidden from process lists)
    r = cli("submit", "--dry-run", "--", "train", "--data", "/abs/d", "--run-dir", "/abs/r",
            "--set", f"storage_options.secret={creds['secret']}")
    assert r.returncode == 2 and "--set storage_options.secret" in r.stderr and creds["secret"] not in r.stderr
    r = cli("train", "--data", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--set", "storage_options.anon=true")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--storage-options" in lines[0], r.stderr


def test_the_run_config_keeps_credentials_out_of_what_it_shows_and_refuses_them_in_paths():
    from mmtrain.config import ConfigError, load_run_config

    creds = fake_credentials()
    cfg = load_run_config(None, data_paths=["s3://b/clean"], run_dir="/r",
                          storage_options={**creds, "client_kwargs": {"endpoint_url": "http://h:9000"}})
    public = cfg.to_public_dict()
    assert public["storage_options"] == {"client_kwargs": {"endpoint_url": "http://h:9000"}}
    assert not any(v in json.dumps(public) or v in cfg.to_json() for v in creds.values())
    assert cfg.storage_options["secret"] == creds["secret"]  # the workers still get them (by reference)
    for paths, storage in ((["https://me:hunter2@example.com/shard.tar"], ""),
                           (["https://b.s3.amazonaws.com/s.tar?X-Amz-Signature=0a1b&X-Amz-Credential=AKIA"], ""),
                           (["s3://b/clean"], "ftp://me:hunter2@example.com/run")):
        with pytest.raises(ConfigError, match="carries a credential") as e:
            load_run_config(None, data_paths=paths, run_dir="/r", checkpoint_storage=storage)
        assert "hunter2" not in str(e.value) and "0a1b" not in str(e.value)
