#!/usr/bin/env python
"""Benchmark of the preprocessing job: ours vs a webdataset+DataLoader baseline vs the compute floor.

All three do the same per-sample work on the same synthetic corpus (`pipelines.corpus.make_corpus`):
read a shard, decode + transform every sample (`pipelines.transform.transform_sample`), encode
the output members (`pipelines.transform.encode_members`); ours and the baseline also write the
output tars.

  ours      `pipelines.preprocess.preprocess(..., workers=2)` on a fresh embedded Ray: Ray's
            start-up is timed on its own, samples/s is the preprocess call itself (the first one
            after `init_ray`, i.e. what a user gets: cold Ray workers included). A second call
            into a new output (`ours_warm`: Ray workers already warm) is reported alongside.
  baseline  `wds.WebDataset(urls, shardshuffle=False)` + `DataLoader(num_workers=2,
            batch_size=None, prefetch_factor=4)`, same transform functions, one `wds.TarWriter`
            per input shard, written inside the worker that reads the shard (`--baseline-writer
            worker`, default) or in the main process (`main`). No manifest, no dedup, no fsync.
  floor     one process, no Ray, no DataLoader: read + decode + transform + encode, no writing.
            2 x floor is what 2 cores could ideally do.

Every measurement runs in its own subprocess (nothing shared: imports, page cache of outputs,
Ray); the three modes are interleaved and repeated (`--repeats`, the order rotates each round)
and medians are reported, so load from other processes on the machine hits all of them alike.
Each run also reports the CPU seconds its process tree spent and how busy the rest of the
machine was meanwhile (`other_cores`), to tell a slow pipeline from a busy machine; the table
gives medians over all rounds and over the "quiet" measurements only (others <= 0.1 cores).
A run whose Ray was killed from outside (another session's `ray stop`) is retried.

Memory: the ours run on the 1x corpus and on a `--scale`x corpus (same samples per shard), each
in a fresh subprocess with its own embedded Ray, while this process samples every 0.2 s the
sum of PSS (USS where PSS can't be read) over the child and all its descendants (driver,
gcs_server, raylet, Ray workers, ...). Peak at Nx should stay within 20% of the peak at 1x.

    python benchmarks/preprocess.py                       # 1600 samples / 16 shards, 8x for memory
    python benchmarks/preprocess.py --skip-memory --repeats 2
    python benchmarks/preprocess.py --samples 800 --shards 8 --out bench_out/preprocess.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
for _k, _v in THREAD_ENV.items():  # before numpy is imported, here and in every child
    os.environ.setdefault(_k, _v)
sys.path.insert(0, ROOT)

MODES = ("floor", "baseline", "ours")


# ------------------------------------------------------------------------------ helpers

def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy so far (all cores, niced work included)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _tree_cpu(root_pid: int | None = None) -> float:
    """CPU seconds of a process and its live descendants (plus children they have reaped)."""
    import psutil

    root = psutil.Process(root_pid or os.getpid())
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            c = p.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:
            pass
    return total


class _Meter:
    """Wall time, CPU of our process tree and CPU of everything else, over a `with` block."""

    def __enter__(self):
        self.t0, self.cpu0, self.busy0 = time.perf_counter(), _tree_cpu(), _busy_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = _tree_cpu() - self.cpu0
        self.other = max(0.0, _busy_seconds() - self.busy0 - self.cpu)
        return False

    def result(self, samples: int) -> dict:
        return {"seconds": round(self.wall, 3), "samples": samples,
                "samples_per_s": round(samples / self.wall, 2),
                "cpu_s": round(self.cpu, 2), "cores_used": round(self.cpu / self.wall, 2),
                "other_cores": round(self.other / self.wall, 2)}


def _shards(corpus: str) -> list[str]:
    return sorted(glob.glob(os.path.join(corpus, "*.tar")))


# ------------------------------------------------------------------------------ the three modes

def run_floor(corpus: str) -> dict:
    from pipelines.config import DataConfig
    from pipelines.reasons import SampleError
    from pipelines.source import iter_tar_samples
    from pipelines.tarheaders import ReadLimits
    from pipelines.transform import encode_members, transform_sample

    cfg, n, ok = DataConfig(), 0, 0
    with _Meter() as m:
        for url in _shards(corpus):
            for raw in iter_tar_samples(url, limits=ReadLimits.from_config(cfg)):
                n += 1
                try:
                    encode_members(transform_sample(raw, cfg), cfg)
                    ok += 1
                except SampleError:
                    pass
    return {**m.result(n), "written": ok}


class _BaselineTransform:
    """Runs inside a DataLoader worker: wds sample dict -> RawSample -> transform -> members.

    A worker reads whole shards one after the other (wds' split_by_worker), so the position of
    a sample in its shard is a per-URL counter, as in `pipelines.source`."""

    def __init__(self):
        self.positions: dict[str, int] = {}

    def __call__(self, sample: dict):
        import gzip

        from pipelines.config import DataConfig
        from pipelines.reasons import SampleError
        from pipelines.source import RawSample
        from pipelines.transform import encode_members, transform_sample

        url = sample["__url__"]
        pos = self.positions.get(url, 0)
        self.positions[url] = pos + 1
        members = {}
        for ext, data in sample.items():
            if ext.startswith("__"):
                continue
            if ext == "gz" or ext.endswith(".gz"):  # the same gzip rule as pipelines.source
                ext, data = ext[:-3].rstrip("."), gzip.decompress(data)
            members[ext] = data
        raw = RawSample(sample["__key__"], url, pos, members=members)
        cfg = DataConfig()
        try:
            p = transform_sample(raw, cfg)
        except SampleError:
            return {"url": url, "key": raw.key, "members": None}
        return {"url": url, "key": raw.key, "members": encode_members(p, cfg)}


def _out_name(dest: str, index: dict[str, int], url: str) -> str:
    return os.path.join(dest, f"shard-{index[url]:06d}.tar")


def _write_in_worker(dest: str, index: dict[str, int]):
    """A wds pipeline stage: write each sample into the output tar of its input shard, pass on
    only a small record (the worker holds one open writer at a time)."""
    def stage(src):
        import webdataset as wds

        url, f, writer = None, None, None
        try:
            for s in src:
                if s["url"] != url:
                    if writer is not None:
                        writer.close()
                        f.close()
                    url = s["url"]
                    f = open(_out_name(dest, index, url), "wb")
                    writer = wds.TarWriter(f, encoder=False, mtime=0)
                if s["members"] is not None:
                    writer.write({"__key__": s["key"], **s["members"]})
                yield {"key": s["key"], "written": s["members"] is not None}
        finally:
            if writer is not None:
                writer.close()
                f.close()
    return stage


def run_baseline(corpus: str, dest: str, writer_mode: str) -> dict:
    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader

    import pipelines.transform  # noqa: F401  (imported before the workers fork: they inherit it)

    torch.set_num_threads(1)
    urls = _shards(corpus)
    index = {u: i for i, u in enumerate(urls)}
    os.makedirs(dest, exist_ok=True)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(_BaselineTransform())
    if writer_mode == "worker":
        ds = ds.compose(_write_in_worker(dest, index))
    loader = DataLoader(ds, batch_size=None, num_workers=2, prefetch_factor=4)
    n = ok = 0
    with _Meter() as m:
        if writer_mode == "worker":
            for rec in loader:
                n += 1
                ok += rec["written"]
        else:
            writers: dict[str, tuple] = {}
            for s in loader:
                n += 1
                if s["url"] not in writers:
                    f = open(_out_name(dest, index, s["url"]), "wb")
                    writers[s["url"]] = (f, wds.TarWriter(f, encoder=False, mtime=0))
                if s["members"] is not None:
                    writers[s["url"]][1].write({"__key__": s["key"], **s["members"]})
                    ok += 1
            for f, w in writers.values():
                w.close()
                f.close()
    return {**m.result(n), "written": ok}


def run_ours(corpus: str, dest: str, warm: bool) -> dict:
    from pipelines import runtime

    if hasattr(runtime, "local_mode_env"):
        runtime.local_mode_env()  # what the CLI does before Ray is imported
    t0 = time.perf_counter()
    import ray

    from pipelines.runtime import init_ray

    init_ray()
    startup = time.perf_counter() - t0
    from pipelines.preprocess import preprocess

    out: dict = {"ray_startup_s": round(startup, 3)}
    try:
        for label in ("cold", "warm") if warm else ("cold",):
            with _Meter() as m:
                stats = preprocess([corpus], os.path.join(dest, label), workers=2, progress=False)
            out[label] = {**m.result(stats["read"]), "written": stats["written"],
                          "worker_seconds": stats["worker_seconds"]}
    finally:
        ray.shutdown()
    return out


def child_main(args) -> None:
    if args.child == "floor":
        res = run_floor(args.corpus)
    elif args.child == "baseline":
        res = run_baseline(args.corpus, args.dest, args.baseline_writer)
    else:
        res = run_ours(args.corpus, args.dest, args.warm)
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------ the parent

def _child_env() -> dict:
    env = {**os.environ, **THREAD_ENV, "RAY_USAGE_STATS_ENABLED": "0",
           # this run's Ray gets its own token: no ~/.ray/auth_token of another run is read or written
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)  # always a fresh embedded Ray, never somebody's cluster
    return env


class _MemorySampler(threading.Thread):
    """Sum of PSS (or USS) over a process and its descendants, every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.metric = None
        self.peak = self.peak_rss = 0
        self.peak_procs = 0
        self.series: list[tuple[float, int]] = []

    def _one(self, p) -> tuple[int, int]:
        if self.metric in (None, "pss"):
            try:
                mi = p.memory_full_info()
                if getattr(mi, "pss", None) is not None:
                    self.metric = "pss"
                    return mi.pss, mi.rss
            except Exception:
                if self.metric == "pss":
                    raise
        self.metric = "uss"
        mi = p.memory_full_info()
        return mi.uss, mi.rss

    def run(self) -> None:
        import psutil

        t0 = time.perf_counter()
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total = rss = 0
            for p in procs:
                try:
                    a, b = self._one(p)
                    total, rss = total + a, rss + b
                except psutil.Error:
                    pass  # exited between listing and reading
            self.peak, self.peak_rss = max(self.peak, total), max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, len(procs))
            self.series.append((round(time.perf_counter() - t0, 2), total))
            self.stop.wait(self.interval)


