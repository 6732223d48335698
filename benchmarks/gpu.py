"""Training on one GPU: throughput and efficiency of the tiny and base presets, bf16, ZeRO-2,
one Ray Train worker, torch.compile off and on; then the CPU-equivalence tests on CUDA.

One command, about 8 minutes on one H100/H200-class GPU (`--budget-s`, default 480, bounds it):

    python benchmarks/gpu.py --out OUT                         # on a GPU machine with a CUDA torch
    python benchmarks/gpu.py --device cpu --quick --out OUT    # the script end to end on CPUs (tiny, fp32)

It makes a synthetic corpus and preprocesses it (`ray_job.py make-corpus` and `preprocess`),
then trains each variant with `ray_job.py train ... --gpus-per-worker 1` on a fresh embedded Ray
(a subprocess each, killed past its share of the budget) and reads the run's own metrics.jsonl:
samples/s, tokens/s, tflops_per_s, mfu, data_wait_frac (means over the log lines after
`--warmup-steps`: the first lines hold start-up and compilation) and the peak of
gpu_mem_allocated_gb / gpu_mem_reserved_gb. Metrics a run does not log show as n/a. Last it runs
`pytest tests/test_speed_switches.py` with MMTRAIN_TEST_DEVICE=cuda. It prints a markdown table
and writes OUT/gpu.json, OUT/gpu.md and every child's output in OUT/gpu.log.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import harness

harness.single_threaded()
sys.path.insert(0, harness.ROOT)

METRICS = ("samples_per_s", "tokens_per_s", "tflops_per_s", "mfu", "data_wait_frac")
PEAKS = ("gpu_mem_allocated_gb", "gpu_mem_reserved_gb")
SPEED_TESTS = "tests/test_speed_switches.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu.json, gpu.md and gpu.log")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny only, compile off, few steps: proves the script runs")
    p.add_argument("--presets", nargs="+", help="default: base tiny (base first: its goal) (--quick: tiny)")
    p.add_argument("--compile", nargs="+", choices=("off", "on"), help="default: off on (--quick: off)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 60; --quick 6)")
    p.add_argument("--log-every", type=int, help="steps per metrics line (default 10; --quick 2)")
    p.add_argument("--warmup-steps", type=int, help="metrics lines up to this step are left out (default 20; "
                                                    "--quick 2)")
    p.add_argument("--batch-size", type=int, help="samples per step (default 128 on cuda, 16 on cpu)")
    p.add_argument("--samples", type=int, help="corpus size, served epoch after epoch (default 1024; --quick 128)")
    p.add_argument("--cpus-per-worker", type=float, default=2,
                   help="CPUs the training worker holds; the rest of the machine feeds its ingest (default 2)")
    p.add_argument("--budget-s", type=float, default=480, help="the whole benchmark's wall-clock limit (default 480)")
    p.add_argument("--skip-tests", action="store_true", help=f"do not run {SPEED_TESTS}")
    p.add_argument("--workdir", help="corpus and runs (default: a temporary folder, deleted at the end)")
    args = p.parse_args(argv)
    quick = args.quick
    args.presets = args.presets or (["tiny"] if quick else ["base", "tiny"])
    args.compile = args.compile or (["off"] if quick else ["off", "on"])
    args.steps = args.steps or (6 if quick else 60)
    args.log_every = args.log_every or (2 if quick else 10)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (2 if quick else 20)
    args.batch_size = args.batch_size or (128 if args.device == "cuda" else 16)
    args.samples = args.samples or (128 if quick else 1024)
    return args


def device_info(device: str) -> dict:
    """What the measurements ran on; a machine without the device asked for is a one-line exit."""
    import torch

    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"error: torch {torch.__version__} sees no CUDA device: install a CUDA build of torch (on Linux "
                     f"x86_64, PyPI's torch wheel is one: pip install torch==2.13.0), or pass --device cpu")
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def cli(args, budget: Budget, *argv) -> harness.TreeRun:
    """`python ray_job.py ARGV` in a fresh process (its own embedded Ray), output to OUT/gpu.log,
    killed when the budget runs out."""
    cmd = [sys.executable, os.path.join(harness.ROOT, "ray_job.py"), *map(str, argv)]
    return harness.run_tree(cmd, os.path.join(args.out, "gpu.log"), timeout=max(1.0, budget.left()))


def make_data(args, work: str, budget: Budget) -> str:
    raw, clean = os.path.join(work, "raw"), os.path.join(work, "clean")
    if not os.path.exists(os.path.join(clean, "_stats.json")):
        for argv in (("make-corpus", raw, "--samples", args.samples, "--shards", 16),
                     ("preprocess", raw, "--output", clean, "--quiet")):
            run = cli(args, budget, *argv)
            if run.returncode != 0:
                sys.exit(f"error: {argv[0]} failed ({run.killed or f'exit {run.returncode}'}); see {args.out}/gpu.log")
    return clean


def train_variant(args, clean: str, work: str, preset: str, compiled: bool, budget: Budget) -> dict:
    """One training run and what its metrics.jsonl says after the warm-up."""
    from mmtrain.metrics import read_metrics

    gpu = args.device == "cuda"
    precision = "bf16" if gpu else "fp32"  # DeepSpeed's bf16 is a GPU path
    run = os.path.join(work, f"run-{preset}-compile-{'on' if compiled else 'off'}")
    result = {"preset": preset, "compile": compiled, "precision": precision, "zero_stage": 2, "workers": 1,
              "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup_steps}
    if budget.left() < 30:
        return {**result, "status": "skipped: the budget is spent"}
    argv = ["train", "--data", clean, "--run-dir", run, "--preset", preset, "--precision", precision,
            "--zero-stage", 2, "--workers", 1, "--gpus-per-worker", 1 if gpu else 0, "--max-steps", args.steps,
            "--batch-size", args.batch_size, "--checkpoint-every", 10**6, "--set", f"train.log_every={args.log_every}",
            "--set", f"scale.cpus_per_worker={args.cpus_per_worker}", *(["--compile"] if compiled else [])]
    started = time.perf_counter()
    proc = cli(args, budget, *argv)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        return {**result, "status": proc.killed or f"failed: exit {proc.returncode} (see gpu.log)"}
    lines = [m for m in read_metrics(run) if m["step"] > args.warmup_steps] or read_metrics(run)[-1:]
    result.update(status="ok", measured_steps=[m["step"] for m in lines])
    for key in METRICS:
        values = [m[key] for m in lines if m.get(key) is not None]
        result[key] = round(statistics.mean(values), 4) if values else None
    for key in PEAKS:
        values = [m[key] for m in lines if m.get(key) is not None]
        result[key] = round(max(values), 2) if values else None
    shutil.rmtree(os.path.join(run, "train"), ignore_errors=True)  # its checkpoints: GBs for base
    return result


def speed_tests(args, budget: Budget) -> dict:
    """The CPU-equivalence tests of the speed switches, on the benchmark's device."""
    path = os.path.join(harness.ROOT, SPEED_TESTS)
    if args.skip_tests:
        return {"status": "skipped (--skip-tests)"}
    if not os.path.exists(path):
        return {"status": f"skipped: {SPEED_TESTS} is not in this tree"}
    if budget.left() < 30:
        return {"status": "skipped: the budget is spent"}
    os.environ["MMTRAIN_TEST_DEVICE"] = args.device  # child_env copies os.environ
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", SPEED_TESTS]
    run = harness.run_tree(cmd, os.path.join(args.out, "gpu.log"), capture=True, timeout=max(1.0, budget.left()))
    summary = ([line for line in run.stdout.splitlines() if line.strip()] or [""])[-1]
    return {"status": "passed" if run.returncode == 0 else (run.killed or "failed"), "device": args.device,
            "summary": summary.strip("= "), "wall_s": round(run.wall_s, 1)}


