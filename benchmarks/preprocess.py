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
import json
import os
import shutil
import sys
import time

import harness
from harness import median, ratio

harness.single_threaded()  # before numpy is imported, here and in every child
sys.path.insert(0, harness.ROOT)

MODES = ("floor", "baseline", "ours")


# ------------------------------------------------------------------------------ one measurement

def _run_child_once(mode: str, corpus: str, dest: str, log: str, *, warm: bool = False, writer: str = "worker",
                    sample_memory: bool = False) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--corpus", corpus, "--dest", dest,
           "--baseline-writer", writer] + (["--warm"] if warm else [])
    run = harness.run_tree(cmd, log, capture=True, sample_memory=sample_memory)
    shutil.rmtree(dest, ignore_errors=True)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} run failed (exit {run.returncode}); see {log}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_wall_s"] = round(run.wall_s, 2)
    if run.memory:
        res["memory"] = {**run.memory.summary(),
                         "series_mb": [(t, round(v / 2**20, 1)) for t, v in run.memory.series[::5]]}
    return res


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


# ------------------------------------------------------------------------------ the rounds

def throughput_rounds(args, corpus: str, work: str, log: str) -> dict[str, list]:
    """`--repeats` rounds of the three modes, the order rotating so that no mode always goes first."""
    runs: dict[str, list] = {m: [] for m in MODES}
    for rep in range(args.repeats):
        order = MODES[rep % 3:] + MODES[:rep % 3]
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
    return runs


def memory_rounds(args, corpus: str, big: str, work: str, log: str) -> dict[str, list]:
    memory: dict[str, list] = {"1x": [], f"{args.scale}x": []}
    for _ in range(args.memory_repeats):
        for label, c in (("1x", corpus), (f"{args.scale}x", big)):
            r = run_child("ours", c, os.path.join(work, "out-mem"), log, sample_memory=True)
            memory[label].append(r)
            print(f"[bench] memory {label:<4} peak {r['memory']['peak_mb']} MB "
                  f"({r['memory']['metric']}, {r['memory']['peak_processes']} processes), "
                  f"{r['cold']['samples_per_s']} samples/s", flush=True)
    return memory


# ------------------------------------------------------------------------------ the report

# A measurement counts as "quiet" when the rest of the machine used at most this many cores
# meanwhile. On a shared machine the medians of all rounds mix quiet and busy rounds; the
# goals are about what 2 cores can do, so both are reported.
QUIET_CORES = 0.1


def _throughput(runs: dict, keep) -> dict:
    fl = [r["samples_per_s"] for r in runs["floor"] if keep(r)]
    bl = [r["samples_per_s"] for r in runs["baseline"] if keep(r)]
    ou = [r["cold"]["samples_per_s"] for r in runs["ours"] if keep(r["cold"])]
    ow = [r["warm"]["samples_per_s"] for r in runs["ours"] if "warm" in r and keep(r["warm"])]
    floor, base, ours = median(fl), median(bl), median(ou)
    ideal = round(2 * floor, 2) if floor else None
    return {
        "measurements": {"floor": len(fl), "baseline": len(bl), "ours": len(ou), "ours_warm": len(ow)},
        "floor_samples_per_s": floor, "ideal_2x_floor": ideal,
        "baseline_samples_per_s": base, "ours_samples_per_s": ours, "ours_warm_samples_per_s": median(ow),
        "ours_over_baseline": ratio(ours, base), "ours_over_2x_floor": ratio(ours, ideal),
        "ours_warm_over_baseline": ratio(median(ow), base), "ours_warm_over_2x_floor": ratio(median(ow), ideal),
        "baseline_over_2x_floor": ratio(base, ideal),
    }


def summarize(runs: dict, memory: dict | None, args) -> dict:
    s = {
        "all": _throughput(runs, lambda r: True),
        "quiet": _throughput(runs, lambda r: r["other_cores"] <= QUIET_CORES),
        "ray_startup_s": median([r["ray_startup_s"] for r in runs["ours"]]),
        "other_cores_median": median([r["other_cores"] for r in runs["floor"] + runs["baseline"]]
                                      + [r["cold"]["other_cores"] for r in runs["ours"]]),
        # CPU seconds per 1000 samples (whole process tree): what the work costs, apart from how
        # busy the machine was; ours - floor is our overhead (start-up, writing, bookkeeping)
        "cpu_s_per_1k": {
            "floor": median([1000 * r["cpu_s"] / r["samples"] for r in runs["floor"]]),
            "baseline": median([1000 * r["cpu_s"] / r["samples"] for r in runs["baseline"]]),
            "ours": median([1000 * r["cold"]["cpu_s"] / r["cold"]["samples"] for r in runs["ours"]]),
            "ours_warm": median([1000 * r["warm"]["cpu_s"] / r["warm"]["samples"]
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
        p1 = median([r["memory"]["peak_mb"] for r in memory["1x"]])
        pn = median([r["memory"]["peak_mb"] for r in memory[f"{args.scale}x"]])
        s.update({"memory_metric": memory["1x"][0]["memory"]["metric"], "peak_mb_1x": p1,
                  f"peak_mb_{args.scale}x": pn, "peak_ratio": round(pn / p1, 3),
                  # the big corpus amortizes the start-up (the memory sampler runs meanwhile)
                  f"ours_{args.scale}x_samples_per_s": median(
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

# ------------------------------------------------------------------------------ the command

def parse_args() -> argparse.Namespace:
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
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        from preprocess_modes import child_main

        return child_main(args.child, args.corpus, args.dest, args.baseline_writer, args.warm)
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    print(f"[bench] load average at start (1/5/15 min): {harness.loads(load_at_start)} "
          f"on {os.cpu_count()} cpus", flush=True)
    with harness.work_folder(args.workdir, "preprocess-bench-") as work:
        log = os.path.join(work, "children.log")
        corpus = ensure_corpus(work, args.samples, args.shards, args.seed)
        big = None if args.skip_memory else ensure_corpus(
            work, args.samples * args.scale, args.shards * args.scale, args.seed)
        runs = throughput_rounds(args, corpus, work, log)
        memory = memory_rounds(args, corpus, big, work, log) if big else None
        summary = summarize(runs, memory, args)
        result = {
            "config": {k: getattr(args, k) for k in ("samples", "shards", "scale", "repeats", "memory_repeats",
                                                     "baseline_writer", "seed")},
            "machine": harness.machine(load_at_start),
            "summary": summary, "runs": runs, "memory": memory,
            "total_seconds": round(time.perf_counter() - started, 1),
        }
        print()
        print(table(summary, args))
        print(f"\n{harness.load_line(load_at_start)}")
        if args.out:
            harness.write_json(args.out, result)
            print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
