"""Running a preprocess job's shard tasks on Ray: bounded in flight, retried, crashes contained.

The driver keeps at most two tasks per CPU in flight (a queued one starts the moment a CPU frees
up), runs tiny shards several to a task (`batch_size`), lets Ray rerun a task whose worker died
up to `shard_retries` times and then quarantines its shard whole as `shard_crashed`
(`record_crashed`); after a crash in a task of several shards it finds the shard the task died
on from the `done` parts (`_results`). While an embedded Ray starts, a child of the driver works
on the first shards (`startup_shards.py`).
"""
from __future__ import annotations

import logging
import tarfile
from collections import Counter
from dataclasses import dataclass

from . import reasons
from .dataset import MANIFEST_SCHEMA, PARTS_DIR, QUARANTINE_SCHEMA, part_names
from .retry import StoreError, store_error_kind, store_failure
from .shard_job import process_shards, rows_to_table
from .startup_shards import StartupShards
from .storage import OutputStore

log = logging.getLogger(__name__)

# a shard task whose worker process dies (OOM kill, a native crash) is run again this many
# times, then its shard is quarantined whole as `shard_crashed` and the job goes on
SHARD_RETRIES = 3


@dataclass(frozen=True)
class ShardTask:
    source: str
    name: str


# what `ray.get` raises for a task whose worker process died on every attempt
def _crash_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rx

    return (rx.WorkerCrashedError, rx.OutOfMemoryError, rx.NodeDiedError, rx.RaySystemError)


# Tiny shards are run several to a task: a Ray task costs ~2 ms of CPU and a driver round trip
# (benchmarks/README.md, "Preprocessing overhead"), as much as a one-sample shard's own work.
# A batch is as long as keeps TASKS_PER_SLOT tasks per slot in the queue, at most
# MAX_SHARDS_PER_TASK, so a job of a few (large) shards keeps one shard per task, and the last
# tasks of any job are single shards again, which keeps the tail balanced over the CPUs.
MAX_SHARDS_PER_TASK = 8
TASKS_PER_SLOT = 8


