"""The preprocessing job: raw WebDataset shards in, clean shards + manifest + quarantine out.

Shape of a run:
  1. list the input shards; output shard i is `shard-{i:06d}.tar` for the i-th input shard
     in sorted order, recorded with the settings in `_job.json` (a re-run with other inputs
     or settings into the same output is refused, not mixed in);
  2. every input shard whose `_parts/*.done.json` is missing is processed by one Ray task
     (`shard_job.process_shard`: stream in, decode, transform, filter, write one shard);
     Ray schedules them and reruns the task of a dead worker up to `shard_retries` times
     (then the shard is quarantined whole as `shard_crashed`), the driver bounds how many
     are in flight, tiny shards go several to a task, and while an embedded Ray starts a
     child of the driver works on the first shards (`shard_tasks.py`, `startup_shards.py`);
  3. the commit: drop cross-shard duplicates (the first by (shard, position) wins), write
     `_manifest.parquet`, `_quarantine.parquet`, and last `_stats.json`, which marks the
     output complete.

The output has one owner (`ownership.py`): it may not overlap an input or hold foreign
files, and the driver of a running job holds its lock.

Why a map over shards rather than `read_datasource(...).map_batches(...).write_*()`: a
shard-to-shard job commits a whole output shard atomically and resumes at shard
granularity without any coordination, and decoded arrays never cross the object store.
Ray Data's writers name and cut files by block, which can't give either property.

Why plain Ray tasks rather than a Ray Data `map` over shard names: the same tasks with the
same retry and placement settings, minus Ray Data's fixed costs. Its executor notices a
finished task on a 0.1 s poll, so a CPU idles between shards, and the first run on a fresh
Ray starts two more actor processes (stats, autoscaling coordinator) that compete with the
shard tasks for the CPUs and memory (benchmarks/README.md has the numbers).

The names of the output's files and members, and its settings record, are `dataset.py`'s.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections import Counter
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from . import reasons
from .config import DataConfig
from .dataset import (FORMAT_VERSION, JOB_FILE, MANIFEST_FILE, MANIFEST_SCHEMA, PARTS_DIR, QUARANTINE_FILE,
                      QUARANTINE_SCHEMA, STATS_FILE, part_names, settings_record, write_output)
from .ownership import OutputBusy, OutputConflict, acquire, check_no_overlap, check_ours
from .retry import StoreError
from .runtime import end_embedded_ray_in_background, starts_embedded_ray
from .shard_job import read_parts, rewrite_without
from .shards import expand_shards
from .shard_tasks import SHARD_RETRIES, ShardTask, run_pending
from .stage_clock import add_seconds
from .storage import OutputStore
from .transform import DROPPED

__all__ = ["OutputBusy", "OutputConflict", "StoreError", "preprocess", "format_summary"]

log = logging.getLogger(__name__)

def plan(shards: list[str]) -> list[ShardTask]:
    return [ShardTask(src, f"shard-{i:06d}.tar") for i, src in enumerate(shards)]


def fingerprint(shards: list[str], cfg: DataConfig) -> str:
    blob = json.dumps({"shards": shards, "data": cfg.to_dict(), "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def preprocess(
    inputs: list[str],
    output: str,
    *,
    cfg: DataConfig | None = None,
    workers: int | None = None, storage_options: dict | None = None,
    progress: bool = True,
    shard_retries: int = SHARD_RETRIES,
    say: Callable[[str], None] | None = None,
    shards_per_task: int | None = None,  # shards per Ray task (default: `shard_tasks.batch_size`'s choice)
    startup_shards: bool = True,  # work on shards while an embedded Ray starts (startup_shards.py)
) -> dict:
    """Run (or finish) the job; returns the content of `_stats.json`.

    Refused in one line (`OutputConflict`, `OutputBusy`): an output that overlaps an input,
    holds someone else's files or another job's output, or that a running job holds. A store
    that refuses access or stays down stops the job with a one-line `StoreError`; `say` gets
    the one-line notices of the run (a dead job's lock taken over). It uses this process's Ray
    (`runtime.init_ray`), else an embedded one that ends with its tasks: start Ray first to share it."""
    if shard_retries < 0:
        raise ValueError(f"shard retries must be 0 or more, not {shard_retries}")
    cfg = cfg or DataConfig()
    started = time.time()
    shards = expand_shards(inputs, storage_options)
    check_no_overlap(list(inputs), shards, output, storage_options)
    tasks = plan(shards)
    fp = fingerprint(shards, cfg)
    # the tag: this job's temporaries are the only ones it ever deletes
    store = OutputStore(output, storage_options, tag=fp)
    if store.exists(JOB_FILE):
        _check_same_job(store, fp)
        if _finished(store, fp):  # read-only: a finished job takes no lock and changes nothing
            return _nothing_to_do(store, len(tasks))
    check_ours(store, JOB_FILE)
    store.makedirs()
    lock = acquire(store, fp, say=say)
    try:
        _claim_output(store, fp, inputs, shards, cfg)
        store.remove_temporaries()  # of this job's earlier runs: the lock says none is running
        if _finished(store, fp):  # another run finished it while this one waited for the lock
            return _nothing_to_do(store, len(tasks))
        done = {n for n in store.list(PARTS_DIR) if n.endswith(".done.json")}
        pending = [t for t in tasks if part_names(t.name)["done"] not in done]
        job = (store.url, storage_options or {}, store.tag, cfg.to_dict())  # process_shards' arguments
        own_ray = bool(pending) and starts_embedded_ray()  # run_pending starts it
        early = run_pending(pending, store, job, workers, progress, shard_retries, lock, shards_per_task,
                            startup_shards) if pending else 0  # shards done while Ray started
        stats = _commit_while_ray_ends(store, tasks, cfg, fp, lock, own_ray)
    finally:
        lock.release()
    stats["this_run"] = {
        "processed_shards": len(pending),
        "skipped_shards": len(tasks) - len(pending),
        "startup_shards": early,  # done while Ray started
        "seconds": round(time.time() - started, 3),
    }
    if lock.took_over is not None:
        stats["this_run"]["took_over_from"] = {k: lock.took_over.get(k) for k in ("host", "pid", "started")}
    return stats


def _commit_while_ray_ends(store: OutputStore, tasks: list[ShardTask], cfg: DataConfig, fp: str, lock,
                           own_ray: bool) -> dict:
    """The commit, which needs no Ray: an embedded Ray this job started ends meanwhile (its
    shutdown is mostly waiting), not after it at the process's exit."""
    ending = end_embedded_ray_in_background() if own_ray else None
    try:
        lock.ensure_held()
        stats = commit(store, tasks, cfg, fp)
        store.remove_temporaries()  # those of this run's crashed tasks
    finally:
        if ending is not None:
            ending.join()
    return stats


def _finished(store: OutputStore, fp: str) -> bool:
    return store.exists(STATS_FILE) and store.read_json(STATS_FILE).get("fingerprint") == fp


def _nothing_to_do(store: OutputStore, n_tasks: int) -> dict:
    stats = store.read_json(STATS_FILE)
    stats["this_run"] = {"processed_shards": 0, "skipped_shards": n_tasks, "startup_shards": 0, "seconds": 0.0}
    return stats


def _check_same_job(store: OutputStore, fp: str) -> None:
    if store.read_json(JOB_FILE).get("fingerprint") != fp:
        raise OutputConflict(
            f"{store.url} already holds the output of another preprocess job (other inputs or "
            f"settings); choose a new --output or delete it"
        )


def _claim_output(store: OutputStore, fp: str, inputs: list[str], shards: list[str], cfg: DataConfig) -> None:
    if store.exists(JOB_FILE):
        _check_same_job(store, fp)
        return
    store.write_json(JOB_FILE, {
        **settings_record(cfg, fp), "inputs": list(inputs),
        "shards": [{"source": t.source, "output": t.name} for t in plan(shards)],
    })


def commit(store: OutputStore, tasks: list[ShardTask], cfg: DataConfig, fp: str) -> dict:
    """Merge the per-shard parts, drop cross-shard duplicates, write the three job files.

    Deterministic from the parts alone, so a commit killed half-way is simply redone.
    Memory: one manifest row per written sample (~100 bytes), the only part of the job
    that grows with the corpus (about 1 GB at 10 M samples).
    """
    manifests, quarantines, per_shard = [], [], []
    for i, (m, q, done) in enumerate(read_parts(store, [t.name for t in tasks])):
        manifests.append(m.append_column("_order", pa.array([i << 32] * m.num_rows, pa.int64())))
        quarantines.append(q)
        per_shard.append(done)
    manifest = pa.concat_tables(manifests) if manifests else MANIFEST_SCHEMA.empty_table()
    manifest = manifest.set_column(
        manifest.schema.get_field_index("_order"), "_order",
        pc.add(manifest["_order"], manifest["position"]))
    quarantine = pa.concat_tables(quarantines) if quarantines else QUARANTINE_SCHEMA.empty_table()

    if cfg.dedup and manifest.num_rows:
        manifest, dupes = _drop_cross_shard_duplicates(store, manifest)
        quarantine = pa.concat_tables([quarantine, dupes])
    manifest = manifest.drop_columns(["_order"])

    counts: Counter = Counter()
    for s in per_shard:
        counts.update(s["counts"])
    reasons_by_kind: dict[str, Counter] = {reasons.ERROR: Counter(), reasons.FILTER: Counter(),
                                           reasons.DUPLICATE: Counter()}
    for kind, reason in zip(quarantine["kind"].to_pylist(), quarantine["reason"].to_pylist()):
        reasons_by_kind[kind][reason] += 1
    stats = {
        **settings_record(cfg, fp),
        "shards": len(tasks),
        "read": counts["read"],
        "written": manifest.num_rows,
        "quarantined": dict(sorted(reasons_by_kind[reasons.ERROR].items())),
        "filtered": dict(sorted(reasons_by_kind[reasons.FILTER].items())),
        "duplicates": sum(reasons_by_kind[reasons.DUPLICATE].values()),
        "bytes_in": sum(s["bytes_in"] for s in per_shard),
        "bytes_out": sum(s["bytes_out"] for s in per_shard),
        "worker_seconds": round(sum(s["seconds"] for s in per_shard), 3),
        # extras of written samples left out of the output (not in data.extra_exts), by extension
        "dropped_members": {k[len(DROPPED):]: n for k, n in sorted(counts.items()) if k.startswith(DROPPED)},
        "crashed_shards": sum(1 for s in per_shard if s.get("crashed")),
        # thread CPU of the shard tasks by stage (stage_clock.py), summed over this output's shards
        "stage_cpu_s": {k: round(v, 3) for k, v in functools.reduce(
            add_seconds, (s.get("stage_cpu_s", {}) for s in per_shard), {}).items()},
    }
    write_output(store, manifest, quarantine, stats)
    return stats


def _drop_cross_shard_duplicates(store: OutputStore, manifest: pa.Table) -> tuple[pa.Table, pa.Table]:
    firsts = manifest.group_by("content_hash").aggregate([("_order", "min")])
    is_first = pc.is_in(manifest["_order"], value_set=firsts["_order_min"])
    keep, losers = manifest.filter(is_first), manifest.filter(pc.invert(is_first))
    if losers.num_rows == 0:
        return keep, QUARANTINE_SCHEMA.empty_table()
    winner_of = dict(zip(keep["content_hash"].to_pylist(),
                         zip(keep["source"].to_pylist(), keep["key"].to_pylist())))
    rows = []
    by_shard: dict[str, set[str]] = {}
    for r in losers.to_pylist():
        src, key = winner_of[r["content_hash"]]
        rows.append({"key": r["key"], "source": r["source"], "position": r["position"],
                     "reason": reasons.DUPLICATE_CONTENT, "kind": reasons.DUPLICATE,
                     "detail": f"same content as {key!r} in {src}", "members": []})
        by_shard.setdefault(r["output_shard"], set()).add(r["key"])
    for shard_name, keys in sorted(by_shard.items()):
        rewrite_without(store, shard_name, keys)
    return keep, pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def format_summary(stats: dict, output: str) -> str:
    run = stats.get("this_run", {})
    lines = [
        f"preprocess -> {output}",
        f"  shards      {stats['shards']} ({run.get('processed_shards', 0)} processed now, "
        f"{run.get('skipped_shards', 0)} already done)",
        f"  samples     read {stats['read']}, written {stats['written']}, "
        f"quarantined {sum(stats['quarantined'].values())}, filtered {sum(stats['filtered'].values())}, "
        f"duplicates {stats['duplicates']}",
    ]
    for title, table in (("quarantined", stats["quarantined"]), ("filtered", stats["filtered"])):
        for reason, n in table.items():
            lines.append(f"    {title:<11} {reason:<26} {n}")
    dropped = stats.get("dropped_members") or {}
    if dropped:
        top = sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f".{ext} {n}" for ext, n in top[:8]) + (", ..." if len(top) > 8 else "")
        lines.append(f"  dropped     {sum(dropped.values())} extra member(s) not in data.extra_exts, "
                     f"left out of kept samples: {shown}")
    if stats.get("crashed_shards"):
        lines.append(f"  crashed     {stats['crashed_shards']} shard(s): their task died on every retry; "
                     f"quarantined whole as {reasons.SHARD_CRASHED}")
    mb_in, mb_out = stats["bytes_in"] / 1e6, stats["bytes_out"] / 1e6
    lines.append(f"  bytes       in {mb_in:.1f} MB, out {mb_out:.1f} MB")
    secs = run.get("seconds") or 0.0
    if secs:
        lines.append(f"  time        {secs:.1f} s ({stats['read'] / secs:.1f} samples/s)" if run.get(
            "processed_shards") else f"  time        {secs:.1f} s")
    lines.append(f"  files       {MANIFEST_FILE}, {QUARANTINE_FILE}, {STATS_FILE}")
    return "\n".join(lines)
