"""Test driver: `python tests/kill_at.py POINT OUTPUT -- ray_job.py ARGS...` runs the CLI in this
process and SIGKILLs this process at one chosen moment of the preprocessing job, as `kill -9`
would. It wraps library functions of the driver from outside (test code only: nothing in the
product knows about it), so the kill lands at the same point on every run instead of wherever a
timer happens to fall.

POINT:
  shard-started   as soon as a shard task has begun its output shard (a temporary file under
                  OUTPUT) and no shard is finished (no `_parts/*.done.json`)
  commit          when every shard is done, before the commit writes anything
  write:GLOB[#N]  half-way through the N-th (default 1st) all-or-nothing write of a file whose
                  name matches GLOB by the driver: the commit's `_manifest.parquet`,
                  `_quarantine.parquet`, `_stats.json`, or an output shard being rewritten
                  without its cross-shard duplicates. Half of the first chunk reaches the
                  temporary file, then the process dies.
  lance-commit:NAME[#N]
                  `embed`: as the N-th (default 1st) Lance commit of OUTPUT/NAME (e.g.
                  embeddings.lance) by Ray Data's Lance writer (mmtrain/inference/lance_sink.py) begins: its fragments are written,
                  the version that would reference them is not.

Before dying it prints `kill_at: killed ...` on stderr (a test checks that the kill happened
where it was aimed) and, once Ray is up, `kill_at: ray job JOB_ID`, so that a test can wait
for Ray to reap the dead driver's tasks. Exit status 3: the aimed-at moment was missed.
"""
from __future__ import annotations

import fnmatch
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def die(where: str) -> None:
    print(f"kill_at: killed {where}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def missed(why: str) -> None:
    print(f"kill_at: missed: {why}", file=sys.stderr, flush=True)
    os._exit(3)


def kill_when_a_shard_has_started(output: str) -> None:
    import pipelines.shard_tasks as shard_tasks

    original = shard_tasks._run_tasks  # runs once Ray is up

    def watch() -> None:
        while True:
            found = [os.path.join(d, n) for d, _, names in os.walk(output) for n in names]
            if any(p.endswith(".done.json") for p in found):
                missed("a shard finished before one was seen starting")
            started = [p for p in found if os.path.basename(p).startswith("shard-") and ".tmp-" in p]
            if started:
                die(f"with {len(started)} shard(s) started and none finished")
            time.sleep(0.005)

    def run_pending(*args, **kwargs):
        import ray

        print(f"kill_at: ray job {ray.get_runtime_context().get_job_id()}", file=sys.stderr, flush=True)
        threading.Thread(target=watch, daemon=True).start()
        return original(*args, **kwargs)

    shard_tasks._run_tasks = run_pending


def kill_before_the_commit() -> None:
    import pipelines.preprocess as preprocess

    def commit(*args, **kwargs):
        die("before the commit")

    preprocess.commit = commit


class _HalfWriteThenDie:
    def __init__(self, f, where: str):
        self.f, self.where = f, where

    def write(self, b) -> int:
        b = bytes(b)
        self.f.write(b[: max(1, len(b) // 2)])
        self.f.flush()
        if hasattr(self.f, "fileno"):
            os.fsync(self.f.fileno())
        die(self.where)
        return len(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


def kill_in_a_write(pattern: str, nth: int) -> None:
    from pipelines.storage import OutputStore

    original = OutputStore.open_atomic
    seen = [0]

    @contextmanager
    def open_atomic(self, name: str):
        with original(self, name) as f:
            if fnmatch.fnmatch(name, pattern):
                seen[0] += 1
                if seen[0] == nth:
                    yield _HalfWriteThenDie(f, f"half-way through writing {name} (write #{nth} of {pattern})")
                    return
            yield f

    OutputStore.open_atomic = open_atomic


def kill_at_a_lance_commit(output: str, name: str, nth: int) -> None:
    from mmtrain.inference.lance_sink import LanceAppendSink

    original = LanceAppendSink.on_write_complete
    target, seen = os.path.realpath(os.path.join(output, name)), [0]

    def on_write_complete(self, write_results):
        if os.path.realpath(self.uri) == target:
            seen[0] += 1
            if seen[0] == nth:
                die(f"at Lance commit #{nth} of {name}")
        return original(self, write_results)

    LanceAppendSink.on_write_complete = on_write_complete


def main(argv: list[str]) -> int:
    point, output, sep, *args = argv
    assert sep == "--", "usage: kill_at.py POINT OUTPUT -- ARGS..."
    if point == "shard-started":
        kill_when_a_shard_has_started(output)
    elif point == "commit":
        kill_before_the_commit()
    elif point.startswith("lance-commit:"):
        name, _, nth = point[len("lance-commit:"):].partition("#")
        kill_at_a_lance_commit(output, name, int(nth or 1))
    elif point.startswith("write:"):
        pattern, _, nth = point[len("write:"):].partition("#")
        kill_in_a_write(pattern, int(nth or 1))
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    import ray_job

    code = ray_job.main(args)
    missed(f"the command ended (exit {code}) before the kill point")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
