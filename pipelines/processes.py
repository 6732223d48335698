"""Whether a process of this machine runs: the one liveness check of the lock holders (preprocess's
output lock, train's run lock) and of `clusters.local`'s nodes.

A pid alone is not an identity: once a process ends, the kernel hands its pid to the next one.
So a holder records `process_start(pid)` beside its pid, and `process_runs(pid, started)` is true
only while a process with that pid *and that start* runs. A zombie (killed, not yet reaped by
its parent) counts as gone: it runs no code and holds nothing.
"""
from __future__ import annotations

import os


def process_start(pid: int) -> str | None:
    """When process `pid` started, as text to store and compare: None if it does not run (or is
    a zombie), "" if this system cannot tell (a live process is then never taken for dead)."""
    if not pid or pid < 0:
        return None
    if not os.path.isdir("/proc"):
        return _start_from_psutil(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    fields = stat.rsplit(b")", 1)[-1].split()  # after the command name, which may hold spaces
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()  # field 22 of proc(5): starttime, in clock ticks since boot


def _start_from_psutil(pid: int) -> str | None:
    # without /proc (macOS): psutil reads the same facts from the kernel
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return repr(proc.create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return ""


def process_runs(pid: int | None, started: str | None = None) -> bool:
    """Whether process `pid` runs and, when `started` (its `process_start` when recorded) is
    given, is still that process rather than a later one with the same pid."""
    now = process_start(pid or 0)
    if now is None:
        return False
    return now == "" or not started or now == str(started)
