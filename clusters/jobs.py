"""Cluster jobs: `ray_job.py submit|status|logs|stop|list`, over the Ray Jobs API.

A job is this project's own command line run on the cluster: the entrypoint is
`python ray_job.py SUBCOMMAND ARGS...`, its working directory is an allow-list of this project's
code and configs (UPLOAD) packaged and uploaded by Ray, and it runs in the cluster's Python
environment (installing packages is opt-in: `--pip`). Credentials never go on a job's command
line, environment or metadata (`refuse_secrets`): they belong to the cluster's nodes.

What a job carries is job_package.py; the calls to the Jobs API, with the cluster's token
(auth.py) and one-line errors, are job_client.py; here are the commands: their checks, what
they print, and following a job to its end.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time

from .job_client import TERMINAL, Cluster, quiet_ray_loggers, status_name
# JobCommandError and refuse_secrets are ray_job.py's too, as jobs.NAME
from .job_package import (DEFAULT_EXCLUDES, ROOT, JobCommandError, _mib, _submission_id, build_runtime_env,
                          check_package, entrypoint, path_problems, pip_packages, project_package,
                          refuse_secrets)

NOT_ALLOWED_INSIDE = {"submit", "status", "logs", "stop", "list"}


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
        async for chunk in cluster.tail(job_id):
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
        if status_name(info) in TERMINAL:
            return status_name(info)
        time.sleep(poll)


def outcome(cluster: Cluster, job_id: str, err=None) -> int:
    """One line on stderr, exit code: 0 only when the job SUCCEEDED."""
    err = err or sys.stderr
    info = cluster.info(job_id)
    status = status_name(info)
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
        status = status_name(cluster.info(job_id))
        if status in TERMINAL or time.time() > deadline:
            return status
        time.sleep(0.5)


# --- the commands -----------------------------------------------------------------------

def submit(argv: list[str], *, address: str | None, parsed=None, wait: bool = False, name: str | None = None,
           env_vars: list[str] = (), pip: list[str] = (), pip_project: bool = False, exclude: list[str] = (),
           entrypoint_num_cpus: float = 0, entrypoint_num_gpus: float = 0, strict: bool = False,
           dry_run: bool = False, out=None, err=None) -> int:
    """Submits `python ray_job.py ARGV` (with `dry_run`, prints what would be submitted instead);
    with `wait`, follows it to its end. `parsed`: ARGV as ray_job.py's parser read it."""
    out, err = out or sys.stdout, err or sys.stderr
    quiet_ray_loggers()
    _check_command(argv, parsed, env_vars=list(env_vars), name=name, strict=strict,
                   resources=(entrypoint_num_cpus, entrypoint_num_gpus), err=err)
    excludes = DEFAULT_EXCLUDES + list(exclude)
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
        metadata = {"submitted_by": "ray_job.py", "command": argv[0], **({"name": name} if name else {})}
        job_id = cluster.submit(cmd, renv, submission_id=submission_id, metadata=metadata,
                                num_cpus=entrypoint_num_cpus, num_gpus=entrypoint_num_gpus)
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


def _check_command(argv: list[str], parsed, *, env_vars: list[str], name: str | None, strict: bool,
                   resources: tuple[float, float], err) -> None:
    """Refuses in one line what cannot run on the cluster or must not be stored with a job; warns
    about relative paths (refuses them with `strict`)."""
    if not argv:
        raise JobCommandError("nothing to run: put the command after --, e.g. submit --address URL -- train --data ...")
    if argv[0] in NOT_ALLOWED_INSIDE:
        raise JobCommandError(f"`{argv[0]}` talks to a cluster from your machine; submit a step instead "
                              "(make-corpus, preprocess, train, evaluate, export, plot, demo)")
    refuse_secrets(argv, env_vars, name)
    if min(resources) < 0:
        raise JobCommandError("--entrypoint-num-cpus and --entrypoint-num-gpus must not be negative")
    if parsed is None:
        return
    if getattr(parsed, "address", None):
        raise JobCommandError(f"drop --address {parsed.address} after --: on the cluster the step joins the "
                              "cluster it runs on (Ray sets RAY_ADDRESS for the job)")
    problems = path_problems(parsed, ROOT)
    if problems:
        line = (f"{', '.join(problems)}: relative path(s) resolve inside the job's temporary copy of the project "
                "on the node that runs the driver, not on storage the cluster shares; use absolute paths every "
                "node mounts (e.g. /mnt/shared/...) or URLs (s3://, gs://)")
        if strict:
            raise JobCommandError(line)
        print(f"warning: {line} (--strict refuses)", file=err)


def status(job_id: str, *, address: str | None, as_json: bool = False, out=None) -> int:
    out = out or sys.stdout
    cluster = Cluster(address)
    info = cluster.info(job_id)
    st = status_name(info)
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
    before = status_name(cluster.info(job_id))
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
        rows.append({"job_id": j.submission_id or j.job_id or "-", "status": status_name(j),
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
