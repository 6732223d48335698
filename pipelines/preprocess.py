"""The preprocessing job: raw WebDataset shards in, clean shards + manifest + quarantine out.

Shape of a run:
  1. list the input shards; output shard i is `shard-{i:06d}.tar` for the i-th input shard
     in sorted order, recorded with the settings in `_job.json` (a re-run with other inputs
     or settings into the same output is refused, not mixed in);
  2. every input shard whose `_parts/*.done.json` is missing is processed by one Ray task
     (`shard_job.process_shard`: stream in, decode, transform, filter, write one shard);
     Ray schedules them and reruns the task of a dead worker, the driver bounds how many
     are in flight (`_run_pending`);
  3. the commit: drop cross-shard duplicates (the first by (shard, position) wins), write
     `_manifest.parquet`, `_quarantine.parquet`, and last `_stats.json`, which marks the
     output complete.

Why a map over shards rather than `read_datasource(...).map_batches(...).write_*()`: a
shard-to-shard job commits a whole output shard atomically and resumes at shard
granularity without any coordination, and decoded arrays never cross the object store.
Ray Data's writers name and cut files by block, which can't give either property.

Why plain Ray tasks rather than a Ray Data `map` over shard names (what this used to be):
the same tasks with the same retry and placement settings, minus Ray Data's fixed costs.
Its executor notices a finished task on a 0.1 s poll, so a CPU idles between shards, and
the first run on a fresh Ray starts two more actor processes (stats, autoscaling
coordinator) that compete with the shard tasks for the CPUs. Measured on 2 CPUs, 1600
samples in 16 shards, first call after `init_ray` (see benchmarks/README.md): 16.6 -> 13.1
CPU-seconds in all processes (the work itself is ~10) and ~230 MB less memory.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from . import reasons
from .config import DataConfig
from .shard_job import MANIFEST_SCHEMA, QUARANTINE_SCHEMA, part_names, process_shard, rewrite_without
from .shards import expand_shards
from .store import OutputStore
from .transform import DROPPED

FORMAT_VERSION = 1
JOB_FILE, STATS_FILE = "_job.json", "_stats.json"
MANIFEST_FILE, QUARANTINE_FILE = "_manifest.parquet", "_quarantine.parquet"


class OutputConflict(ValueError):
    """The output location holds a different job's output."""


@dataclass(frozen=True)
class ShardTask:
    source: str
    name: str


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
    workers: int | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> dict:
    """Run (or finish) the job; returns the content of `_stats.json`."""
    from .runtime import init_ray

    cfg = cfg or DataConfig()
    started = time.time()
    shards = expand_shards(inputs, storage_options)
    tasks = plan(shards)
    store = OutputStore(output, storage_options)
    store.makedirs()
    fp = fingerprint(shards, cfg)
    _claim_output(store, fp, inputs, shards, cfg)
    store.remove_temporaries()

    if store.exists(STATS_FILE) and store.read_json(STATS_FILE).get("fingerprint") == fp:
        stats = store.read_json(STATS_FILE)
        stats["this_run"] = {"processed_shards": 0, "skipped_shards": len(tasks), "seconds": 0.0}
        return stats

    done = {n for n in store.list("_parts") if n.endswith(".done.json")}
    pending = [t for t in tasks if part_names(t.name)["done"] not in done]
    if pending:
        init_ray()
        _run_pending(pending, store, cfg, storage_options, workers, progress)
    stats = commit(store, tasks, cfg, fp)
    stats["this_run"] = {
        "processed_shards": len(pending),
        "skipped_shards": len(tasks) - len(pending),
        "seconds": round(time.time() - started, 3),
    }
    return stats


def _claim_output(store: OutputStore, fp: str, inputs: list[str], shards: list[str], cfg: DataConfig) -> None:
    if store.exists(JOB_FILE):
        job = store.read_json(JOB_FILE)
        if job.get("fingerprint") != fp:
            raise OutputConflict(
                f"{store.url} already holds the output of another preprocess job (other inputs or "
                f"settings); choose a new --output or delete it"
            )
        return
    store.write_json(JOB_FILE, {
        "fingerprint": fp, "format": FORMAT_VERSION, "inputs": list(inputs),
        "shards": [{"source": t.source, "output": t.name} for t in plan(shards)], "data": cfg.to_dict(),
    })


