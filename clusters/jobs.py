"""Cluster jobs: `ray_job.py submit|status|logs|stop|list`, over the Ray Jobs API.

A job is this project's own command line run on the cluster: the entrypoint is
`python ray_job.py SUBCOMMAND ARGS...`, its working directory is an allow-list of this project's
code and configs (UPLOAD) packaged and uploaded by Ray, and it runs in the cluster's Python
environment (installing packages is opt-in: `--pip`). Credentials never go on a job's command
line, environment or metadata (`refuse_secrets`): they belong to the cluster's nodes.

Security. Ray 2.60 clusters here run with token authentication (RAY_AUTH_MODE=token). The token
is read from RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token
(Ray's own order) and sent as `Authorization: Bearer ...` on every request, whatever this
process's RAY_AUTH_MODE says (Ray's client only adds it when RAY_AUTH_MODE=token is set here too).
A refusal (HTTP 401/403) is one line saying whether the token was missing or wrong and where it
was read from. The token is never printed, logged, or put in the job's runtime_env/metadata.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager

from mmtrain import credentials

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# the job's working dir is an allow-list: these, copied from the project (with the project's
# .gitignore, which Ray honours). Anything else in a checkout (.git, .venv, data, run outputs,
# a local .env or credentials file) never leaves this machine, whatever its name.
UPLOAD = ("ray_job.py", "pyproject.toml", "pipelines", "mmtrain", "clusters", "configs")
# and inside them never (gitwildmatch, as Ray's `excludes`; --exclude adds more)
DEFAULT_EXCLUDES = ["__pycache__", "*.pyc", "*.egg-info", "*.safetensors", "*.ckpt"]
# the Jobs API takes a working_dir upload of at most 100 MiB (the dashboard's request limit;
# GCS would take 512 MiB)
PACKAGE_LIMIT = 100 * 1024 * 1024
NOT_ALLOWED_INSIDE = {"submit", "status", "logs", "stop", "list"}
# argparse destinations of ray_job.py subcommands that name paths: outputs (state written there
# must outlive the job) and inputs (fine if relative *and* shipped in the package)
OUTPUT_ARGS = {"out": "OUT", "output": "--output", "run_dir": "--run-dir", "workdir": "--workdir",
               "checkpoint_storage": "--checkpoint-storage"}
INPUT_ARGS = {"inputs": "INPUT", "data": "--data", "config": "--config"}
# how to give a job credentials instead of on its command line
CREDENTIALS_HINT = ("give the cluster's nodes the credentials instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                    "AWS_SESSION_TOKEN in their environment, an instance profile or workload identity; for "
                    "clusters.local, export them before `python -m clusters.local start`) and keep only "
                    "non-secret options (endpoint_url, region_name) in --storage-options")


class JobCommandError(Exception):
    """A one-line, user-facing problem (exit code 2)."""


# --- address and token ------------------------------------------------------------------

def dashboard_address(address: str | None) -> str:
    """The Jobs API (dashboard) URL: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS
    when it is an http(s):// URL."""
    source = "--address"
    if not address:
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if os.environ.get(var):
                address, source = os.environ[var], var
                break
    if not address:
        raise JobCommandError("no cluster given: pass --address http://HEAD:8265 (the Ray dashboard; tunnel a "
                              "remote one with `ray dashboard CLUSTER.yaml` or `ssh -L 8265:127.0.0.1:8265 HEAD`) "
                              "or set RAY_API_SERVER_ADDRESS")
    address = address.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+$", address):
        what = f"{source}={address}" if source != "--address" else f"--address {address}"
        hint = (" looks like a GCS address (HOST:6379, what `ray_job.py preprocess/train --address` use to run "
                "on a cluster from here)") if re.match(r"^[\w.\-]+:\d+$", address) else " is not an http(s) URL"
        raise JobCommandError(f"{what}{hint}; the job commands talk to the Ray dashboard: pass "
                              "--address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS=http://HEAD:8265")
    return address