def batch_size(left: int, slots: int, fixed: int | None = None) -> int:
    """Shards for the next task, `left` shards still to submit, `slots` tasks in flight."""
    if fixed is not None:
        return max(1, min(fixed, left))
    return max(1, min(MAX_SHARDS_PER_TASK, left // (TASKS_PER_SLOT * slots)))


def run_pending(pending: list[ShardTask], store: OutputStore, job: tuple, workers: int | None, progress: bool,
                shard_retries: int, lock, shards_per_task: int | None = None, startup_shards: bool = True) -> int:
    """Run the shards not yet done; returns how many of them ran while Ray started.

    An embedded Ray's start-up leaves CPU idle: a child of the driver works on the first shards
    meanwhile (startup_shards.py). Joining a running cluster is quick: no child."""
    from .runtime import init_ray, starts_embedded_ray

    early = None
    if startup_shards and starts_embedded_ray():
        early = StartupShards([(t.source, t.name) for t in pending], job)
    try:
        init_ray(dashboard=False, ray_data=False)  # plain tasks: a lighter start
        _run_tasks(pending, store, job, workers, progress, shard_retries, lock, shards_per_task, early)
    finally:
        if early is not None:
            early.close()
    return early.finished if early is not None else 0


def _run_tasks(pending, store, job, workers, progress, shard_retries, lock, shards_per_task,
               early: StartupShards | None) -> None:
    # long because: one loop keeps the in-flight bound, the start-up child's last shard, crash
    # accounting and progress in one place, in the order they happen
    import ray

    from .runtime import cluster_cpus

    # A task whose worker died is run again (a shard task is idempotent: it writes its outputs
    # atomically, its `done` part last), at most `shard_retries` times: a shard that kills
    # every worker that reads it (an OOM kill, a decoder's segfault) would otherwise stall
    # the job for ever. A task of several shards is not retried by Ray: the driver finds the
    # shard it died on (`_results`). The tasks are spread over the nodes.
    one = ray.remote(num_cpus=1, max_retries=shard_retries, retry_exceptions=[ray.exceptions.RaySystemError],
                     scheduling_strategy="SPREAD")(process_shards)
    several = one.options(max_retries=0, retry_exceptions=False)
    # the shards the start-up child took are its own; Ray's tasks take the rest
    todo = list(reversed(pending[early.stop() if early else 0:]))  # pop() takes them in plan order
    running: dict = {}  # ObjectRef -> (its ShardTasks, attempts their first shard already had)
    bar = _progress_bar(len(pending), progress)
    totals: Counter = Counter()
    cpus = cluster_cpus()

    def submit(batch: list[ShardTask], attempts: int = 0) -> None:
        if attempts > shard_retries:  # the start-up child died on its only attempt (no retries)
            done(record_crashed(store, batch[0], RuntimeError("the start-up shard worker died on it"),
                                shard_retries))
            return
        fn = one if len(batch) == 1 and not attempts else (
            several if len(batch) > 1 else one.options(max_retries=shard_retries - attempts))
        running[fn.remote([(t.source, t.name) for t in batch], *job)] = (batch, attempts)

    def done(*results: dict) -> None:
        for stats in results:
            totals.update(stats["counts"])
        if bar is not None and results:
            bar.update(len(results))
            bar.set_postfix(samples=totals["read"], written=totals["written"],
                            rejected=totals["read"] - totals["written"], refresh=False)

    try:
        while todo or running or (early is not None and early.busy()):
            # by default one task per CPU plus one queued per CPU, so that a CPU that frees up
            # starts the next shard at once (no round trip through this loop) and an autoscaler
            # sees demand. `workers` caps the shards in progress: queuing is kept where Ray's
            # CPUs already enforce the cap, dropped where only this loop can
            limit = 2 * cpus if not workers else (2 * workers if workers >= cpus else workers)
            in_progress = len(running) + (early.in_flight() if early else 0)
            while todo and in_progress < limit:
                submit([todo.pop() for _ in range(batch_size(len(todo), limit, shards_per_task))])
                in_progress += 1
            if early is not None and early.busy():
                if not todo and early.in_flight():
                    early.take_back()  # the last work to hand out: a Ray task runs it at full speed
                # the child's last shard: look at it and at Ray's tasks in turn. Either wait
                # ends at its own event; the timeout only bounds how late a report of the child
                # is seen while Ray's tasks run (its shard may take the whole job at nice 19)
                if running:
                    ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                else:
                    early.wait(0.5)
                    ready = []
                finished, returned = early.collect()
                done(*finished)
                for i, attempts in returned:
                    submit([pending[i]], attempts)
            else:
                ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                batch, attempts = running.pop(ref)
                results, culprit, rest = _results(ref, batch, attempts, store, shard_retries)
                todo.extend(reversed(rest))
                if culprit is not None:
                    submit([culprit], attempts + 1)
                done(*results)
            lock.ensure_held()
    finally:
        for ref in running:  # only after an error or an interrupt
            ray.cancel(ref)
        if bar is not None:
            bar.close()


def _results(ref, batch: list[ShardTask], attempts: int, store: OutputStore,
             shard_retries: int) -> tuple[list[dict], ShardTask | None, list[ShardTask]]:
    """A finished task's stats per finished shard; after a crash of a task of several shards,
    also the shard it died on (to run again on its own, its first attempt spent) and those it
    never reached. A shard that died `shard_retries + 1` times is recorded as crashed; a store
    failure stops the job."""
    import ray

    try:
        return ray.get(ref), None, []
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        if store_error_kind(cause) is None:
            raise  # a bug: keeps its traceback
        # a refused credential, a store that stays down, reading the shard or writing its
        # output: one line, nothing marked done for it, so a re-run processes it
        # (no store call here to find the shard: the store is what is failing)
        if isinstance(cause, StoreError) and any(t.source in str(cause) for t in batch):
            raise StoreError(str(cause)) from None
        t = next((t for t in batch if t.source in str(cause)), batch[0])
        raise store_failure(cause, f"{t.source} -> {store.url}/{t.name}") from None
    except _crash_errors() as e:
        try:
            left = _unfinished(store, batch)
            finished = [store.read_json(part_names(t.name)["done"]) for t in batch[:len(batch) - len(left)]]
        except Exception as store_error:  # the store failing while we look: the job's one-line error
            if store_error_kind(store_error) is None:
                raise
            raise store_failure(store_error, f"{store.url}/{PARTS_DIR}") from None
        if not left:  # it died after its last shard was done
            return finished, None, []
        if len(batch) == 1 or attempts + 1 > shard_retries:
            # the shard it died on has had 1 + shard_retries attempts
            return [*finished, record_crashed(store, left[0], e, shard_retries)], None, left[1:]
        return finished, left[0], left[1:]


def _unfinished(store: OutputStore, batch: list[ShardTask]) -> list[ShardTask]:
    """The shards of a failed task from the one it failed on: it runs them in order, and a
    shard's `done` part is written last, so the first shard without one is where it stopped."""
    for i, t in enumerate(batch):
        if not store.exists(part_names(t.name)["done"]):
            return batch[i:]
    return []


def record_crashed(store: OutputStore, t: ShardTask, error: BaseException, shard_retries: int) -> dict:
    """Quarantine a whole shard whose task died on every attempt, as its parts: an empty
    output shard (so shard i of the output exists for every input shard i), one quarantine
    row (key "", the shard as source) and the `done` part that says so."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    detail = f"{type(error).__name__}: {first}"[:300] + f" (the task died {shard_retries + 1} times)"
    log.warning("%s: quarantined as %s: %s", t.source, reasons.SHARD_CRASHED, detail)
    parts = part_names(t.name)
    with store.open_atomic(t.name) as f:
        tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT).close()
    store.write_parquet(parts["manifest"], rows_to_table([], MANIFEST_SCHEMA))
    store.write_parquet(parts["quarantine"], rows_to_table([{
        "key": "", "source": t.source, "position": 0, "reason": reasons.SHARD_CRASHED,
        "kind": reasons.ERROR, "detail": detail, "members": []}], QUARANTINE_SCHEMA))
    stats = {"source": t.source, "shard": t.name, "counts": {"read": 1, f"{reasons.ERROR}:{reasons.SHARD_CRASHED}": 1},
             "bytes_in": 0, "bytes_out": 0, "seconds": 0.0, "crashed": detail}
    store.write_json(parts["done"], stats)
    return stats


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc="preprocess", dynamic_ncols=True)
