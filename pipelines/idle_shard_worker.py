"""A child of the driver that runs a preprocess job's shards on CPU nothing else uses.

Starting an embedded Ray takes ~4 s on a small machine (GCS, raylet, the first worker
processes) and keeps about one core busy, and while Ray's tasks run they still leave some CPU
idle (on 2 cores, ~0.25 of one: each shard's writes, the driver's round trips, the bursts of
Ray's own processes; benchmarks/README.md, "Preprocessing overhead"). A child process forked
from the driver runs shards through the same `process_shards` a Ray task runs (the same
outputs, committed the same way: the shard, its parts, its `done` part last) from the moment
the job starts to the moment no shard is left; Ray's tasks take the others.

Why a child process and not the driver itself: a shard that kills the process reading it (an
OOM kill, a decoder's segfault) must cost one attempt of that shard, never the job. The child's
death is one attempt; its shard goes to a Ray task with the attempts it has left (and is
quarantined as `shard_crashed` after the last, exactly as without the child), and no new child
is started. A shard the child raised on goes to a Ray task as if untried: the task raises again
where the job reports it (a store failure in one line, a bug with its traceback).
Why the lowest priority (nice 19, in a scheduling group of its own: `_idle_priority`): it is to
use idle CPU only, never to slow Ray's start-up or Ray's tasks (at normal priority it doubled
`ray.init`'s time on 2 cores). Once Ray's tasks are done it has a core to itself, so its last
shard ends as fast as a Ray task would run it.
Why fork: the child needs no imports of its own (the driver has the shard code loaded), so its
first shard starts at once; and nothing of Ray exists in the driver yet. The child dies with the
driver (PDEATHSIG), and the OOM killer picks it before the driver.

Claims go through one queue shared by both (`ShardQueue`): the child takes one shard at a time,
the driver a task's worth, each under the queue's lock, which also records the child's claims,
so which shards are the child's is exact at any moment.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import traceback

log = logging.getLogger(__name__)


class ShardQueue:
    """Indices 0..n-1 handed out from the front, each once, to the driver or to the child."""

    def __init__(self, n: int, ctx=None):
        ctx = ctx or multiprocessing.get_context("fork")
        self.n = n
        self._next = ctx.Value("i", 0)  # its lock is the queue's
        self._child_may_claim = ctx.Value("b", 1, lock=False)
        # the shard the child holds (-1: none). The child works one shard at a time and reports
        # it before it claims the next, so this is the only claim of the child's that may
        # lack a report
        self._holds = ctx.Value("i", -1, lock=False)

    def claim(self, k: int, *, child: bool = False) -> range:
        with self._next.get_lock():
            first = self._next.value
            if child and not self._child_may_claim.value:
                return range(first, first)
            end = min(self.n, first + k)
            self._next.value = end
            if child and end > first:
                self._holds.value = first
        return range(first, end)

    def left(self) -> int:
        return self.n - self._next.value

    def stop_child(self) -> None:
        """No further claims by the child (a claim it made before this returned stands)."""
        with self._next.get_lock():
            self._child_may_claim.value = 0

    def held_by_child(self) -> int | None:
        i = self._holds.value
        return None if i < 0 else i

    def child_done(self) -> None:
        self._holds.value = -1


class IdleShardWorker:
    """The child working through `shards` ((source, output name) each) from `queue`'s front."""

    def __init__(self, shards: list[tuple[str, str]], job: tuple, queue: ShardQueue):
        ctx = multiprocessing.get_context("fork")
        self._shards, self.queue = shards, queue
        self._conn, child_end = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(shards, job, queue, child_end, os.getpid()),
                                 name="preprocess-idle-shard-worker", daemon=True)
        self._proc.start()
        child_end.close()
        self._reported: set[int] = set()
        self._open = True
        self._killed = False
        self.finished = 0  # shards it finished (the job's stats say so)

    def busy(self) -> bool:
        """The child may still report a shard."""
        return self._open

    def in_flight(self) -> int:
        """1 while it holds a shard it has not reported (as far as the reports read so far say)."""
        i = self.queue.held_by_child()
        return 1 if self._open and i is not None and i not in self._reported else 0

    def wait(self, timeout: float) -> bool:
        return self._open and self._conn.poll(timeout)

    def collect(self) -> tuple[list[dict], list[tuple[int, int]]]:
        """What the child reported since the last call, without waiting: the stats of its
        finished shards, and (index, attempts spent) of each shard to hand to Ray."""
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
                log.info("%s: the idle shard worker failed on it; a Ray task runs it again: %s",
                         self._shards[i][0], payload)
                returned.append((i, 0))
        if not self._open:
            # exited: a claimed shard it never reported killed it (one attempt spent), unless
            # the driver took it back
            # (by its exit signal: it may have died on its own just before the driver's signal)
            died = self._proc.exitcode not in (0, None) and not (
                self._killed and self._proc.exitcode == -signal.SIGTERM)
            i = self.queue.held_by_child()
            if i is not None and i not in self._reported:
                self._reported.add(i)
                if died:
                    log.warning("%s: the idle shard worker died on it (exit %s); a Ray task runs it again",
                                self._shards[i][0], self._proc.exitcode)
                returned.append((i, 1 if died else 0))
        return finished, returned

    def _close(self) -> None:
        self._open = False
        self._proc.join()
        self._conn.close()

    def take_back(self) -> None:
        """End the child now; `collect` then returns its unfinished shard as untried."""
        self.queue.stop_child()
        self._killed = True
        if self._proc.is_alive():
            self._proc.terminate()  # SIGTERM: the child has no handler for it (unlike a crash's signals)

    def close(self) -> None:
        """Stop and reap the child at once (after an error or an interrupt of the job)."""
        self.queue.stop_child()
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        self._conn.close()
        self._open = False


def _child(shards, job, queue: ShardQueue, conn, parent: int) -> None:
    _die_with(parent)
    from .shard_job import process_shards

    while True:
        claimed = queue.claim(1, child=True)
        if not claimed:
            break
        i = claimed[0]
        try:
            conn.send(("done", i, process_shards([shards[i]], *job)[0]))
        except Exception as e:
            first = next((line for line in str(e).splitlines() if line.strip()), "")
            conn.send(("error", i, f"{type(e).__name__}: {first}"[:300]))
            log.debug("idle shard worker: %s", traceback.format_exc())
        queue.child_done()
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