def _run_pending(pending, store, cfg, storage_options, workers, progress) -> None:
    import ray

    from .runtime import cluster_cpus

    url, opts, cfg_dict = store.url, storage_options or {}, cfg.to_dict()

    def run_one(source: str, name: str) -> dict:
        return process_shard(source, name, OutputStore(url, opts), DataConfig.from_dict(cfg_dict), opts)

    # Ray Data's settings for its map tasks: rerun a task whose worker died, however often
    # (a shard task is idempotent: it writes its outputs atomically), and spread the tasks
    # over the nodes.
    task = ray.remote(num_cpus=1, max_retries=-1, retry_exceptions=[ray.exceptions.RaySystemError],
                      scheduling_strategy="SPREAD")(run_one)
    todo = list(reversed(pending))  # pop() takes them in plan order
    running: list = []
    bar = _progress_bar(len(pending), progress)
    totals: Counter = Counter()
    cpus = cluster_cpus()
    try:
        while todo or running:
            # by default one task per CPU plus one queued per CPU, so that a CPU that frees up
            # starts the next shard at once (no round trip through this loop) and an autoscaler
            # sees demand. `workers` caps the shards in progress: queuing is kept where Ray's
            # CPUs already enforce the cap, dropped where only this loop can
            limit = 2 * cpus if not workers else (2 * workers if workers >= cpus else workers)
            while todo and len(running) < limit:
                t = todo.pop()
                running.append(task.remote(t.source, t.name))
            done, running = ray.wait(running, num_returns=1)
            totals.update(ray.get(done[0])["counts"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(samples=totals["read"], written=totals["written"],
                                rejected=totals["read"] - totals["written"], refresh=False)
    finally:
        for ref in running:  # only after an error or an interrupt
            ray.cancel(ref)
        if bar is not None:
            bar.close()


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc="preprocess", dynamic_ncols=True)


def commit(store: OutputStore, tasks: list[ShardTask], cfg: DataConfig, fp: str) -> dict:
    """Merge the per-shard parts, drop cross-shard duplicates, write the three job files.

    Deterministic from the parts alone, so a commit killed half-way is simply redone.
    Memory: one manifest row per written sample (~100 bytes), the only part of the job
    that grows with the corpus (about 1 GB at 10 M samples).
    """
    manifests, quarantines, per_shard = [], [], []
    for i, t in enumerate(tasks):
        parts = part_names(t.name)
        m = store.read_parquet(parts["manifest"])
        manifests.append(m.append_column("_order", pa.array([i << 32] * m.num_rows, pa.int64())))
        quarantines.append(store.read_parquet(parts["quarantine"]))
        per_shard.append(store.read_json(parts["done"]))
    manifest = pa.concat_tables(manifests) if manifests else MANIFEST_SCHEMA.empty_table()
    manifest = manifest.set_column(
        manifest.schema.get_field_index("_order"), "_order",
        pc.add(manifest["_order"], manifest["position"]))
    quarantine = pa.concat_tables(quarantines) if quarantines else QUARANTINE_SCHEMA.empty_table()

    if cfg.dedup and manifest.num_rows:
        manifest, dupes = _drop_cross_shard_duplicates(store, manifest)
        quarantine = pa.concat_tables([quarantine, dupes])
    manifest = manifest.drop_columns(["_order"])
    store.write_parquet(MANIFEST_FILE, manifest)
    store.write_parquet(QUARANTINE_FILE, quarantine)

    counts: Counter = Counter()
    for s in per_shard:
        counts.update(s["counts"])
    reasons_by_kind: dict[str, Counter] = {reasons.ERROR: Counter(), reasons.FILTER: Counter(),
                                           reasons.DUPLICATE: Counter()}
    for kind, reason in zip(quarantine["kind"].to_pylist(), quarantine["reason"].to_pylist()):
        reasons_by_kind[kind][reason] += 1
    stats = {
        "fingerprint": fp,
        "format": FORMAT_VERSION,
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
        "data": cfg.to_dict(),
    }
    store.write_json(STATS_FILE, stats)
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
    mb_in, mb_out = stats["bytes_in"] / 1e6, stats["bytes_out"] / 1e6
    lines.append(f"  bytes       in {mb_in:.1f} MB, out {mb_out:.1f} MB")
    secs = run.get("seconds") or 0.0
    if secs:
        lines.append(f"  time        {secs:.1f} s ({stats['read'] / secs:.1f} samples/s)" if run.get(
            "processed_shards") else f"  time        {secs:.1f} s")
    lines.append("  files       _manifest.parquet, _quarantine.parquet, _stats.json")
    return "\n".join(lines)
