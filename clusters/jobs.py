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
import sys
import time
from contextlib import contextmanager

# what a job carries (re-exported: callers and tests use them as jobs.NAME)
from .job_package import (DEFAULT_EXCLUDES, ROOT, UPLOAD, JobCommandError, _mib, _submission_id,  # noqa: F401
                          build_runtime_env, check_package, entrypoint, path_problems, pip_packages,
                          project_package, refuse_secrets)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
NOT_ALLOWED_INSIDE = {"submit", "status", "logs", "stop", "list"}


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
