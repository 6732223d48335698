"""What a cluster job carries: its working dir (an allow-list of the project, packaged for Ray to
upload), its entrypoint, runtime_env and checks on its arguments (relative paths, credentials).
The commands that submit and follow jobs are in jobs.py."""
from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import tempfile
from contextlib import contextmanager

from mmtrain import credentials
from pipelines.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the job's working dir is an allow-list: these, copied from the project (with the project's
# .gitignore, which Ray honours). Anything else in a checkout (.git, .venv, data, run outputs,
# a local .env or credentials file) never leaves this machine, whatever its name.
UPLOAD = ("ray_job.py", "pyproject.toml", "pipelines", "mmtrain", "clusters", "configs")
# and inside them never (gitwildmatch, as Ray's `excludes`; --exclude adds more)
DEFAULT_EXCLUDES = ["__pycache__", "*.pyc", "*.egg-info", "*.safetensors", "*.ckpt"]
# the Jobs API takes a working_dir upload of at most 100 MiB (the dashboard's request limit;
# GCS would take 512 MiB)
PACKAGE_LIMIT = 100 * 1024 * 1024
# argparse destinations of ray_job.py subcommands that name paths: outputs (state written there
# must outlive the job) and inputs (fine if relative *and* shipped in the package)
OUTPUT_ARGS = {"out": "OUT", "output": "--output", "run_dir": "--run-dir", "workdir": "--workdir",
               "checkpoint_storage": "--checkpoint-storage"}
INPUT_ARGS = {"inputs": "INPUT", "data": "--data", "config": "--config"}
# how to give a job credentials instead of on its command line
CREDENTIALS_HINT = ("give secrets to the cluster's nodes instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                    "AWS_SESSION_TOKEN in their environment, an instance profile or workload identity, a "
                    "Kubernetes Secret; for clusters.local, export them before `python -m clusters.local start`) "
                    "and keep only non-secret options (endpoint_url, region_name) in --storage-options")


class JobCommandError(UserError):
    """A one-line, user-facing problem with a job command (exit code 2)."""


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
    found += [f"--env {what}" for what in credentials.secret_variables(list(env_vars))]
    if name and credentials.looks_like_secret(name):
        found.append("--name (looks like a credential)")
    if found:
        raise JobCommandError(f"{'; '.join(found)}: a job's command line, environment and name are stored with the "
                              f"job and shown by `list`, `status` and the dashboard; {CREDENTIALS_HINT}")


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
    """The job's runtime_env; `env_vars` have passed `refuse_secrets`."""
    variables = {"PYTHONUNBUFFERED": "1"}
    for item in env_vars:
        if "=" not in item:
            raise JobCommandError(f"--env {item}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            raise JobCommandError(f"--env {item}: {k!r} is not a valid variable name")
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
