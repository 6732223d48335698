"""The Ray Jobs API as the job commands use it: which dashboard to talk to, and a
JobSubmissionClient with the cluster's token attached (clusters/auth.py) whose every call turns
Ray's exceptions into one line saying what to do. A refusal (HTTP 401/403) says whether the token
was missing or wrong and where it was read from, never the token. What a job carries is in
job_package.py; the commands that print and follow are in jobs.py."""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager

from . import auth
from .job_package import JobCommandError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


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


def quiet_ray_loggers() -> None:
    # Ray's SDK logs every upload at INFO, and warns "no token" on its own when RAY_AUTH_MODE is
    # set here: the commands say what matters themselves, in one line. (Imported first: the SDK
    # sets its loggers' level when imported.)
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


def status_name(info) -> str:
    s = info.status
    return getattr(s, "value", str(s))


class Cluster:
    """A JobSubmissionClient with the token attached and errors turned into one line."""

    def __init__(self, address: str | None):
        self.url = dashboard_address(address)
        with self.translate():
            self.token, self.token_source = auth.client_token()
        quiet_ray_loggers()
        from ray.job_submission import JobSubmissionClient

        with _only_this_address(self.url), self.translate():
            self.client = JobSubmissionClient(self.url, headers=auth.auth_header(self.token))

    @contextmanager
    def translate(self, job_id: str | None = None):
        """Ray's exceptions -> JobCommandError with one line that
        says what to do."""
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

    # --- the Jobs API calls, each with the error translation --------------------------------
    def submit(self, entrypoint: str, runtime_env: dict, *, submission_id: str | None, metadata: dict,
               num_cpus: float = 0, num_gpus: float = 0) -> str:
        """Submits the job (Ray zips and uploads its working_dir here); returns its id."""
        kwargs = {}
        if num_cpus:
            kwargs["entrypoint_num_cpus"] = num_cpus
        if num_gpus:
            kwargs["entrypoint_num_gpus"] = num_gpus
        with self.translate():
            try:
                return self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                              submission_id=submission_id, metadata=metadata, **kwargs)
            except ValueError as e:  # e.g. the package is over Ray's limit after all
                raise JobCommandError(" ".join(str(e).split())[:400]) from None

    def info(self, job_id: str):
        with self.translate(job_id):
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        with self.translate(job_id):
            return self.client.get_job_logs(job_id)

    def tail(self, job_id: str):
        """The job's logs as they come (an async iterator over the Jobs API's websocket)."""
        return self.client.tail_job_logs(job_id)

    def stop(self, job_id: str) -> bool:
        with self.translate(job_id):
            return self.client.stop_job(job_id)

    def list(self):
        with self.translate():
            return self.client.list_jobs()