def run_child(mode: str, corpus: str, dest: str, log: str, *, attempts: int = 3, **kw) -> dict:
    """One measurement in a fresh subprocess. A failed run is retried: on a shared machine
    another session's `ray stop --force` kills every Ray process, ours included."""
    for attempt in range(1, attempts + 1):
        try:
            res = _run_child_once(mode, corpus, dest, log, **kw)
            res["attempts"] = attempt
            return res
        except RuntimeError as e:
            if attempt == attempts:
                raise
            print(f"[bench] {e}; retrying", flush=True)
    raise AssertionError("unreachable")


def _run_child_once(mode: str, corpus: str, dest: str, log: str, *, warm: bool = False, writer: str = "worker",
                    sample_memory: bool = False) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--corpus", corpus, "--dest", dest,
           "--baseline-writer", writer] + (["--warm"] if warm else [])
    with open(log, "ab") as lf:
        lf.write(f"\n=== {' '.join(cmd)}\n".encode())
        lf.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=lf, env=_child_env(), cwd=ROOT)
        sampler = _MemorySampler(proc.pid) if sample_memory else None
        if sampler:
            sampler.start()
        stdout, _ = proc.communicate()
        if sampler:
            sampler.stop.set()
            sampler.join()
        wall = time.perf_counter() - t0
    shutil.rmtree(dest, ignore_errors=True)
    lines = [ln for ln in stdout.decode().splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} run failed (exit {proc.returncode}); see {log}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_wall_s"] = round(wall, 2)
    if sampler:
        res["memory"] = {"metric": sampler.metric, "peak_mb": round(sampler.peak / 2**20, 1),
                         "peak_rss_sum_mb": round(sampler.peak_rss / 2**20, 1),
                         "peak_processes": sampler.peak_procs,
                         "series_mb": [(t, round(v / 2**20, 1)) for t, v in sampler.series[::5]]}
    return res


