#!/usr/bin/env python
"""Benchmark of embedding a corpus: the actor pool of `embed` (Ray Data `map_batches`, one model
per actor, `--workers` actors) against the single-process loop `evaluate` ran before it (the
driver iterating the training ingest's batches and calling `model.encode`), on the same data.

  loop     the driver: `build_dataset(...).iter_batches` -> Collate -> `model.encode`, one process
           (Ray Data still reads and decodes in its tasks, as it did for `evaluate`).
  loop_now the same loop with today's batch code: `inputs.embed_rows` (Collate, then the padding
           no row reaches dropped, then `model.encode`), what the actors run per batch: it says
           how much of actors / loop is the pool and how much the batch code.
  actors   `inference.batch_embed.embedded_rows(...)` (the path `embed` and `evaluate` use),
           consumed to its last row on the driver.
  command  `python ray_job.py embed --model M --data D --output OUT --workers N`, timed whole,
           Python and Ray start-up and the Lance write included (only where the command exists).

loop and actors run in their own fresh process with an embedded Ray; their time is from the
model's load to the last vector (Ray's start excluded), with the CPU of their whole process tree
(driver, raylet, Ray workers) over that span: CPU per sample. Every run is also timed whole.
The process and all it starts are pinned to `--cores` cores (2: what the issue's goal is set
on). Rounds are interleaved, the order rotating each round; the tables show medians.
Data: `pipelines.corpus.make_corpus` preprocessed by `pipelines.preprocess` with the model's
data settings, made once under --workdir. Model: `--model` (a run or an export, e.g. the
demo's `work/model.safetensors`), else an untrained model of `--config` (default: the tiny
default) exported to the workdir: speed does not depend on the weights.

    python benchmarks/embed.py --workdir /tmp/embed-bench --out benchmarks/results/embed.json
    python benchmarks/embed.py --quick --workdir /tmp/embed-bench    # a 1-2 minute smoke run
    python benchmarks/tables.py                                       # the README's tables from it
Goal (issue 14): actors >= 1.6x the loop's samples/s on 2 cores.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import harness

harness.single_threaded()
sys.path.insert(0, harness.ROOT)

VARIANTS = ("loop", "loop_now", "actors", "command")
MEASURES = ("samples_per_s", "cpu_ms_per_sample", "seconds", "whole_seconds", "whole_cpu_s", "other_cores",
            "first_vector_s", "then_samples_per_s")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 8192 samples: at 2048 the fixed costs (Ray's workers and the actors starting, the model
    # loading in each) were half of the actors' time, which a corpus worth a cluster never sees
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="model actors of `actors` and `command`")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cores", type=int, default=2, help="pin every measured process to this many cores")
    ap.add_argument("--model", help="a run directory or exported .safetensors (default: an untrained --config model)")
    ap.add_argument("--config", help="the config of the untrained model (default: the tiny default)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="a smoke run: 128 samples in 4 shards, 1 round")
    ap.add_argument("--workdir", help="keep the data and model here for the next run (default: a temporary folder)")
    ap.add_argument("--out", help="results JSON (default: print only)")
    ap.add_argument("--timeout", type=float, default=1800, help="kill a run still going after this many seconds")
    ap.add_argument("--child", choices=("prepare", "loop", "loop_now", "actors"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.samples, args.shards, args.rounds = 128, 4, 1
    return args


# ------------------------------------------------------------------------------ the children

def child_prepare(args) -> None:
    """The model (given, or an untrained one exported) and the preprocessed corpus; prints
    {"model", "data"}. In a child: the parent starts no Ray that would idle beside the runs."""
    from pipelines.corpus import make_corpus
    from pipelines.preprocess import preprocess

    from mmtrain.export import export_untrained

    model = args.model or export_untrained(os.path.join(args.workdir, "untrained.safetensors"), args.config)
    data_cfg = model_data_config(model)
    raw = os.path.join(args.workdir, f"raw-{args.samples}-{args.shards}")
    if not os.path.exists(os.path.join(raw, "_corpus.json")):
        make_corpus(raw, args.samples, args.shards, seed=0)
    tag = hashlib.sha256(json.dumps(data_cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    clean = f"{raw}-clean-{tag}"
    preprocess([raw], clean, cfg=data_cfg, progress=False)
    print(json.dumps({"model": model, "data": clean}))


def model_data_config(model: str):
    from mmtrain.inference.loaded import load_model

    return load_model(model).data_cfg


def child_run(args) -> None:
    """`loop` or `actors` on an embedded Ray; prints {"samples", "seconds", "cpu_s", "other_cores",
    "first_vector_s", "first_rows"} measured from the model's load to the last vector (and to the
    first batch of vectors: the fixed cost of starting)."""
    from pipelines.runtime import init_ray
    from pipelines.shards import expand_shards

    init_ray(num_cpus=args.workers + 2, dashboard=False)  # the actors plus CPUs for read and decode
    shards = expand_shards([args.data])
    t0, cpu0, busy0 = time.perf_counter(), harness.tree_cpu_by_pid(os.getpid()), harness.busy_seconds()
    first: list[tuple[float, int]] = []  # (when, rows) of the first batch of vectors
    samples = (loop(args.model, shards, args.batch_size, first, today=args.child == "loop_now")
               if args.child.startswith("loop") else actors(args.model, shards, args.batch_size, args.workers, first))
    wall = time.perf_counter() - t0
    cpu = harness.cpu_between(cpu0, harness.tree_cpu_by_pid(os.getpid()))
    print(json.dumps({"samples": samples, "seconds": wall, "cpu_s": cpu,
                      "other_cores": max(0.0, harness.busy_seconds() - busy0 - cpu) / wall,
                      "first_vector_s": first[0][0] - t0 if first else None, "first_rows": first[0][1] if first else 0}))


def loop(model: str, shards: list[str], batch_size: int, first: list, today: bool = False) -> int:
    """What `evaluate` did before the actor pool: one model on the driver (`today`: each batch
    through `embed_rows`, the actors' per-batch code)."""
    import torch

    from mmtrain.batch import Collate
    from mmtrain.inference.inputs import embed_rows
    from mmtrain.inference.loaded import load_model
    from pipelines.ingest import build_dataset

    loaded = load_model(model)
    cfg = loaded.data_cfg
    collate = Collate(loaded.tokenizer, batch_size, loaded.model_cfg.max_text_len, cfg.image.size, cfg.audio.n_mels,
                      cfg.audio.num_frames)
    n = 0
    with torch.no_grad():
        for rows in build_dataset(shards, cfg, seed=0, preprocessed=True).iter_batches(
                batch_size=batch_size, batch_format="numpy"):
            if today:
                k = len(embed_rows(rows, loaded)["image"])
            else:
                batch = collate(rows)
                k = len(batch.pop("ids"))
                enc = loaded.model.encode(batch)
                _ = [enc[m][:k].float().numpy() for m in ("image", "text", "audio")]
            n += k
            if not first:
                first.append((time.perf_counter(), k))
    return n


def actors(model: str, shards: list[str], batch_size: int, workers: int, first: list) -> int:
    from mmtrain.inference.batch_embed import embedded_rows

    data_cfg = model_data_config_light(model)
    ds = embedded_rows(model, shards, data_cfg, preprocessed=True, workers=workers, batch_size=batch_size)
    n = 0
    for t in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        n += t.num_rows
        if not first:
            first.append((time.perf_counter(), t.num_rows))
    return n


def model_data_config_light(model: str):
    """The data settings of an exported model from its metadata, without building the model
    (the actors load it; the driver's copy would only add to the time measured)."""
    if not model.endswith(".safetensors"):
        return model_data_config(model)
    from safetensors import safe_open

    from pipelines.config import DataConfig

    with safe_open(model, framework="pt") as f:
        return DataConfig.from_dict(json.loads((f.metadata() or {}).get("data_config") or "{}"))


# ------------------------------------------------------------------------------ the parent

def run_child(args, mode: str, log: str, extra: list[str]) -> tuple[dict, harness.TreeRun]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--workdir", args.workdir,
           "--samples", str(args.samples), "--shards", str(args.shards), "--workers", str(args.workers),
           "--batch-size", str(args.batch_size), *extra]
    run = harness.run_tree(cmd, log, capture=True, timeout=args.timeout)
    if run.returncode != 0 or run.killed:
        raise SystemExit(f"{mode} failed ({run.killed or f'exit {run.returncode}'}); see {log}")
    return json.loads(run.stdout.strip().splitlines()[-1]), run


