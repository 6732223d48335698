"""What the benchmarks share: measurements in fresh subprocesses with a memory meter over their
whole process tree, CPU meters, medians of repeats, markdown tables and the report's tail.

Each benchmark script imports this module first and calls `single_threaded()` before numpy or
torch is imported: one BLAS thread per process, here and in every child, so that two cores are
shared the same way by every configuration measured.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def single_threaded() -> None:
    for k, v in THREAD_ENV.items():
        os.environ.setdefault(k, v)


def child_env() -> dict:
    """The environment of a measured child: one BLAS thread, its own Ray auth token (no
    ~/.ray/auth_token of another run is read or written) and never RAY_ADDRESS (always a fresh
    embedded Ray, never somebody's cluster)."""
    env = {**os.environ, **THREAD_ENV, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    return env


# ------------------------------------------------------------------------------ CPU meters

def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy so far (all cores, niced work included)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def tree_cpu(root_pid: int | None = None) -> float:
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


def tree_cpu_by_pid(root_pid: int) -> dict[tuple[int, float], float]:
    """CPU seconds of each live process of a tree, by (pid, start time); the difference of two
    such snapshots (`cpu_between`) counts a process that started in between in full and leaves
    out one that ended in between, never a negative amount, as a tree total can be when a
    child ends before its parent reaps it."""
    import psutil

    out = {}
    root = psutil.Process(root_pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            c = p.cpu_times()
            out[(p.pid, p.create_time())] = c.user + c.system
        except psutil.Error:
            pass
    return out


def cpu_between(before: dict, after: dict) -> float:
    return sum(cpu - before.get(proc, 0.0) for proc, cpu in after.items())


class Meter:
    """Wall time, CPU of our process tree and CPU of everything else, over a `with` block."""

    def __enter__(self):
        self.t0, self.cpu0, self.busy0 = time.perf_counter(), tree_cpu(), busy_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = tree_cpu() - self.cpu0
        self.other = max(0.0, busy_seconds() - self.busy0 - self.cpu)
        return False

    def result(self, samples: int) -> dict:
        return {"seconds": round(self.wall, 3), "samples": samples,
                "samples_per_s": round(samples / self.wall, 2),
                "cpu_s": round(self.cpu, 2), "cores_used": round(self.cpu / self.wall, 2),
                "other_cores": round(self.other / self.wall, 2)}


# ------------------------------------------------------------------------------ memory meter

class MemorySampler(threading.Thread):
    """Sum of PSS (USS where PSS can't be read) over a process and its descendants, every
    `interval` seconds: a Ray job's memory is spread over its driver, GCS, raylet and workers."""

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

    def now(self) -> int:
        return self.series[-1][1] if self.series else 0

    def summary(self) -> dict:
        return {"metric": self.metric, "peak_mb": round(self.peak / 2**20, 1),
                "peak_rss_sum_mb": round(self.peak_rss / 2**20, 1), "peak_processes": self.peak_procs}


# ------------------------------------------------------------------------------ a measured run

@dataclass
class TreeRun:
    returncode: int
    wall_s: float
    stdout: str  # only when captured
    killed: str | None  # why the guard killed it
    memory: MemorySampler | None
    cpu_s: float = 0.0  # CPU seconds of the whole process tree (`TreeCpuSampler`, reaped children)
    other_cores: float = 0.0  # cores the rest of the machine used meanwhile


class TreeCpuSampler(threading.Thread):
    """CPU seconds a process tree spends, daemons included: every `interval` seconds the CPU of
    each live process of the tree, the last reading of each (pid, start time) kept. A process
    that ends loses at most its last interval; `run_tree` also counts what the reaped children
    report (`RUSAGE_CHILDREN`) and keeps the larger of the two."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.last: dict[tuple[int, float], float] = {}

    def run(self) -> None:
        import psutil

        while True:
            try:
                self.last.update(tree_cpu_by_pid(self.pid))
            except psutil.Error:
                pass
            if self.stop.wait(self.interval):
                break

    def total(self) -> float:
        return sum(self.last.values())


def kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        procs = []
    proc.kill()  # the driver through Popen, which then reaps it and keeps its exit status
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def run_tree(cmd: list[str], log: str, *, capture: bool = False, sample_memory: bool = False,
             kill_above_gb: float | None = None, timeout: float | None = None) -> TreeRun:
    """Runs `cmd` in a fresh process (`child_env`), its stderr (and its stdout unless
    `capture`) appended to `log` after the command line. With `sample_memory` a
    `MemorySampler` follows its process tree; a tree over `kill_above_gb`, or a run past
    `timeout` seconds, is killed whole: a run that got out of hand must not take a shared
    machine with it."""
    with open(log, "ab") as lf, tempfile.TemporaryFile() as out:
        lf.write(f"\n=== {' '.join(cmd)}\n".encode())
        lf.flush()
        t0, busy0, reaped0 = time.perf_counter(), busy_seconds(), _reaped_cpu()
        proc = subprocess.Popen(cmd, stdout=out if capture else lf, stderr=lf, env=child_env(), cwd=ROOT)
        sampler = MemorySampler(proc.pid) if sample_memory else None
        if sampler:
            sampler.start()
        cpu = TreeCpuSampler(proc.pid)
        cpu.start()
        killed = None
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            now = sampler.now() if sampler else 0
            if kill_above_gb is not None and now > kill_above_gb * 2**30:
                killed = f"killed: {now / 2**30:.1f} GiB > --kill-above-gb {kill_above_gb}"
            elif timeout is not None and time.perf_counter() - t0 > timeout:
                killed = f"killed: still running after --timeout {timeout} s"
            if killed:
                kill_tree(proc)
                proc.wait()
                break
        wall = time.perf_counter() - t0
        cpu.stop.set()
        cpu.join()
        cpu_s = max(cpu.total(), _reaped_cpu() - reaped0)
        other = max(0.0, busy_seconds() - busy0 - cpu_s)
        if sampler:
            sampler.stop.set()
            sampler.join()
        out.seek(0)
        stdout = out.read().decode() if capture else ""
    return TreeRun(proc.returncode, wall, stdout, killed, sampler, round(cpu_s, 2), round(other / wall, 2))


def _reaped_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------ reporting

def median(xs, digits: int = 2):
    return round(statistics.median(xs), digits) if xs else None


def ratio(a, b, digits: int = 3):
    return round(a / b, digits) if a is not None and b else None


def md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(header: list[str], rows: list[list]) -> str:
    """A markdown table: the header, its rule, a line per row."""
    return "\n".join([md_row(header), "|" + "---|" * len(header), *(md_row(r) for r in rows)])


def loads(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def load_line(load_at_start: tuple[float, float, float]) -> str:
    """How busy the machine was: a shared machine's load explains slow rounds."""
    return f"load average (1/5/15 min) at start {loads(load_at_start)}, at end {loads(os.getloadavg())}"


def machine(load_at_start: tuple[float, float, float]) -> dict:
    return {"cpus": os.cpu_count(), "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()}


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


@contextlib.contextmanager
def work_folder(workdir: str | None, prefix: str):
    """`workdir` (kept for the next run: corpora are slow to make), or a temporary folder
    deleted at the end."""
    work = workdir or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(work, exist_ok=True)
    try:
        yield work
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------ CPU budget

def pin_to_cores(k: int) -> list[int]:
    """Restricts this process, and every process it starts from now on (Ray's GCS, raylet and
    workers, DataLoader workers), to the first `k` cores it may run on: two loaders measured
    under the same `k` get exactly the same CPU budget, however many processes each starts."""
    allowed = sorted(os.sched_getaffinity(0))
    if k > len(allowed):
        raise SystemExit(f"asked for {k} cores, this process may use {len(allowed)}")
    os.sched_setaffinity(0, allowed[:k])
    return allowed[:k]


# ------------------------------------------------------------------------------ preprocessed data

def write_preprocessed_shards(out: str, samples: int, shards: int, cfg, *, pool: int = 128,
                              seed: int = 0) -> list[str]:
    """`shards` tar files of `samples` samples in the preprocessed format (`pipelines.dataset`):
    each sample a 224 px JPEG crop (or `cfg.image.size`), a caption, a float16 log-mel of
    `cfg.audio.seconds` and its metadata, exactly as `pipelines.transform.encode_members` stores
    them. `pool` distinct samples (synthetic pictures, captions and speech-like audio, 1-6 s)
    are rendered and repeated under new keys: rendering is the slow part, and an ingest cannot
    tell a repeat from a new sample. Returns the shard paths, sorted."""
    import io
    import tarfile

    import numpy as np

    from pipelines import corpus_samples as C
    from pipelines import audio as A
    from pipelines.transform import Processed, encode_members

    rng = np.random.default_rng(seed)
    size, a = cfg.image.size, cfg.audio
    made = []
    for i in range(pool):
        subj = C.subject(i % 32)
        text = str(rng.choice(C._TEMPLATES)).format(n=subj.name, N=subj.name[0].upper() + subj.name[1:])
        seconds = 1 + 5 * float(rng.random()) ** 2
        wave, valid = A.fit_length(C.render_audio(rng, subj, a.sample_rate, seconds, 1), a)
        made.append(Processed("", "", 0, image=C.render_image(rng, subj, size, size), text=text,
                              mel=A.log_mel(wave, a), mel_frames=A.mel_frames_for(valid, a),
                              image_size=(size, size), audio_seconds=seconds))
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"shard-{s:06d}.tar") for s in range(shards)]
    for s, path in enumerate(paths):
        with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * samples // shards, (s + 1) * samples // shards):
                p = made[i % pool]
                p.key, p.source, p.position = f"s{i:07d}", path, i
                for ext, data in encode_members(p, cfg).items():
                    info = tarfile.TarInfo(f"{p.key}.{ext}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
        os.replace(path + ".tmp", path)
    return paths
