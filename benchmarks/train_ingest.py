"""Training ingest: how much of each step the tiny model on 2 CPU workers spends waiting for data.

Makes (or reuses) a synthetic corpus, preprocesses it, trains the default tiny config on a local
embedded Ray for a fixed number of steps, and reads the run's own metrics (`data_wait_frac` is
the time a worker is blocked on the next batch, over its whole step time, averaged over ranks).
The first log window holds the pipeline's start-up and is reported apart from the steady state.
Prefetch depths and epochs per pass (1: one Ray Data execution per epoch, as before passes;
0: automatic, every epoch of this small corpus in one execution) run side by side on the same
data; the ratios compare each variant with the first.

    python benchmarks/train_ingest.py --samples 640 --steps 60 --prefetch 4 --epochs-per-pass 1 0
Goal: data wait under 5% of step time in the steady state.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import harness

sys.path.insert(0, harness.ROOT)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=640)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--prefetch", type=int, nargs="+", default=[4])
    p.add_argument("--epochs-per-pass", type=int, nargs="+", default=[1, 0])
    p.add_argument("--shuffle-buffer", type=int, nargs="+", default=[256],
                   help="rows; a pass of several epochs caps it at a quarter of a worker's epoch")
    p.add_argument("--workdir", default="bench_out/train_ingest")
    p.add_argument("--out", default="bench_out/train_ingest.json")
    return p.parse_args()


def prepare(args) -> str:
    """A local embedded Ray and the preprocessed corpus (the raw one made once under --workdir)."""
    from pipelines.runtime import local_mode_env

    local_mode_env()
    from mmtrain.config import load_run_config
    from mmtrain.trainer import local_cpus
    from pipelines.corpus import make_corpus
    from pipelines.preprocess import preprocess
    from pipelines.runtime import init_ray

    init_ray(num_cpus=local_cpus(load_run_config(None, data_paths=["-"], run_dir="-")))
    raw, clean = os.path.join(args.workdir, "raw"), os.path.join(args.workdir, "clean")
    if not os.path.exists(os.path.join(raw, "_corpus.json")):
        make_corpus(raw, args.samples, 8, seed=0, progress=True)
    preprocess([raw], clean, progress=False)
    return clean


def run_variant(args, clean: str, prefetch: int, per_pass: int, buffer: int) -> dict:
    """One training run; its data wait read back from the run's own metrics."""
    from mmtrain.config import load_run_config
    from mmtrain.metrics import read_metrics
    from mmtrain.trainer import train

    run = os.path.join(args.workdir, f"run_prefetch{prefetch}_pass{per_pass}_buffer{buffer}")
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_run_config(None, data_paths=[clean], run_dir=run,
                          train={"max_steps": args.steps, "log_every": args.log_every,
                                 "checkpoint_every": 10**6, "prefetch_batches": prefetch,
                                 "epochs_per_pass": per_pass, "shuffle_buffer": buffer})
    started = time.time()
    train(cfg)
    wall = time.time() - started
    windows = read_metrics(run)
    steady = windows[1:] or windows
    return {
        "prefetch_batches": prefetch,
        "epochs_per_pass": per_pass,
        # what the run used (a pass of several epochs caps the buffer)
        "shuffle_buffer": json.load(open(os.path.join(run, "run_config.json")))["train"]["shuffle_buffer"],
        "steps": args.steps,
        "global_batch": cfg.train.batch_size * cfg.scale.workers,
        "first_window_data_wait": round(windows[0]["data_wait_frac"], 4),
        "steady_data_wait_mean": round(statistics.mean(w["data_wait_frac"] for w in steady), 4),
        "steady_data_wait_max": round(max(w["data_wait_frac"] for w in steady), 4),
        "steady_samples_per_s": round(statistics.mean(w["samples_per_s"] for w in steady), 1),
        "fit_seconds": round(wall, 1),
    }


def table(results: list[dict]) -> str:
    base = results[0]["steady_samples_per_s"]
    rows = [[r["prefetch_batches"], r["shuffle_buffer"], r["epochs_per_pass"] or "auto",
             f"{100 * r['steady_data_wait_mean']:.1f}% / {100 * r['steady_data_wait_max']:.1f}%",
             f"{100 * r['first_window_data_wait']:.1f}%", r["steady_samples_per_s"],
             f"{r['steady_samples_per_s'] / base:.3f}", r["fit_seconds"]] for r in results]
    return harness.md_table(["prefetch", "shuffle buffer", "epochs per pass", "steady data wait (mean / max)",
                             "first window", "samples/s", "samples/s vs first", "fit s"], rows)


def main() -> None:
    args = parse_args()
    clean = prepare(args)
    results = []
    for prefetch in args.prefetch:
        for buffer in args.shuffle_buffer:
            for per_pass in args.epochs_per_pass:
                results.append(run_variant(args, clean, prefetch, per_pass, buffer))
                print(json.dumps(results[-1]))
    harness.write_json(args.out, {"results": results, "cpus": os.cpu_count()})
    print("\n" + table(results))


if __name__ == "__main__":
    main()