def read_token() -> tuple[str | None, str]:
    """(token or None, where it was looked for / read from) — Ray's own order."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "nowhere (RAY_AUTH_MODE=disabled here)"
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            with open(os.path.expanduser(path)) as f:
                token = f.read().strip()
        except OSError as e:
            raise JobCommandError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({e.strerror}); point it at the "
                                  "file holding the cluster's token")
        if not token:
            raise JobCommandError(f"RAY_AUTH_TOKEN_PATH={path} is empty; it must hold the cluster's token")
        return token, f"RAY_AUTH_TOKEN_PATH ({path})"
    home = os.path.expanduser("~/.ray/auth_token")
    try:
        with open(home) as f:
            token = f.read().strip()
    except OSError:
        token = ""
    if token:
        return token, f"~/.ray/auth_token ({home})"
    return None, "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token"


def _quiet_ray_loggers() -> None:
    # Ray's SDK logs every upload at INFO, and warns "no token" on its own when RAY_AUTH_MODE is
    # set here: we say what matters ourselves, in one line. (Import first: the SDK sets its
    # loggers' level when imported.)
    import ray.job_submission  # noqa: F401

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                 "ray._private.authentication.http_token_authentication"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def _only_this_address(url: str):
    """JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its address
    argument; make it use exactly `url`."""
    saved = {k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Cluster:
    """A JobSubmissionClient with the token attached and errors turned into one line."""

    def __init__(self, address: str | None):
        self.url = dashboard_address(address)
        self.token, self.token_source = read_token()
        _quiet_ray_loggers()
        from ray.job_submission import JobSubmissionClient

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        with _only_this_address(self.url), self.translate():
            self.client = JobSubmissionClient(self.url, headers=headers)

    @contextmanager
    def translate(self, job_id: str | None = None):
        """Ray's exceptions -> JobCommandError with one line that says what to do."""
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as e:
            raise JobCommandError(self._auth_message(str(e))) from None
        except ConnectionError:
            raise JobCommandError(f"cannot reach the Ray dashboard at {self.url}: is the cluster up? (a remote "
                                  "dashboard listens on 127.0.0.1 only: tunnel it with `ray dashboard CLUSTER.yaml` "
                                  "or `ssh -L 8265:127.0.0.1:8265 HEAD`)") from None
        except RuntimeError as e:
            text = " ".join(str(e).split())
            if job_id and ("404" in text or "does not exist" in text):
                raise JobCommandError(f"no job {job_id} on {self.url} (`ray_job.py list` shows the jobs)") from None
            raise JobCommandError(f"the cluster at {self.url} said: {text[:300]}") from None

    def _auth_message(self, detail: str) -> str:
        missing = self.token is None or detail.startswith("Authentication required")
        if missing:
            return (f"the cluster at {self.url} requires a token and none was found (looked in {self.token_source}): "
                    "set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to the token file, or put the token in "
                    "~/.ray/auth_token — the token the cluster was started with")
        return (f"the cluster at {self.url} refused the token read from {self.token_source}: it is not the "
                "token the cluster was started with (set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / "
                "~/.ray/auth_token to that one)")

    # thin wrappers, each with the error translation
    def info(self, job_id: str):
        with self.translate(job_id):
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        with self.translate(job_id):
            return self.client.get_job_logs(job_id)

    def stop(self, job_id: str) -> bool:
        with self.translate(job_id):
            return self.client.stop_job(job_id)

    def list(self):
        with self.translate():
            return self.client.list_jobs()


# --- what a job carries -----------------------------------------------------------------

def _gitignore_aware_size(root: str, excludes: list[str]) -> tuple[int, dict[str, int]]:
    """Bytes Ray would package from `root` (Ray's own walk: excludes + .gitignore/.rayignore),
    and per top-level entry."""
    from pathlib import Path

    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    total = 0
    per_top: dict[str, int] = {}
    base = Path(root).absolute()

    def handler(path: Path) -> None:
        nonlocal total
        if path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            total += size
            top = path.relative_to(base).parts[0]
            per_top[top] = per_top.get(top, 0) + size

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    _dir_travel(base, [_get_excludes(base, excludes)], handler, include_gitignore=include_gitignore)
    return total, per_top


def package_size(root: str, excludes: list[str]) -> tuple[int, dict[str, int]]:
    try:
        return _gitignore_aware_size(root, excludes)
    except ImportError:  # Ray's internals moved: a plain walk without .gitignore
        total, per_top = 0, {}
        skip = {e.strip("/") for e in excludes if "*" not in e}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in skip]
            for n in filenames:
                p = os.path.join(dirpath, n)
                if os.path.isfile(p):
                    s = os.path.getsize(p)
                    total += s
                    top = os.path.relpath(p, root).split(os.sep)[0]
                    per_top[top] = per_top.get(top, 0) + s
        return total, per_top


def _mib(n: float) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def _not_uploaded(folder: str, names: list[str]) -> set[str]:
    # hidden files (.env, editor and tool state) and links (they may point anywhere, ~/.aws
    # included) inside the allowed folders
    return {n for n in names if n.startswith(".") or n == "__pycache__" or n.endswith(".pyc")
            or os.path.islink(os.path.join(folder, n))}


