"""Training ingest: how much of each step the tiny model on 2 CPU workers spends waiting for data.

Makes (or reuses) a synthetic corpus, preprocesses it, trains the default tiny config on a local
embedded Ray for a fixed number of steps, and reads the run's own metrics (`data_wait_frac` is
the time a worker is blocked on the next batch, over its whole step time, averaged over ranks).
The first log window holds the pipeline's start-up and is reported apart from the steady state.
Prefetch depths and epochs per pass (1: one Ray Data execution per epoch, as before passes;
0: automatic, every epoch of this small corpus in one execution) run side by side on the same
data, interleaved over --rounds rounds (the order rotates each round, so load from other
processes hits every variant alike); the table shows medians over rounds, the ratios compare
each variant with the first.

    python benchmarks/train_ingest.py --samples 640 --steps 40 --rounds 3 \
        --out benchmarks/results/train_ingest.json      # ~6 min on 2 quiet cores
    python benchmarks/tables.py                         # the README's tables from it
Goal: data wait under 5% of step time in the steady state.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys

import harness

sys.path.insert(0, harness.ROOT)

MEASURES = ("first_window_data_wait", "steady_data_wait_mean", "steady_data_wait_max",
            "steady_samples_per_s", "fit_seconds", "other_cores")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=640)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
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


def run_variant(args, clean: str, variant: dict) -> dict:
    """One training run of a variant; its data wait read back from the run's own metrics."""
    from mmtrain.config import load_run_config
    from mmtrain.metrics import read_metrics
    from mmtrain.trainer import train

    prefetch, per_pass, buffer = variant["prefetch_batches"], variant["epochs_per_pass"], variant["shuffle_buffer"]
    run = os.path.join(args.workdir, f"run_prefetch{prefetch}_pass{per_pass}_buffer{buffer}")
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_run_config(None, data_paths=[clean], run_dir=run,
                          train={"max_steps": args.steps, "log_every": args.log_every,
                                 "checkpoint_every": 10**6, "prefetch_batches": prefetch,
                                 "epochs_per_pass": per_pass, "shuffle_buffer": buffer})
    with harness.Meter() as meter:
        train(cfg)
    windows = read_metrics(run)
    steady = windows[1:] or windows
    with open(os.path.join(run, "run_config.json")) as f:
        used_buffer = json.load(f)["train"]["shuffle_buffer"]  # a pass of several epochs caps it
    return {
        "shuffle_buffer_used": used_buffer,
        "global_batch": cfg.train.batch_size * cfg.scale.workers,
        "first_window_data_wait": windows[0]["data_wait_frac"],
        "steady_data_wait_mean": statistics.mean(w["data_wait_frac"] for w in steady),
        "steady_data_wait_max": max(w["data_wait_frac"] for w in steady),
        "steady_samples_per_s": statistics.mean(w["samples_per_s"] for w in steady),
        "fit_seconds": meter.wall,
        "other_cores": meter.other / meter.wall,  # CPU the rest of the machine used meanwhile
        "loadavg_at_end": list(os.getloadavg()),
    }


def medians(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in MEASURES}


# ------------------------------------------------------------------------------ the README's tables

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _name(v: dict) -> list:
    return [v["prefetch_batches"], v["shuffle_buffer_used"], v["epochs_per_pass"] or "auto"]


def render(results: dict, part: str) -> str:
    """Markdown from a result file: `""` the medians over rounds, `"rounds"` every round."""
    variants, cfg, m = results["variants"], results["config"], results["machine"]
    if part == "rounds":
        rows = [[r["round"], r["position"] + 1, *_name(v),
                 f"{_pct(r['steady_data_wait_mean'])} / {_pct(r['steady_data_wait_max'])}",
                 _pct(r["first_window_data_wait"]), f"{r['steady_samples_per_s']:.1f}",
                 f"{r['fit_seconds']:.1f}", f"{r['other_cores']:.2f}", harness.loads(r["loadavg_at_end"])]
                for v in variants for r in v["rounds"]]
        rows.sort(key=lambda row: (row[0], row[1]))
        return harness.md_table(["round", "order", "prefetch", "shuffle buffer", "epochs per pass",
                                 "steady data wait (mean / max)", "first window", "samples/s", "fit s",
                                 "other cores", "load average at end"], rows)
    if part:
        raise ValueError(f"train_ingest has no table {part!r}")
    base = variants[0]["median"]["steady_samples_per_s"]
    rows = [[*_name(v), f"{_pct(v['median']['steady_data_wait_mean'])} / {_pct(v['median']['steady_data_wait_max'])}",
             _pct(v["median"]["first_window_data_wait"]), f"{v['median']['steady_samples_per_s']:.1f}",
             f"{v['median']['steady_samples_per_s'] / base:.3f}", f"{v['median']['fit_seconds']:.1f}"]
            for v in variants]
    head = (f"Run on {results['date']}: {cfg['samples']} samples, {cfg['steps']} steps, log window "
            f"{cfg['log_every']} steps, global batch {variants[0]['rounds'][0]['global_batch']}, "
            f"medians of {cfg['rounds']} interleaved rounds; {m['cpus']} CPUs, load average (1/5/15 min) "
            f"{harness.loads(m['loadavg_at_start'])} at start, {harness.loads(m['loadavg_at_end'])} at end, "
            f"other processes used {statistics.median(r['other_cores'] for v in variants for r in v['rounds']):.2f} "
            f"cores (median over runs).\n\n")
    return head + harness.md_table(["prefetch", "shuffle buffer", "epochs per pass", "steady data wait (mean / max)",
                                    "first window", "samples/s", "samples/s vs first", "fit s"], rows)


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()
    clean = prepare(args)
    variants = [{"prefetch_batches": p, "shuffle_buffer": b, "epochs_per_pass": e, "rounds": []}
                for p in args.prefetch for b in args.shuffle_buffer for e in args.epochs_per_pass]
    for rnd in range(args.rounds):
        k = rnd % len(variants)
        for position, v in enumerate(variants[k:] + variants[:k]):  # ABAB..., the first one rotating
            r = {"round": rnd + 1, "position": position, **run_variant(args, clean, v)}
            v["rounds"].append(r)
            print(json.dumps({key: v[key] for key in ("prefetch_batches", "shuffle_buffer", "epochs_per_pass")} | r),
                  flush=True)
        for v in variants:
            v["shuffle_buffer_used"] = v["rounds"][0]["shuffle_buffer_used"]
            v["median"] = medians(v["rounds"])
        results = {"date": datetime.date.today().isoformat(),
                   "config": {"samples": args.samples, "steps": args.steps, "log_every": args.log_every,
                              "rounds": rnd + 1},
                   "machine": harness.machine(load_at_start), "variants": variants}
        harness.write_json(args.out, results)  # after every round: an interrupted run keeps the rounds it ran
    print("\n" + render(results, "") + "\n\n" + render(results, "rounds"))


if __name__ == "__main__":
    main()
