"""A `ray_job.py train` command held at a chosen point of its first attempt, so that a kill
lands where a test or the resume benchmark means it to (MMTRAIN_FAULT_PAUSE, read by
mmtrain/loop.py). Used by tests/test_fault_tolerance.py and benchmarks/resume.py."""
from __future__ import annotations

import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSED = "fault injection: pausing"  # what the held attempt prints once it is held


def start_paused(cmd: list[str], run, pause: str, env: dict | None = None,
                 timeout: float = 600) -> subprocess.Popen:
    """Starts `cmd` in its own session (so the whole command can be killed as a group), its
    output in RUN.log, with the first attempt held at `pause` ("step@K:SECONDS" or
    "save@K:SECONDS"); returns once the hold is reached (the run's checkpoints before it are
    complete). `env`: the command's environment (default: this process's)."""
    log_path = f"{run}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env={**(os.environ if env is None else env), "MMTRAIN_FAULT_PAUSE": pause})
    deadline = time.time() + timeout
    while PAUSED not in open(log_path).read():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before the fault point:\n{open(log_path).read()[-4000:]}")
        if time.time() > deadline:
            raise RuntimeError("the run never reached the fault injection point")
        time.sleep(0.2)
    return proc