@contextmanager
def project_package(root: str = ROOT):
    """A temporary folder holding the allow-listed part of the project (UPLOAD): the job's
    working_dir, which Ray zips and uploads. A copy rather than `excludes` alone: a deny-list
    misses whatever a checkout grows next (a .env, a credentials file, a new data folder)."""
    staging = tempfile.mkdtemp(prefix="raymm-job-")
    try:
        for name in (*UPLOAD, ".gitignore"):
            src = os.path.join(root, name)
            if os.path.islink(src) or not os.path.exists(src):
                continue
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(staging, name), ignore=_not_uploaded)
            else:
                shutil.copy2(src, os.path.join(staging, name))
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_package(root: str, excludes: list[str]) -> int:
    total, per_top = package_size(root, excludes)
    if total > PACKAGE_LIMIT:
        big = ", ".join(f"{k} ({_mib(v)})" for k, v in sorted(per_top.items(), key=lambda kv: -kv[1])[:3])
        raise JobCommandError(f"the job's working dir would upload {_mib(total)} from {root} (the Jobs API takes "
                              f"at most {_mib(PACKAGE_LIMIT)}); largest: {big}. Keep data outside the project "
                              "folder or leave it out with --exclude PATTERN")
    return total


def path_problems(ns, root: str = ROOT) -> list[str]:
    """Arguments of a parsed ray_job.py command that name a relative local path: on the cluster
    the job runs in a temporary copy of the project on whichever node runs the driver, so such
    a path is either missing there or (for outputs) written into a folder nobody will see again.
    A relative *input* that is part of the uploaded package (e.g. configs/base.json) is fine."""
    problems = []

    def values(dest):
        v = getattr(ns, dest, None)
        return [] if v is None else [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])]

    def in_package(p: str) -> bool:
        full = os.path.normpath(os.path.join(root, p))
        if not full.startswith(root + os.sep) or not os.path.exists(full):
            return False
        parts = os.path.relpath(full, root).split(os.sep)
        return parts[0] in UPLOAD and not any(part.startswith(".") for part in parts)

    for dest, flag in {**OUTPUT_ARGS, **INPUT_ARGS}.items():
        for v in values(dest):
            if "://" in v or os.path.isabs(v) or v.startswith("~"):
                continue
            if dest in INPUT_ARGS and in_package(v):
                continue
            problems.append(f"{flag} {v}")
    return problems


def refuse_secrets(argv: list[str], env_vars: list[str] = (), name: str | None = None) -> None:
    """A job's entrypoint, runtime_env and metadata are stored with it and shown by `list`,
    `status` and the dashboard to every token holder: credentials never go there. One line
    naming where they are (never their values), and how to pass them instead."""
    found = credentials.secret_arguments(list(argv))
    for item in env_vars:
        k, _, v = item.partition("=")
        if credentials.looks_like_secret(v):
            found.append(f"--env {k} (its value looks like a credential)")
    if name and credentials.looks_like_secret(name):
        found.append("--name (looks like a credential)")
    if found:
        raise JobCommandError(f"{'; '.join(found)}: a job's command line is stored with the job and shown by `list`, "
                              f"`status` and the dashboard; {CREDENTIALS_HINT}")


