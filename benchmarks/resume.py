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
The elastic case (`--elastic-cluster`, its own result file) is Ray Train's own resizing, with no
re-run: `--workers 1-2` on a local 3-node cluster (tests/elastic_run.py) loses a worker node
after step 3 and goes on with 1 worker; once that group is at step 5 a new node joins and the
group grows back to 2. It measures the time from the loss to the first step on 1 worker and
from the join to the first step on 2 (detection, Ray Train's resize check, the universal
conversion and the restart included), and the steps each change ran again.

    python benchmarks/resume.py --elastic-cluster --samples 64 --shards 8 --rounds 1 \
        --out benchmarks/results/resume_elastic.json

"Restart" is the kill for `worker` (detection included) and the new command's start for the
others (a fresh Ray included). The first new step is the first metrics line written after it.
An uninterrupted run of the same command gives the reference loss at the last step and the
time a fresh start takes to its first step. A round runs the reference and every scenario, the
order rotating from round to round (so load from other processes hits all of them alike); the
table shows medians over rounds, and the served twice / never counts summed over all rounds.

    python benchmarks/resume.py --samples 256 --rounds 3 --out benchmarks/results/resume.json
    python benchmarks/tables.py          # the README's tables from it
(~7 min a round on 2 quiet cores.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import harness
from harness import ROOT

sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

SCENARIOS = ("worker", "driver", "save", "elastic")
CHECKPOINT_EVERY = 4


def train_cmd(data: str, run: str, config: str, workers: int = 2) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "ray_job.py"), "train", "--data", data, "--run-dir", run,
            "--config", config, "--epochs", "2", "--batch-size", "8", "--checkpoint-every", str(CHECKPOINT_EVERY),
            "--workers", str(workers), "--deterministic", "--audit-samples"]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MMTRAIN_FAULT_PAUSE")}
    return {**e, "OMP_NUM_THREADS": "1"}


def metrics(run: str) -> list[dict]:
    from mmtrain.metrics import read_metric_lines  # every line: replayed steps too

    return read_metric_lines(run)


def train_worker_pids(proc: subprocess.Popen) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(proc.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(c.cmdline())]


def scenario(name: str, data: str, run: str, config: str, pause_step: int, ids: set) -> dict:
    from mmtrain.audit import check
    from paused_run import start_paused  # the tests' hold-then-kill helper

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
    return {"restart_to_first_step_s": first_new["time"] - restart,
            "resumed_at_step": first_new["step"], "steps_run_again": step + 1 - first_new["step"],
            "served_twice": sum(e["served_twice"] for e in report["epochs"].values()),
            "never_served": sum(e["never_served"] for e in report["epochs"].values()),
            "epochs": len(report["epochs"]), "last_loss": lines[-1]["loss"], "last_step": lines[-1]["step"]}


