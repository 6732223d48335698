"""Shards a preprocess job works on while its embedded Ray starts.

Starting an embedded Ray takes ~4 s on a small machine (GCS, raylet, the first worker
processes) and keeps about one core busy; on a 2-core machine the other one idles
(benchmarks/README.md, "Preprocessing overhead"). A child process forked from the driver runs
the job's first shards through the same `process_shards` a Ray task runs (the same outputs,
committed the same way: the shard, its parts, its `done` part last) until Ray is up, then
finishes the shard it is on and exits; Ray's tasks take the rest.

Why a child process and not the driver itself: a shard that kills the process reading it (an
OOM kill, a decoder's segfault) must cost one attempt of that shard, never the job. The child's
death is one attempt; its shard goes to a Ray task with the attempts it has left (and is
quarantined as `shard_crashed` after the last, exactly as without the child). A shard the child
raised on goes to a Ray task as if untried: the task raises again where the job reports it
(a store failure in one line, a bug with its traceback).
Why it runs at the lowest priority (nice 19, in a scheduling group of its own: `_idle_priority`):
it is to use idle CPU only, never to slow Ray's start-up or Ray's tasks (at normal priority it
doubled `ray.init`'s time on 2 cores). A shard it
is still on when the job has nothing else left to hand out is taken back (`take_back`), run by a
Ray task: at nice 19 beside busy workers it would be the job's straggler.
Why fork: the child needs no imports of its own (the driver has the shard code loaded), so its
first shard starts at once; and nothing of Ray exists in the driver yet. The child dies with the
driver (PDEATHSIG), and the OOM killer picks it before the driver.

Claims go through one shared counter: the child takes the next shard under its lock, and
`stop()` closes it under the same lock, so which shards are the child's is exact.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import traceback

log = logging.getLogger(__name__)

_CLOSED = -1  # the counter's value once the driver has taken the rest


class StartupShards:
    """The child working through `shards` ((source, output name) each) from the front."""

    def __init__(self, shards: list[tuple[str, str]], job: tuple):
        ctx = multiprocessing.get_context("fork")
        self._shards = shards
        self._next = ctx.Value("i", 0)
        self._conn, child_end = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(shards, job, self._next, child_end, os.getpid()),
                                 name="preprocess-startup-shards", daemon=True)
        self._proc.start()
        child_end.close()
        self._claimed: int | None = None  # set by stop()
        self._reported: set[int] = set()
        self._open = True
        self._killed = False
        self.finished = 0  # shards it finished (the job's stats say so)

    def stop(self) -> int:
        """No further claims; returns how many shards (from the front) are the child's."""
        if self._claimed is None:
            with self._next.get_lock():
                self._claimed, self._next.value = self._next.value, _CLOSED
        return self._claimed

    def busy(self) -> bool:
        """The child may still report a shard."""
        return self._open

    def in_flight(self) -> int:
        return 1 if self._open and (self._claimed is None or len(self._reported) < self._claimed) else 0

    def wait(self, timeout: float) -> bool:
        return self._open and self._conn.poll(timeout)

    def collect(self) -> tuple[list[dict], list[tuple[int, int]]]:
        """What the child reported since the last call, without waiting: the stats of its
        finished shards, and (index, attempts spent) of each shard to hand to Ray. Only
        after `stop()`: until then the child may still claim shards."""
        assert self._claimed is not None, "stop() first"
        finished, returned = [], []
        while self._open and self._conn.poll():
            try:
                kind, i, payload = self._conn.recv()
            except Exception:  # EOF: it exited (or was killed half-way through a message)
                self._close()
                break
            self._reported.add(i)
            if kind == "done":
                finished.append(payload)
                self.finished += 1
            else:  # it raised: a Ray task runs it again and raises where the job reports it
                log.info("%s: the start-up shard worker failed on it; a Ray task runs it again: %s",
                         self._shards[i][0], payload)
                returned.append((i, 0))
        if not self._open:
            # exited: a claimed shard it never reported killed it (one attempt spent), unless
            # the driver took it back
            # (by its exit signal: it may have died on its own just before the driver's signal)
            died = self._proc.exitcode not in (0, None) and not (
                self._killed and self._proc.exitcode == -signal.SIGTERM)
            for i in range(self._claimed):
                if i not in self._reported:
                    self._reported.add(i)
                    if died:
                        log.warning("%s: the start-up shard worker died on it (exit %s); a Ray task runs it again",
                                    self._shards[i][0], self._proc.exitcode)
                    returned.append((i, 1 if died else 0))
        return finished, returned

    def _close(self) -> None:
        self._open = False
        self._proc.join()
        self._conn.close()

    def take_back(self) -> None:
        """End the child now; `collect` then returns its unfinished shard as untried."""
        self.stop()
        self._killed = True
        if self._proc.is_alive():
            self._proc.terminate()  # SIGTERM: the child has no handler for it (unlike a crash's signals)

    def close(self) -> None:
        """Stop and reap the child at once (after an error or an interrupt of the job)."""
        self.stop()
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        self._conn.close()
        self._open = False


def _child(shards, job, counter, conn, parent: int) -> None:
    _die_with(parent)
    from .shard_job import process_shards

    while True:
        with counter.get_lock():
            i = counter.value
            if i == _CLOSED or i >= len(shards):
                break
            counter.value = i + 1
        try:
            conn.send(("done", i, process_shards([shards[i]], *job)[0]))
        except Exception as e:
            first = next((line for line in str(e).splitlines() if line.strip()), "")
            conn.send(("error", i, f"{type(e).__name__}: {first}"[:300]))
            log.debug("start-up shard worker: %s", traceback.format_exc())
    conn.close()


def _idle_priority() -> None:
    """nice 19, in a scheduling group of its own. Linux's autogroups (on by default on many
    kernels) share the CPU between sessions first and order by nice only inside one: Ray's
    processes run in sessions of their own, so at nice 19 in the driver's session the child
    still took a whole group's share, one core of two while Ray's tasks shared the other (a
    128-shard job ran 23% longer). A new session is a new group, and its nice is the group's."""
    os.nice(19)
    if sys.platform.startswith("linux"):
        try:
            os.setsid()
            with open("/proc/self/autogroup", "w") as f:
                f.write("19")
        except OSError:
            pass  # no autogroups (a kernel without them; a service's or a pod's cgroup): nice alone orders


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this process when the driver dies, and its OOM killer takes it
    first. Elsewhere it ends when it reports a shard to a driver that is gone. Ctrl-C is the
    driver's to handle: it kills the child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # how `take_back` ends it: a handler would blur that
    _idle_priority()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
    if os.getppid() != parent:  # the driver died before prctl took effect
        os._exit(0)
