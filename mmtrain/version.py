"""The project's version, for `ray_job.py --version`."""
from __future__ import annotations

import os

PYPROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")


def project_version() -> str:
    """The [project] version of this checkout's pyproject.toml (an installed raymm may be
    another checkout's), else the installed raymm's (Python 3.10 has no tomllib)."""
    from importlib import metadata

    try:
        import tomllib
        with open(PYPROJECT, "rb") as f:
            return tomllib.load(f)["project"]["version"]
    except (ImportError, OSError):
        return metadata.version("raymm")
