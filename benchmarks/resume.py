"""Resume after a crash: how long from the restart to the first new training step, and how many
samples of each epoch were trained on twice or never (goal: 0 and 0).

Each scenario runs `ray_job.py train` (tiny model, 2 CPU workers, deterministic, audited, one
log line per step) on a local embedded Ray, holds the first attempt after step K with
MMTRAIN_FAULT_PAUSE, then breaks it:
    worker   SIGKILL one training worker process; Ray Train restarts the workers itself
    driver   SIGKILL the whole train command, then run the same command again
    save     the same, but the kill lands inside the save of step K (its files written, not
             uploaded): the run must resume from the checkpoint before
    elastic  SIGKILL the whole command, then run it again with 1 worker instead of 2
"Restart" is the kill for `worker` (detection included) and the new command's start for the
others (a fresh Ray included). The first new step is the first metrics line written after it.
An uninterrupted run of the same command gives the reference loss at the last step.

    python benchmarks/resume.py --samples 256 --out bench_out/resume.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import harness
from harness import ROOT

sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from mmtrain.metrics import read_metric_lines as metrics  # noqa: E402  (every line: replayed steps too)
from paused_run import start_paused  # noqa: E402  (the tests' hold-then-kill helper)

SCENARIOS = ("worker", "driver", "save", "elastic")
CHECKPOINT_EVERY = 4


def train_cmd(data: str, run: str, config: str, workers: int = 2) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "ray_job.py"), "train", "--data", data, "--run-dir", run,
            "--config", config, "--epochs", "2", "--batch-size", "8", "--checkpoint-every", str(CHECKPOINT_EVERY),
            "--workers", str(workers), "--deterministic", "--audit-samples"]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MMTRAIN_FAULT_PAUSE")}
    return {**e, "OMP_NUM_THREADS": "1"}


def train_worker_pids(proc: subprocess.Popen) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(proc.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(c.cmdline())]


def scenario(name: str, data: str, run: str, config: str, pause_step: int, ids: set) -> dict:
    from mmtrain.audit import check

    shutil.rmtree(run, ignore_errors=True)
    cmd = train_cmd(data, run, config)
    # the save scenario is killed inside the first save at or after pause_step
    step = -(-pause_step // CHECKPOINT_EVERY) * CHECKPOINT_EVERY if name == "save" else pause_step
    proc = start_paused(cmd, run, f"{'save' if name == 'save' else 'step'}@{step}:600", env=env())
    before = len(metrics(run))
    if name == "worker":
        os.kill(train_worker_pids(proc)[0], signal.SIGKILL)
        restart = time.time()
        if proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"the run failed; see {run}.log")
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        again = train_cmd(data, run, config, workers=1 if name == "elastic" else 2)
        restart = time.time()
        with open(run + ".rerun.log", "w") as log:
            if subprocess.run(again, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env()).returncode != 0:
                raise RuntimeError(f"the re-run failed; see {run}.rerun.log")
    lines = metrics(run)
    first_new = next(m for m in lines[before:] if m["time"] >= restart)
    report = check(run, ids)
    twice = sum(e["served_twice"] for e in report["epochs"].values())
    never = sum(e["never_served"] for e in report["epochs"].values())
    return {"scenario": name, "restart_to_first_step_s": round(first_new["time"] - restart, 1),
            "resumed_at_step": first_new["step"], "steps_run_again": step + 1 - first_new["step"],
            "served_twice": twice, "never_served": never, "epochs": len(report["epochs"]),
            "last_loss": lines[-1]["loss"], "last_step": lines[-1]["step"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--pause-step", type=int, default=6, help="the kill comes after this step (or in its save)")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--workdir", default="bench_out/resume")
    p.add_argument("--out", default="bench_out/resume.json")
    return p.parse_args()


def prepare(args) -> tuple[str, set, str]:
    """The preprocessed corpus (made once under --workdir), its sample ids, a config that logs every step."""
    from pipelines.runtime import local_mode_env

    local_mode_env()
    from mmtrain.audit import manifest_ids
    from pipelines.corpus import make_corpus
    from pipelines.preprocess import preprocess

    os.makedirs(args.workdir, exist_ok=True)
    raw, clean = os.path.join(args.workdir, "raw"), os.path.join(args.workdir, "clean")
    if not os.path.exists(os.path.join(raw, "_corpus.json")):
        make_corpus(raw, args.samples, args.shards, seed=0, progress=True)
    preprocess([raw], clean, progress=False)
    config = os.path.join(args.workdir, "config.json")
    with open(config, "w") as f:
        json.dump({"train": {"log_every": 1}}, f)
    return clean, manifest_ids([clean]), config


def uninterrupted(clean: str, config: str, workdir: str) -> dict:
    reference = os.path.join(workdir, "reference")
    shutil.rmtree(reference, ignore_errors=True)
    started = time.time()
    with open(reference + ".log", "w") as log:
        if subprocess.run(train_cmd(clean, reference, config), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                          env=env()).returncode != 0:
            raise RuntimeError(f"the uninterrupted run failed; see {reference}.log")
    lines = metrics(reference)
    return {"seconds": round(time.time() - started, 1), "last_loss": lines[-1]["loss"],
            "first_step_after_start_s": round(lines[0]["time"] - started, 1), "steps": lines[-1]["step"]}


def table(results: list[dict]) -> str:
    rows = [[r["scenario"], r["restart_to_first_step_s"], r["resumed_at_step"], r["steps_run_again"],
             r["served_twice"], r["never_served"],
             f"{r['loss_rel_diff']:.1e}" + (" (1 worker)" if r["scenario"] == "elastic" else "")] for r in results]
    return harness.md_table(["scenario", "restart -> first new step, s", "resumed at step", "steps run again",
                             "served twice", "never served", "last-step loss vs uninterrupted"], rows)


def main() -> None:
    args = parse_args()
    clean, ids, config = prepare(args)
    ref = uninterrupted(clean, config, args.workdir)
    print(f"uninterrupted: {ref}", flush=True)
    results = []
    for name in args.scenarios:
        r = scenario(name, clean, os.path.join(args.workdir, name), config, args.pause_step, ids)
        r["loss_rel_diff"] = abs(r["last_loss"] - ref["last_loss"]) / abs(ref["last_loss"])
        print(r, flush=True)
        results.append(r)
    print(f"\n{len(ids)} samples, 2 epochs of {ref['steps'] // 2} steps, kill after step {args.pause_step}; "
          f"uninterrupted run: first step {ref['first_step_after_start_s']} s after the command started\n")
    print(table(results))
    harness.write_json(args.out, {"reference": ref, "scenarios": results, "samples": len(ids)})


if __name__ == "__main__":
    main()