def fmt(value, digits: int = 1, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.{digits}f}%" if percent else f"{value:,.{digits}f}"


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["preset"], "on" if r["compile"] else "off", r["precision"], r["batch_size"], r["status"],
                         *[""] * 6])
            continue
        memory = f"{fmt(r['gpu_mem_allocated_gb'])} / {fmt(r['gpu_mem_reserved_gb'])}"
        rows.append([r["preset"], "on" if r["compile"] else "off", r["precision"], r["batch_size"],
                     fmt(r["samples_per_s"]), fmt(r["tokens_per_s"], 0), fmt(r["tflops_per_s"], 2),
                     fmt(r["mfu"], percent=True), memory, fmt(r["data_wait_frac"], percent=True), r["wall_s"]])
    return harness.md_table(["preset", "compile", "precision", "batch", "samples/s", "tokens/s", "TFLOP/s",
                             "MFU", "peak GPU memory GB (allocated / reserved)", "data wait", "run s"], rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    budget, load = Budget(args.budget_s), os.getloadavg()
    info = device_info(args.device)
    results = []
    with harness.work_folder(args.workdir, "gpu-bench-") as work:
        clean = make_data(args, work, budget)
        for preset in args.presets:
            for mode in args.compile:
                results.append(train_variant(args, clean, work, preset, mode == "on", budget))
                print(results[-1], flush=True)
    tests = speed_tests(args, budget)
    report = table(results) + f"\n\nspeed-switch tests on {args.device}: {tests['status']}" + (
        f" ({tests['summary']})" if tests.get("summary") else "")
    head = (f"{info.get('gpu', 'CPU')}, torch {info['torch']} (CUDA {info['cuda']}), {info['cpus']} CPUs; "
            f"{args.steps} steps, log every {args.log_every}, lines after step {args.warmup_steps} averaged")
    harness.write_json(os.path.join(args.out, "gpu.json"), {"machine": {**info, **harness.machine(load)},
                                                            "args": vars(args), "results": results,
                                                            "speed_tests": tests})
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(head + "\n\n" + report + "\n")
    print("\n" + head + "\n\n" + report + "\n" + harness.load_line(load))


if __name__ == "__main__":
    main()