def pip_packages(specs: list[str], project: bool, root: str = ROOT) -> list[str]:
    """--pip values (a requirement, or a requirements .txt file) plus, with --pip-project, the
    project's own dependencies from pyproject.toml except Ray (which must match the cluster's)."""
    pkgs: list[str] = []
    for spec in specs:
        if spec.endswith(".txt") and os.path.isfile(spec):
            with open(spec) as f:
                pkgs += [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
        else:
            pkgs.append(spec)
    if project:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise JobCommandError("--pip-project needs Python 3.11+ (tomllib); list the packages with --pip")
        with open(os.path.join(root, "pyproject.toml"), "rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
        pkgs += [d for d in deps if not re.match(r"^ray(\[|[<>=!~ ]|$)", d)]
    return pkgs


def build_runtime_env(*, env_vars: list[str], pip: list[str], excludes: list[str], root: str = ROOT) -> dict:
    variables = {"PYTHONUNBUFFERED": "1"}
    for item in env_vars:
        if "=" not in item:
            raise JobCommandError(f"--env {item}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            raise JobCommandError(f"--env {item}: {k!r} is not a valid variable name")
        if k.startswith("RAY_AUTH") or credentials.is_secret_name(k):
            raise JobCommandError(f"--env {k}=...: a job's environment is stored with the job and shown in the "
                                  "dashboard; give secrets to the cluster's nodes instead (their environment, "
                                  "an instance role, a Kubernetes Secret)")
        variables[k] = v
    renv: dict = {"working_dir": root, "excludes": list(excludes), "env_vars": variables}
    if pip:
        # a virtualenv per distinct list, built on every node by Ray (needs the nodes to reach the index)
        renv["pip"] = {"packages": pip, "pip_check": False}
    return renv


def entrypoint(argv: list[str], python: str = "python") -> str:
    return shlex.join([python, "ray_job.py", *argv])


def _submission_id(name: str | None) -> str | None:
    if not name:
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:48] or "job"
    return f"{slug}-{secrets.token_hex(4)}"


# --- following a job --------------------------------------------------------------------

def _write(out, text: str) -> None:
    out.write(text)
    out.flush()


def follow(cluster: Cluster, job_id: str, out=None, poll: float = 1.0) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    out = out or sys.stdout
    printed = 0

    async def tail():
        nonlocal printed
        async for chunk in cluster.client.tail_job_logs(job_id):
            _write(out, chunk)
            printed += len(chunk)

    try:
        asyncio.run(tail())
    except Exception:  # no websocket, or it broke: poll the logs instead, from where we were
        pass
    while True:
        info = cluster.info(job_id)
        text = cluster.logs(job_id)
        if len(text) > printed:
            _write(out, text[printed:])
            printed = len(text)
        if _status_name(info) in TERMINAL:
            return _status_name(info)
        time.sleep(poll)


def _status_name(info) -> str:
    s = info.status
    return getattr(s, "value", str(s))


def outcome(cluster: Cluster, job_id: str, err=None) -> int:
    """One line on stderr, exit code: 0 only when the job SUCCEEDED."""
    err = err or sys.stderr
    info = cluster.info(job_id)
    status = _status_name(info)
    took = ""
    if info.start_time and info.end_time:
        took = f" in {(info.end_time - info.start_time) / 1000:.0f} s"
    if status == "SUCCEEDED":
        print(f"job {job_id} succeeded{took}", file=err)
        return 0
    if status == "STOPPED":
        print(f"error: job {job_id} was stopped{took}", file=err)
        return 1
    reason = (info.message or "").strip().splitlines()[0] if info.message else "no reason given"
    reason = re.split(r",? last available logs", reason)[0].rstrip(":")
    last = ""
    try:
        lines = [ln.strip() for ln in cluster.logs(job_id).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
        pick = (errors or lines)[-1:] if lines else []
        last = f"; last: {pick[0][:240]}" if pick else ""
    except JobCommandError:
        pass
    print(f"error: job {job_id} {status.lower()}{took}: {reason[:240]}{last}", file=err)
    return 1


def wait_terminal(cluster: Cluster, job_id: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while True:
        status = _status_name(cluster.info(job_id))
        if status in TERMINAL or time.time() > deadline:
            return status
        time.sleep(0.5)


# --- the commands -----------------------------------------------------------------------

def submit(argv: list[str], *, address: str | None, parsed=None, wait: bool = False, name: str | None = None,
           env_vars: list[str] = (), pip: list[str] = (), pip_project: bool = False, exclude: list[str] = (),
           entrypoint_num_cpus: float = 0, entrypoint_num_gpus: float = 0, strict: bool = False,
           dry_run: bool = False, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    _quiet_ray_loggers()
    if not argv:
        raise JobCommandError("nothing to run: put the command after --, e.g. submit --address URL -- train --data ...")
    if argv[0] in NOT_ALLOWED_INSIDE:
        raise JobCommandError(f"`{argv[0]}` talks to a cluster from your machine; submit a step instead "
                              "(make-corpus, preprocess, train, evaluate, export, plot, demo)")
    refuse_secrets(argv, list(env_vars), name)
    if entrypoint_num_cpus < 0 or entrypoint_num_gpus < 0:
        raise JobCommandError("--entrypoint-num-cpus and --entrypoint-num-gpus must not be negative")
    excludes = DEFAULT_EXCLUDES + list(exclude)
    if parsed is not None and getattr(parsed, "address", None):
        raise JobCommandError(f"drop --address {parsed.address} after --: on the cluster the step joins the "
                              "cluster it runs on (Ray sets RAY_ADDRESS for the job)")
    if parsed is not None:
        problems = path_problems(parsed, ROOT)
        if problems:
            line = (f"{', '.join(problems)}: relative path(s) resolve inside the job's temporary copy of the project "
                    "on the node that runs the driver, not on storage the cluster shares; use absolute paths every "
                    "node mounts (e.g. /mnt/shared/...) or URLs (s3://, gs://)")
            if strict:
                raise JobCommandError(line)
            print(f"warning: {line} (--strict refuses)", file=err)
    cmd = entrypoint(argv)
    submission_id = _submission_id(name)
    pip_list = pip_packages(list(pip), pip_project)
    with project_package(ROOT) as package:
        size = check_package(package, excludes)
        renv = build_runtime_env(env_vars=list(env_vars), pip=pip_list, excludes=excludes, root=package)
        if dry_run:
            print(json.dumps({"entrypoint": cmd, "runtime_env": {**renv, "working_dir": ROOT},
                              "uploaded": sorted(os.listdir(package)), "package_bytes": size,
                              "submission_id": submission_id, "entrypoint_num_cpus": entrypoint_num_cpus,
                              "entrypoint_num_gpus": entrypoint_num_gpus}, indent=1), file=out)
            return 0
        cluster = Cluster(address)
        metadata = {"submitted_by": "ray_job.py", "command": argv[0]}
        if name:
            metadata["name"] = name
        kwargs = {}
        if entrypoint_num_cpus:
            kwargs["entrypoint_num_cpus"] = entrypoint_num_cpus
        if entrypoint_num_gpus:
            kwargs["entrypoint_num_gpus"] = entrypoint_num_gpus
        with cluster.translate():
            try:  # Ray zips and uploads the package here
                job_id = cluster.client.submit_job(entrypoint=cmd, runtime_env=renv, submission_id=submission_id,
                                                   metadata=metadata, **kwargs)
            except ValueError as e:  # e.g. the package is over Ray's limit after all
                raise JobCommandError(" ".join(str(e).split())[:400]) from None
    if not wait:
        print(job_id, file=out)
        print(f"submitted job {job_id} to {cluster.url} ({_mib(size)} working dir); follow it: "
              f"python ray_job.py logs {job_id} --follow --address {cluster.url}", file=err)
        return 0
    print(f"submitted job {job_id} to {cluster.url}; following its logs (Ctrl-C stops following, not the job)",
          file=err)
    try:
        follow(cluster, job_id, out)
    except KeyboardInterrupt:
        print(f"stopped following job {job_id}; it keeps running (stop it: python ray_job.py stop {job_id} "
              f"--address {cluster.url})", file=err)
        return 130
    return outcome(cluster, job_id, err)


def status(job_id: str, *, address: str | None, as_json: bool = False, out=None) -> int:
    out = out or sys.stdout
    cluster = Cluster(address)
    info = cluster.info(job_id)
    st = _status_name(info)
    if as_json:
        print(json.dumps({"job_id": job_id, "status": st, "message": info.message, "entrypoint": info.entrypoint,
                          "start_time": info.start_time, "end_time": info.end_time,
                          "metadata": info.metadata}, indent=1), file=out)
        return 0
    msg = " ".join((info.message or "").split())[:200]
    print(f"{job_id}: {st}" + (f" ({msg})" if msg else ""), file=out)
    return 0


def logs(job_id: str, *, address: str | None, follow_logs: bool = False, out=None, err=None) -> int:
    out = out or sys.stdout
    cluster = Cluster(address)
    if follow_logs:
        try:
            follow(cluster, job_id, out)
        except KeyboardInterrupt:
            return 130
        return outcome(cluster, job_id, err)
    _write(out, cluster.logs(job_id))
    return 0


def stop(job_id: str, *, address: str | None, timeout: float = 60, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    cluster = Cluster(address)
    before = _status_name(cluster.info(job_id))
    if before in TERMINAL:
        print(f"{job_id}: {before} (had already ended)", file=out)
        return 0
    cluster.stop(job_id)
    final = wait_terminal(cluster, job_id, timeout)
    if final not in TERMINAL:
        print(f"error: job {job_id} is still {final} {timeout:.0f} s after the stop request", file=err)
        return 1
    print(f"{job_id}: {final}", file=out)
    return 0


def list_jobs(*, address: str | None, as_json: bool = False, out=None) -> int:
    out = out or sys.stdout
    cluster = Cluster(address)
    jobs = sorted(cluster.list(), key=lambda j: j.start_time or 0)
    rows = []
    for j in jobs:
        rows.append({"job_id": j.submission_id or j.job_id or "-", "status": _status_name(j),
                     "start_time": j.start_time, "end_time": j.end_time, "entrypoint": j.entrypoint})
    if as_json:
        print(json.dumps(rows, indent=1), file=out)
        return 0
    if not rows:
        print(f"no jobs on {cluster.url}", file=out)
        return 0
    width = max(len(r["job_id"]) for r in rows)
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["start_time"] / 1000)) if r["start_time"] else "-"
        ep = r["entrypoint"] or ""
        print(f"{r['job_id']:<{width}}  {r['status']:<9}  {started}  {ep[:100]}", file=out)
    return 0