def command_exists() -> bool:
    r = subprocess.run([sys.executable, os.path.join(harness.ROOT, "ray_job.py"), "embed", "-h"],
                       capture_output=True, env=harness.child_env(), cwd=harness.ROOT)
    return r.returncode == 0


def run_command(args, model: str, data: str, log: str) -> dict:
    """The `embed` command, whole; its table's row count checked against the corpus."""
    out = os.path.join(args.workdir, "embed-out")
    shutil.rmtree(out, ignore_errors=True)  # embed resumes: a table left from before would be skipped
    cmd = [sys.executable, os.path.join(harness.ROOT, "ray_job.py"), "embed", "--model", model, "--data", data,
           "--output", out, "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    run = harness.run_tree(cmd, log, timeout=args.timeout)
    if run.returncode != 0 or run.killed:
        raise SystemExit(f"embed failed ({run.killed or f'exit {run.returncode}'}); see {log}")
    import lance

    rows = lance.dataset(os.path.join(out, "embeddings.lance")).count_rows()
    if rows != args.samples:
        raise SystemExit(f"embed wrote {rows} rows for {args.samples} samples; see {log}")
    return {"samples": rows, "seconds": run.wall_s, "cpu_s": run.cpu_s, "other_cores": run.other_cores}


def one_run(args, variant: str, model: str, data: str, log: str) -> dict:
    if variant == "command":
        inner = run_command(args, model, data, log)
        whole_s, whole_cpu = inner["seconds"], inner["cpu_s"]
    else:
        inner, run = run_child(args, variant, log, ["--model", model, "--data", data])
        whole_s, whole_cpu = run.wall_s, run.cpu_s
        if inner["samples"] != args.samples:
            raise SystemExit(f"{variant} embedded {inner['samples']} of {args.samples} samples")
    then = {}
    if inner.get("first_vector_s") is not None and inner["samples"] > inner["first_rows"]:  # the rate past the start-up
        then = {"first_vector_s": round(inner["first_vector_s"], 2),
                "then_samples_per_s": round((inner["samples"] - inner["first_rows"])
                                            / (inner["seconds"] - inner["first_vector_s"]), 2)}
    return {"samples_per_s": round(inner["samples"] / inner["seconds"], 2), **then,
            "cpu_ms_per_sample": round(1000 * inner["cpu_s"] / inner["samples"], 2),
            "seconds": round(inner["seconds"], 2), "whole_seconds": round(whole_s, 2),
            "whole_cpu_s": round(whole_cpu, 2), "other_cores": round(inner["other_cores"], 2),
            "loadavg_at_end": list(os.getloadavg())}


def main() -> None:
    args = parse_args()
    if args.child == "prepare":
        return child_prepare(args)
    if args.child:
        return child_run(args)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    cores = harness.pin_to_cores(args.cores)  # every child inherits the set
    with harness.work_folder(args.workdir, "embed-bench-") as work:
        args.workdir = work
        log = os.path.join(work, "children.log")
        prepared, _ = run_child(args, "prepare", log, ["--model", args.model] if args.model else
                                (["--config", args.config] if args.config else []))
        names = [v for v in args.variants if v != "command" or command_exists()]
        variants = [{"name": v, "rounds": []} for v in names]
        for rnd in range(args.rounds):
            k = rnd % len(variants)
            for position, v in enumerate(variants[k:] + variants[:k]):
                r = {"round": rnd + 1, "position": position,
                     **one_run(args, v["name"], prepared["model"], prepared["data"], log)}
                v["rounds"].append(r)
                print(json.dumps({"variant": v["name"], **r}), flush=True)
            for v in variants:
                v["median"] = {m: statistics.median(r[m] for r in v["rounds"]) for m in MEASURES
                               if all(m in r for r in v["rounds"])}
            results = {"date": datetime.date.today().isoformat(), "commit": _commit(),
                       "config": {"samples": args.samples, "shards": args.shards, "rounds": rnd + 1,
                                  "workers": args.workers, "batch_size": args.batch_size, "cores": len(cores),
                                  "model": args.model or f"untrained {args.config or 'tiny default'}",
                                  "quick": args.quick},
                       "machine": harness.machine(load_at_start), "variants": variants,
                       "total_seconds": round(time.perf_counter() - started, 1)}
            if args.out:
                harness.write_json(args.out, results)  # after every round: an interrupted run keeps its rounds
    print("\n" + render(results, "") + "\n\n" + render(results, "rounds"))


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=harness.ROOT)
    return r.stdout.strip() or "?"