def uninterrupted(clean: str, config: str, workdir: str) -> dict:
    reference = os.path.join(workdir, "reference")
    shutil.rmtree(reference, ignore_errors=True)
    started = time.time()
    with open(reference + ".log", "w") as log:
        if subprocess.run(train_cmd(clean, reference, config), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                          env=env()).returncode != 0:
            raise RuntimeError(f"the uninterrupted run failed; see {reference}.log")
    lines = metrics(reference)
    return {"seconds": time.time() - started, "last_loss": lines[-1]["loss"],
            "first_step_after_start_s": lines[0]["time"] - started, "steps": lines[-1]["step"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--pause-step", type=int, default=6, help="the kill comes after this step (or in its save)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--workdir", default="bench_out/resume")
    p.add_argument("--out", default="bench_out/resume.json")
    p.add_argument("--elastic-cluster", action="store_true",
                   help="only the elastic case: --workers 1-2 on a local 3-node cluster that loses a node and gets one")
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


def one_round(args, clean: str, ids: set, config: str, rnd: int) -> dict:
    """The reference and every scenario once, in this round's order; each with the load it ran under."""
    order = ["reference", *args.scenarios]
    order = order[rnd % len(order):] + order[:rnd % len(order)]
    out = {"round": rnd + 1, "order": order}
    for name in order:
        with harness.Meter() as meter:
            if name == "reference":
                r = uninterrupted(clean, config, args.workdir)
            else:
                r = scenario(name, clean, os.path.join(args.workdir, name), config, args.pause_step, ids)
        out[name] = {**r, "other_cores": meter.other / meter.wall, "loadavg_at_end": list(os.getloadavg())}
        print(f"round {rnd + 1} {name}: {out[name]}", flush=True)
    for name in args.scenarios:
        out[name]["loss_rel_diff"] = abs(out[name]["last_loss"] - out["reference"]["last_loss"]) / abs(
            out["reference"]["last_loss"])
    return out


def elastic_round(clean: str, ids: set, workdir: str) -> dict:
    """The elastic case once, on a fresh local cluster (tests/elastic_run.py)."""
    import tempfile

    from elastic_run import run_through_loss_and_rejoin, start_cluster, stop_cluster, write_config
    from mmtrain.audit import check

    run = os.path.join(workdir, "elastic-cluster")
    shutil.rmtree(run, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix="rjb-", dir="/tmp")
    try:
        out = run_through_loss_and_rejoin(start_cluster(folder), clean, run,
                                          write_config(os.path.join(workdir, "elastic.json")))
    finally:
        stop_cluster(folder)
    if out["returncode"] != 0:
        raise RuntimeError(f"the elastic run failed; see {run}.log")
    report = check(run, ids)
    return {"loss_to_first_smaller_step_s": out["loss_to_first_smaller_step_s"],
            "join_to_first_larger_step_s": out["join_to_first_larger_step_s"],
            # the holds come after steps 3 and 5, with checkpoints every 2 steps
            "smaller_resumed_at_step": out["first_smaller_step"], "smaller_steps_run_again": 4 - out["first_smaller_step"],
            "larger_resumed_at_step": out["first_larger_step"], "larger_steps_run_again": 6 - out["first_larger_step"],
            "world_sizes": [m["world_size"] for m in out["lines"]],
            "global_batches": sorted({m["global_batch"] for m in out["lines"]}),
            "served_twice": sum(e["served_twice"] for e in report["epochs"].values()),
            "never_served": sum(e["never_served"] for e in report["epochs"].values()),
            "attempts": report["attempts"], "loadavg_at_end": list(os.getloadavg())}


def elastic_main(args, clean: str, ids: set) -> None:
    load_at_start = os.getloadavg()
    rounds = []
    for rnd in range(args.rounds):
        rounds.append({"round": rnd + 1, **elastic_round(clean, ids, args.workdir)})
        print(f"round {rnd + 1}: {rounds[-1]}", flush=True)
        results = {"date": datetime.date.today().isoformat(), "samples": len(ids), "elastic_rounds": rounds,
                   "machine": harness.machine(load_at_start)}
        harness.write_json(args.out, results)
    print("\n" + render(results, "elastic"))


# ------------------------------------------------------------------------------ the README's tables

def _values(results: dict, name: str, key: str) -> list:
    return [r[name][key] for r in results["rounds"]]


def _same(xs: list) -> str:
    """One value when every round agrees, else each distinct one."""
    return "/".join(str(x) for x in sorted(set(xs)))


def _rounds(n: int) -> str:
    return "one round (no median)" if n == 1 else f"{n} interleaved rounds, medians"


def render(results: dict, part: str) -> str:
    """Markdown from a result file: `""` the medians over rounds, `"rounds"` every round."""
    if part == "elastic":
        return _render_elastic(results)
    cfg, m, scenarios = results["config"], results["machine"], results["config"]["scenarios"]
    if part == "rounds":
        rows = [[r["round"], " → ".join(r["order"]), f"{r['reference']['first_step_after_start_s']:.1f}",
                 *(f"{r[s]['restart_to_first_step_s']:.1f}" for s in scenarios),
                 f"{statistics.median(r[n]['other_cores'] for n in r['order']):.2f}",
                 harness.loads(r[r["order"][-1]]["loadavg_at_end"])] for r in results["rounds"]]
        return harness.md_table(["round", "order", "uninterrupted: start → first step, s",
                                 *(f"{s}: restart → first new step, s" for s in scenarios),
                                 "other cores (median)", "load average at end"], rows)
    if part:
        raise ValueError(f"resume has no table {part!r}")
    rows = [[s + (" (2 → 1 worker)" if s == "elastic" else ""),
             f"{statistics.median(_values(results, s, 'restart_to_first_step_s')):.1f}",
             _same(_values(results, s, "resumed_at_step")), _same(_values(results, s, "steps_run_again")),
             sum(_values(results, s, "served_twice")), sum(_values(results, s, "never_served")),
             f"{max(_values(results, s, 'loss_rel_diff')):.2g}"
             + (" (a different global batch: not comparable step for step)" if s == "elastic" else "")]
            for s in scenarios]
    ref = statistics.median(_values(results, "reference", "first_step_after_start_s"))
    head = (f"Run on {results['date']}: {results['samples']} samples, 2 epochs of "
            f"{results['rounds'][0]['reference']['steps'] // 2} steps, kill after step {cfg['pause_step']}; "
            f"{_rounds(len(results['rounds']))}; {m['cpus']} CPUs, load average (1/5/15 min) "
            f"{harness.loads(m['loadavg_at_start'])} at start, {harness.loads(m['loadavg_at_end'])} at end. "
            f"The uninterrupted command took {ref:.1f} s (median) from its start to its first step.\n\n")
    return head + harness.md_table(
        ["scenario", "restart → first new step, s (median)", "resumed at step", "steps run again",
         "served twice (all rounds)", "never served (all rounds)", "last-step loss vs uninterrupted (relative, max)"],
        rows)


def _render_elastic(results: dict) -> str:
    rounds, m = results["elastic_rounds"], results["machine"]
    head = (f"Run on {results['date']}: {results['samples']} samples, 2 epochs, global batch 16, a checkpoint every "
            f"2 steps; {_rounds(len(rounds))}; {m['cpus']} CPUs shared by the cluster's 3 nodes, load average "
            f"(1/5/15 min) {harness.loads(m['loadavg_at_start'])} at start, {harness.loads(m['loadavg_at_end'])} "
            f"at end.\n\n")
    rows = []
    for change, key, at, again in (("node lost: 2 → 1 worker", "loss_to_first_smaller_step_s", "smaller_resumed_at_step",
                                    "smaller_steps_run_again"),
                                   ("node joined: 1 → 2 workers", "join_to_first_larger_step_s",
                                    "larger_resumed_at_step", "larger_steps_run_again")):
        rows.append([change, f"{statistics.median(r[key] for r in rounds):.1f}", _same([r[at] for r in rounds]),
                     _same([r[again] for r in rounds]), _same([r["global_batches"][0] for r in rounds])])
    rows.append(["through both changes", "", "", "", f"served twice {sum(r['served_twice'] for r in rounds)}, "
                 f"never served {sum(r['never_served'] for r in rounds)}"])
    return head + harness.md_table(["change", "to the first step on the new group, s (median)", "resumed at step",
                                    "steps run again", "global batch (every step)"], rows)


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()
    clean, ids, config = prepare(args)
    if args.elastic_cluster:
        return elastic_main(args, clean, ids)
    rounds = []
    for rnd in range(args.rounds):
        rounds.append(one_round(args, clean, ids, config, rnd))
        results = {"date": datetime.date.today().isoformat(), "samples": len(ids),
                   "config": {"pause_step": args.pause_step, "checkpoint_every": CHECKPOINT_EVERY,
                              "scenarios": args.scenarios, "rounds": len(rounds)},
                   "machine": harness.machine(load_at_start), "rounds": rounds}
        harness.write_json(args.out, results)  # after every round: an interrupted run keeps the rounds it ran
    print("\n" + render(results, "") + "\n\n" + render(results, "rounds"))


if __name__ == "__main__":
    main()
