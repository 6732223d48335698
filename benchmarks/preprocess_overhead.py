#!/usr/bin/env python
"""Ray's overhead in the preprocessing job: the fixed start-up cost of a `preprocess` command,
and the cost of each shard beyond its samples' work.

  startup    a fresh process per measurement: the imports of the preprocess path (ray_job and
             what `cmd_preprocess` pulls in), `import ray`, `init_ray` (embedded Ray), a job of
             one one-sample shard (planning, the lock, one task, the commit) and `ray.shutdown`,
             each timed (wall) with the driver's CPU and, for the whole, the CPU of the process
             tree (driver, GCS, raylet, workers, dashboard). Also the whole command
             `ray_job.py preprocess` on that shard, timed from outside.
  per_shard  the same N one-sample shards (a 32 px JPEG and a caption each) as N shards and as
             2 shards: per-shard overhead = (job time on N shards - on 2) / (N - 2), in wall and
             in CPU of the process tree; and (wall - work) / N, work being the shard tasks' CPU
             in the sample stages (all but `bookkeeping`, stage_clock.py) over the 2 workers.

Two variants, interleaved in every round (medians over rounds):
  before     `init_ray(dashboard=True, ray_data=True)` (the dashboard and Ray Data's context, as
             for training) and one shard per Ray task (`shards_per_task=1`);
  after      what `preprocess` does itself: `init_ray(dashboard=False, ray_data=False)` and its
             own choice of shards per task.
The commit's part reads (threaded) and the files per shard are the same in both.

    python benchmarks/preprocess_overhead.py --out benchmarks/results/preprocess_overhead.json
    python benchmarks/preprocess_overhead.py --shards 500 --rounds 1    # a quick look

Defaults (2000 shards, 3 rounds) take ~10 minutes on 2 quiet cores.
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

harness.single_threaded()

VARIANTS = {"before": {"dashboard": True, "ray_data": True, "shards_per_task": 1},
            "after": {"dashboard": False, "ray_data": False, "shards_per_task": None}}
FEW = 2  # shards of the comparison corpus: the same samples, one per worker


# ------------------------------------------------------------------------------ corpus

def write_corpus(folder: str, samples: int, shards: int) -> str:
    """`samples` one-sample-sized samples (a distinct 32 px JPEG and caption) over `shards`
    tar files; kept when already there."""
    import numpy as np
    from PIL import Image

    if os.path.isdir(folder) and len(os.listdir(folder)) == shards:
        return folder
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    per = -(-samples // shards)
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"tiny-{s:06d}.tar"), "w") as t:
            for i in range(s * per, min(samples, (s + 1) * per)):
                b = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(b, "JPEG")
                for name, data in ((f"k{i:06d}.jpg", b.getvalue()), (f"k{i:06d}.txt", f"photo {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    t.addfile(info, io.BytesIO(data))
    return folder


# ------------------------------------------------------------------------------ children

def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(variant: str, corpus: str, out: str) -> dict:
    """One measurement in this (fresh) process: the phases of a preprocess command."""
    v = VARIANTS[variant]
    phases: dict = {}

    def mark(name: str, t0: float, c0: float) -> tuple[float, float]:
        t, c = time.perf_counter(), _cpu()
        phases[name] = {"wall_s": round(t - t0, 3), "driver_cpu_s": round(c - c0, 3)}
        return t, c

    t, c = time.perf_counter(), _cpu()
    import ray_job  # what `python ray_job.py preprocess` imports, then cmd_preprocess's own

    ray_job.build_parser()
    for module in ("pipelines.config", "pipelines.retry", "pipelines.settings"):
        importlib.import_module(module)
    from pipelines.preprocess import preprocess
    from pipelines.runtime import init_ray, local_mode_env

    local_mode_env()
    t, c = mark("imports", t, c)
    import ray

    t, c = mark("import_ray", t, c)
    init_ray(dashboard=v["dashboard"], ray_data=v["ray_data"])
    t, c = mark("init_ray", t, c)
    before = harness.tree_cpu_by_pid(os.getpid())
    stats = preprocess([corpus], out, workers=2, progress=False, shards_per_task=v["shards_per_task"])
    t, c = mark("job", t, c)
    job_cpu = harness.cpu_between(before, harness.tree_cpu_by_pid(os.getpid()))
    tree = harness.tree_cpu_by_pid(os.getpid())
    ray.shutdown()
    mark("shutdown", t, c)
    work = sum(s for k, s in stats["stage_cpu_s"].items() if k != "bookkeeping")
    return {"phases": phases, "job_tree_cpu_s": round(job_cpu, 3), "tree_cpu_s": round(sum(tree.values()), 3),
            "processes": len(tree), "shards": stats["shards"], "read": stats["read"], "written": stats["written"],
            "work_cpu_s": round(work, 3), "stage_cpu_s": stats["stage_cpu_s"]}


def run_child(args: list[str], log: str, attempts: int = 3) -> tuple[dict, float, float]:
    """(its RESULT, wall s from outside, CPU s of the processes it reaped). A run whose Ray did
    not come up (the dashboard's start times out on a loaded machine) is run again."""
    for attempt in range(attempts):
        subprocess.run(["rm", "-rf", args[-1]], check=False)
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = harness.run_tree([sys.executable, os.path.abspath(__file__), *args], log, capture=True, timeout=1800)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if run.returncode == 0:
            break
        print(f"{args} failed ({run.returncode}, {run.killed}), attempt {attempt + 1}; see {log}", flush=True)
    else:
        raise SystemExit(f"{args} failed {attempts} times; see {log}")
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    res = {**json.loads(line[-1][len("RESULT "):]), "failed_attempts": attempt}
    return res, run.wall_s, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def whole_command(corpus: str, out: str, log: str) -> dict:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = harness.run_tree([sys.executable, "ray_job.py", "preprocess", corpus, "--output", out, "--quiet",
                            "--workers", "2"], log, timeout=900)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise SystemExit(f"ray_job.py preprocess failed ({run.returncode}); see {log}")
    return {"wall_s": round(run.wall_s, 3), "cpu_s": round((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), 3)}


# ------------------------------------------------------------------------------ the benchmark

def measure(work: str, shards: int, rounds: int, log: str, out_json: str) -> dict:
    one = write_corpus(os.path.join(work, "one"), 1, 1)
    many = write_corpus(os.path.join(work, f"tiny-{shards}"), shards, shards)
    few = write_corpus(os.path.join(work, f"few-{shards}"), shards, FEW)
    runs: list[dict] = []
    n = 0
    for r in range(rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            for kind, corpus in (("startup", one), ("many", many), ("few", few)):
                n += 1
                out = os.path.join(work, f"out-{n}")
                res, wall, cpu = run_child(["--child", variant, corpus, out], log)
                runs.append({"round": r, "variant": variant, "kind": kind, "outside_wall_s": round(wall, 3),
                             "reaped_cpu_s": round(cpu, 3), **res})
                subprocess.run(["rm", "-rf", out], check=False)
                harness.write_json(out_json, {"runs": runs, "partial": True})  # a failed run keeps the rest
        out = os.path.join(work, f"out-cmd-{r}")
        runs.append({"round": r, "variant": "after", "kind": "command", **whole_command(one, out, log)})
        subprocess.run(["rm", "-rf", out], check=False)
    return {"runs": runs, "summary": summarize(runs, shards)}


def summarize(runs: list[dict], shards: int) -> dict:
    med = harness.median
    out: dict = {"shards": shards, "few": FEW}
    for variant in VARIANTS:
        def pick(kind, v=variant):
            return [x for x in runs if x["variant"] == v and x["kind"] == kind]
        st = pick("startup")
        s = {f"{p}_{m}": med([x["phases"][p][m] for x in st], 3)
             for p in ("imports", "import_ray", "init_ray", "job", "shutdown") for m in ("wall_s", "driver_cpu_s")}
        s["startup_tree_cpu_s"] = med([x["tree_cpu_s"] for x in st], 3)
        s["processes"] = med([x["processes"] for x in st], 0)
        s["outside_wall_s"] = med([x["outside_wall_s"] for x in st], 3)
        many, few = pick("many"), pick("few")
        pairs = list(zip(sorted(many, key=lambda x: x["round"]), sorted(few, key=lambda x: x["round"])))
        s["many_job_s"] = med([m["phases"]["job"]["wall_s"] for m in many], 3)
        s["few_job_s"] = med([f["phases"]["job"]["wall_s"] for f in few], 3)
        s["wall_ms_per_shard"] = med([1e3 * (m["phases"]["job"]["wall_s"] - f["phases"]["job"]["wall_s"])
                                      / (shards - FEW) for m, f in pairs], 2)
        s["cpu_ms_per_shard"] = med([1e3 * (m["job_tree_cpu_s"] - f["job_tree_cpu_s"]) / (shards - FEW)
                                     for m, f in pairs], 2)
        s["wall_minus_work_ms_per_shard"] = med([1e3 * (m["phases"]["job"]["wall_s"] - m["work_cpu_s"] / 2) / shards
                                                 for m in many], 2)
        s["written_ok"] = all(x["written"] == x["read"] for x in many + few)
        out[variant] = s
    cmd = [x for x in runs if x["kind"] == "command"]
    out["command"] = {"wall_s": med([x["wall_s"] for x in cmd], 3), "cpu_s": med([x["cpu_s"] for x in cmd], 3)}
    return out


# ------------------------------------------------------------------------------ the tables

def render(results: dict, part: str) -> str:
    s = results["summary"]
    b, a = s["before"], s["after"]
    m = results.get("machine", {})
    load = f"load average at start {harness.loads(m['loadavg_at_start'])}" if m else ""
    if part == "startup":
        rows = [[name, b[f"{p}_wall_s"], a[f"{p}_wall_s"], b[f"{p}_driver_cpu_s"], a[f"{p}_driver_cpu_s"]]
                for name, p in (("imports of the preprocess path", "imports"), ("`import ray`", "import_ray"),
                                ("`init_ray` (embedded Ray)", "init_ray"), ("job of 1 one-sample shard", "job"),
                                ("`ray.shutdown()`", "shutdown"))]
        rows.append(["CPU s of the process tree, whole run", "", "", b["startup_tree_cpu_s"], a["startup_tree_cpu_s"]])
        rows.append(["processes in the tree", b["processes"], a["processes"], "", ""])
        rows.append(["the measuring process, start to end (outside)", b["outside_wall_s"], a["outside_wall_s"], "", ""])
        table = harness.md_table(["phase (median of rounds)", "before wall s", "after wall s",
                                  "before driver CPU s", "after driver CPU s"], rows)
        cmd = s["command"]
        return (f"{table}\n\nThe whole command `ray_job.py preprocess` (after) on that shard: {cmd['wall_s']} s wall, "
                f"{cmd['cpu_s']} CPU s of the processes it reaped. {load}\n")
    rows = [[v, s[v]["many_job_s"], s[v]["few_job_s"], s[v]["wall_ms_per_shard"], s[v]["cpu_ms_per_shard"],
             s[v]["wall_minus_work_ms_per_shard"], "yes" if s[v]["written_ok"] else "NO"] for v in VARIANTS]
    table = harness.md_table([f"variant ({s['shards']} one-sample shards vs the same in {s['few']})",
                              f"job s, {s['shards']} shards", f"job s, {s['few']} shards",
                              "overhead wall ms/shard", "overhead CPU ms/shard", "(wall - work) / shards, ms",
                              "all written"], rows)
    return f"{table}\n\n{len(results['runs'])} runs, {load}\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "CORPUS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, default=2000, help="one-sample shards of the per-shard run (default 2000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of before/after (default 3)")
    ap.add_argument("--workdir", help="keep the corpora here (default: a temporary folder)")
    ap.add_argument("--out", default="bench_out/preprocess_overhead.json")
    ap.add_argument("--summarize", action="store_true",
                    help="summarize the complete rounds of a run cut short (its --out, rewritten in place)")
    ap.add_argument("--load-at-start", type=float, nargs=3, help="with --summarize: the load average it began at")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
        return 0
    if args.summarize:
        with open(args.out) as f:
            runs = json.load(f)["runs"]
        complete = [r for r in {x["round"] for x in runs} if sum(x["round"] == r for x in runs) == 7]
        runs = [x for x in runs if x["round"] in complete]
        result = {"runs": runs, "summary": summarize(runs, next(x["shards"] for x in runs if x["kind"] == "many")),
                  "machine": {**harness.machine(tuple(args.load_at_start)), "loadavg_at_end": None}}
        harness.write_json(args.out, result)
        print(render(result, "startup") + "\n" + render(result, "per_shard"))
        return 0
    load = os.getloadavg()
    os.makedirs("bench_out", exist_ok=True)
    with harness.work_folder(args.workdir, "overhead-") as work:
        result = measure(work, args.shards, args.rounds, os.path.abspath("bench_out/preprocess_overhead.log"),
                         args.out)
    result["machine"] = harness.machine(load)
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=harness.ROOT).stdout.strip()
    harness.write_json(args.out, result)
    print(render(result, "startup"))
    print(render(result, "per_shard"))
    print(harness.load_line(load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