def ensure_corpus(root: str, samples: int, shards: int, seed: int) -> str:
    from pipelines.corpus import make_corpus

    path = os.path.join(root, f"corpus-{samples}x{shards}-seed{seed}")
    if os.path.exists(os.path.join(path, "_corpus.json")):
        print(f"[bench] reusing corpus {path}", flush=True)
        return path
    print(f"[bench] generating {samples} samples in {shards} shards -> {path}", flush=True)
    t0 = time.perf_counter()
    make_corpus(path, samples, shards, seed=seed, progress=True)
    print(f"[bench]   {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def _median(xs):
    return round(statistics.median(xs), 2) if xs else None


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


# A measurement counts as "quiet" when the rest of the machine used at most this many cores
# meanwhile. On a shared machine the medians of all rounds mix quiet and busy rounds; the
# goals are about what 2 cores can do, so both are reported.
QUIET_CORES = 0.1


def _throughput(runs: dict, keep) -> dict:
    fl = [r["samples_per_s"] for r in runs["floor"] if keep(r)]
    bl = [r["samples_per_s"] for r in runs["baseline"] if keep(r)]
    ou = [r["cold"]["samples_per_s"] for r in runs["ours"] if keep(r["cold"])]
    ow = [r["warm"]["samples_per_s"] for r in runs["ours"] if "warm" in r and keep(r["warm"])]
    floor, base, ours = _median(fl), _median(bl), _median(ou)
    ideal = round(2 * floor, 2) if floor else None
    return {
        "measurements": {"floor": len(fl), "baseline": len(bl), "ours": len(ou), "ours_warm": len(ow)},
        "floor_samples_per_s": floor, "ideal_2x_floor": ideal,
        "baseline_samples_per_s": base, "ours_samples_per_s": ours, "ours_warm_samples_per_s": _median(ow),
        "ours_over_baseline": _ratio(ours, base), "ours_over_2x_floor": _ratio(ours, ideal),
        "ours_warm_over_baseline": _ratio(_median(ow), base), "ours_warm_over_2x_floor": _ratio(_median(ow), ideal),
        "baseline_over_2x_floor": _ratio(base, ideal),
    }


def summarize(runs: dict, memory: dict | None, args) -> dict:
    s = {
        "all": _throughput(runs, lambda r: True),
        "quiet": _throughput(runs, lambda r: r["other_cores"] <= QUIET_CORES),
        "ray_startup_s": _median([r["ray_startup_s"] for r in runs["ours"]]),
        "other_cores_median": _median([r["other_cores"] for r in runs["floor"] + runs["baseline"]]
                                      + [r["cold"]["other_cores"] for r in runs["ours"]]),
        # CPU seconds per 1000 samples (whole process tree): what the work costs, apart from how
        # busy the machine was; ours - floor is our overhead (start-up, writing, bookkeeping)
        "cpu_s_per_1k": {
            "floor": _median([1000 * r["cpu_s"] / r["samples"] for r in runs["floor"]]),
            "baseline": _median([1000 * r["cpu_s"] / r["samples"] for r in runs["baseline"]]),
            "ours": _median([1000 * r["cold"]["cpu_s"] / r["cold"]["samples"] for r in runs["ours"]]),
            "ours_warm": _median([1000 * r["warm"]["cpu_s"] / r["warm"]["samples"]
                                  for r in runs["ours"] if "warm" in r]),
        },
    }
    goals = {}
    for which in ("all", "quiet"):
        t = s[which]
        goals[f"ours >= baseline ({which})"] = None if t["ours_over_baseline"] is None \
            else t["ours_over_baseline"] >= 1.0
        goals[f"ours >= 0.7 x (2 x floor) ({which})"] = None if t["ours_over_2x_floor"] is None \
            else t["ours_over_2x_floor"] >= 0.7
    if memory:
        p1 = _median([r["memory"]["peak_mb"] for r in memory["1x"]])
        pn = _median([r["memory"]["peak_mb"] for r in memory[f"{args.scale}x"]])
        s.update({"memory_metric": memory["1x"][0]["memory"]["metric"], "peak_mb_1x": p1,
                  f"peak_mb_{args.scale}x": pn, "peak_ratio": round(pn / p1, 3),
                  # the big corpus amortizes the start-up (the memory sampler runs meanwhile)
                  f"ours_{args.scale}x_samples_per_s": _median(
                      [r["cold"]["samples_per_s"] for r in memory[f"{args.scale}x"]])})
        goals[f"peak {args.scale}x <= 1.2 x peak 1x"] = s["peak_ratio"] <= 1.2
    s["goals_met"] = goals
    return s


def table(s: dict, args) -> str:
    a, q = s["all"], s["quiet"]
    nq = q["measurements"]

    def row(label, key, bold=False):
        va, vq = a[key], q[key]
        if bold:
            va, vq = f"**{va}**", f"**{vq}**" if vq is not None else vq
        return f"| {label} | {va} | {'-' if vq is None else vq} |"

    rows = [
        f"| {args.samples} samples in {args.shards} shards | all rounds (median) | "
        f"quiet rounds (others <= {QUIET_CORES} cores) |",
        "|---|---|---|",
        f"| measurements floor / baseline / ours / ours warm | {' / '.join(str(v) for v in a['measurements'].values())}"
        f" | {' / '.join(str(v) for v in nq.values())} |",
        row("floor (1 process), samples/s", "floor_samples_per_s"),
        row("ideal 2 x floor, samples/s", "ideal_2x_floor"),
        row("baseline (wds + DataLoader, 2 workers), samples/s", "baseline_samples_per_s"),
        row("ours (preprocess, workers=2, first call), samples/s", "ours_samples_per_s", bold=True),
        row("ours, second call (Ray workers warm), samples/s", "ours_warm_samples_per_s"),
        row("ours / baseline", "ours_over_baseline", bold=True),
        row("ours / (2 x floor)", "ours_over_2x_floor", bold=True),
        row("ours warm / baseline", "ours_warm_over_baseline"),
        row("ours warm / (2 x floor)", "ours_warm_over_2x_floor"),
        row("baseline / (2 x floor)", "baseline_over_2x_floor"),
        "",
        "| measure | value |", "|---|---|",
        f"| Ray start-up (init_ray), s | {s['ray_startup_s']} |",
        f"| other load on the machine (median over all measurements, cores) | {s['other_cores_median']} |",
        "| CPU s per 1000 samples: floor / baseline / ours / ours warm | "
        + " / ".join(str(s["cpu_s_per_1k"][k]) for k in ("floor", "baseline", "ours", "ours_warm")) + " |",
    ]
    if "peak_ratio" in s:
        m = s["memory_metric"].upper()
        rows += [
            f"| peak memory 1x ({m} sum over the process tree), MB | {s['peak_mb_1x']} |",
            f"| peak memory {args.scale}x ({m} sum over the process tree), MB | {s[f'peak_mb_{args.scale}x']} |",
            f"| **peak {args.scale}x / peak 1x** | **{s['peak_ratio']}** |",
            f"| ours on the {args.scale}x corpus (start-up amortized; sampler on), samples/s | "
            f"{s[f'ours_{args.scale}x_samples_per_s']} |",
        ]
    rows += [f"| goal: {g} | {'no quiet measurement' if ok is None else 'met' if ok else 'NOT met'} |"
             for g, ok in s["goals_met"].items()]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1600, help="samples in the 1x corpus")
    ap.add_argument("--shards", type=int, default=16, help="shards in the 1x corpus")
    ap.add_argument("--scale", type=int, default=8, help="size of the large corpus for the memory check")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of floor/baseline/ours (medians reported)")
    ap.add_argument("--memory-repeats", type=int, default=2, help="rounds of the 1x / Nx memory runs")
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--no-warm", action="store_true", help="skip the second (warm) ours call")
    ap.add_argument("--baseline-writer", choices=("worker", "main"), default="worker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep corpora here and reuse them on the next run "
                                      "(default: a temporary folder, deleted at the end)")
    # internal: one measurement in a child process
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)

    work = args.workdir or tempfile.mkdtemp(prefix="preprocess-bench-")
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "children.log")
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    print(f"[bench] load average at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in load_at_start)} "
          f"on {os.cpu_count()} cpus", flush=True)
    try:
        corpus = ensure_corpus(work, args.samples, args.shards, args.seed)
        big = None if args.skip_memory else ensure_corpus(
            work, args.samples * args.scale, args.shards * args.scale, args.seed)
        runs: dict[str, list] = {m: [] for m in MODES}
        for rep in range(args.repeats):
            order = MODES[rep % 3:] + MODES[:rep % 3]  # rotate who goes first
            for mode in order:
                r = run_child(mode, corpus, os.path.join(work, f"out-{mode}"), log,
                              warm=not args.no_warm, writer=args.baseline_writer)
                runs[mode].append(r)
                main_r = r["cold"] if mode == "ours" else r
                extra = f" (Ray start-up {r['ray_startup_s']} s; warm call " \
                        f"{r['warm']['samples_per_s'] if 'warm' in r else '-'}/s)" if mode == "ours" else ""
                print(f"[bench] round {rep + 1} {mode:<8} {main_r['samples_per_s']:8.1f} samples/s  "
                      f"cpu {main_r['cores_used']} cores, others {main_r['other_cores']} cores{extra}",
                      flush=True)
        memory = None
        if big:
            memory = {"1x": [], f"{args.scale}x": []}
            for rep in range(args.memory_repeats):
                for label, c in (("1x", corpus), (f"{args.scale}x", big)):
                    r = run_child("ours", c, os.path.join(work, "out-mem"), log, sample_memory=True)
                    memory[label].append(r)
                    print(f"[bench] memory {label:<4} peak {r['memory']['peak_mb']} MB "
                          f"({r['memory']['metric']}, {r['memory']['peak_processes']} processes), "
                          f"{r['cold']['samples_per_s']} samples/s", flush=True)
        summary = summarize(runs, memory, args)
        result = {
            "config": {k: getattr(args, k) for k in ("samples", "shards", "scale", "repeats", "memory_repeats",
                                                     "baseline_writer", "seed")},
            "machine": {"cpus": os.cpu_count(), "loadavg_at_start": load_at_start,
                        "loadavg_at_end": os.getloadavg()},
            "summary": summary, "runs": runs, "memory": memory,
            "total_seconds": round(time.perf_counter() - started, 1),
        }
        print()
        print(table(summary, args))
        print(f"\nload average (1/5/15 min) at start {' '.join(f'{x:.2f}' for x in load_at_start)}, "
              f"at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
            print(f"\nwrote {args.out}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