# ------------------------------------------------------------------------------ the README's tables

ABOUT = {"loop": "single-process loop (`evaluate` before)",
         "loop_now": "single-process loop, the actors' batch code (`embed_rows`)", "actors": "actor pool (`embedded_rows`)",
         "command": "`ray_job.py embed`, whole"}


def render(results: dict, part: str = "") -> str:
    """Markdown from a result file: `""` the medians over rounds, `"rounds"` every round."""
    variants, cfg, m = results["variants"], results["config"], results["machine"]
    if part == "rounds":
        rows = [[r["round"], r["position"] + 1, ABOUT[v["name"]], f"{r['samples_per_s']:.1f}",
                 f"{r['cpu_ms_per_sample']:.1f}", f"{r['seconds']:.1f}", f"{r['whole_seconds']:.1f}",
                 f"{r['other_cores']:.2f}", harness.loads(r["loadavg_at_end"])]
                for v in variants for r in v["rounds"]]
        rows.sort(key=lambda row: (row[0], row[1]))
        return harness.md_table(["round", "order", "variant", "samples/s", "CPU ms/sample", "s", "whole s",
                                 "other cores", "load average at end"], rows)
    if part:
        raise ValueError(f"embed has no table {part!r}")
    loop = next((v["median"] for v in variants if v["name"] == "loop"), {})

    def vs_loop(med: dict, measure: str) -> str:
        return f"{med[measure] / loop[measure]:.2f}x" if measure in med and loop.get(measure) else "-"

    def then(med: dict) -> list[str]:  # the fixed cost of starting, and the rate past it
        if "first_vector_s" not in med:
            return ["-", "-", "-"]
        return [f"{med['first_vector_s']:.1f}", f"{med['then_samples_per_s']:.1f}", vs_loop(med, "then_samples_per_s")]

    rows = [[ABOUT[v["name"]], f"{v['median']['samples_per_s']:.1f}", vs_loop(v["median"], "samples_per_s"),
             f"{v['median']['cpu_ms_per_sample']:.1f}", f"{v['median']['seconds']:.1f}",
             f"{v['median']['whole_seconds']:.1f}", *then(v["median"])] for v in variants]
    smoke = "**A `--quick` smoke run, not a measurement.** " if cfg.get("quick") else ""
    head = (f"{smoke}Run on {results['date']} (commit {results.get('commit', '?')}): {cfg['samples']} samples "
            f"in {cfg['shards']} shards, model {cfg['model']}, batch {cfg['batch_size']}, {cfg['workers']} "
            f"actors, pinned to {cfg['cores']} cores, medians of {cfg['rounds']} interleaved rounds; "
            f"{m['cpus']} CPUs, load average (1/5/15 min) {harness.loads(m['loadavg_at_start'])} at start, "
            f"{harness.loads(m['loadavg_at_end'])} at end. samples/s and CPU from the model's load to the "
            f"last vector (Ray's start excluded; the command: whole); whole s: the process from start to exit; "
            f"first vectors s: from the model's load to the first batch of vectors; then samples/s: the "
            f"rate after it.\n\n")
    return head + harness.md_table(["variant", "samples/s", "vs loop", "CPU ms/sample", "s", "whole s",
                                    "first vectors s", "then samples/s", "then vs loop"], rows)


if __name__ == "__main__":
    main()
