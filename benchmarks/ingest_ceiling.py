"""Training-ingest ceiling: samples/s per CPU core delivered to a consumer that does nothing.

Two loaders read the same preprocessed shards (224 px JPEG crop, caption, float16 80 x 1001
log-mel and metadata per sample; `harness.write_preprocessed_shards`), decode every row the same
way (`pipelines.ingest`'s row decode) and collate batches of 128 with the same
`mmtrain.batch.Collate` (BPE tokenization, image normalization, padding):

  ours  what a training worker runs: `pipelines.ingest.build_dataset` (Ray Data, the epoch clock,
        decode tasks) split as Ray Train splits it (`streaming_split(1, equal=False)`) and
        iterated in a Ray actor with `iter_torch_batches(collate_fn=Collate, prefetch_batches,
        local_shuffle_buffer_size)`, as `mmtrain.worker.Worker.start_pass` does
  peer  `webdataset.WebDataset(shards).shuffle(buffer).map(decode)` + torch `DataLoader(
        num_workers=k, batch_size=128, collate_fn=stack + Collate)`

Each measurement is a fresh process pinned, with everything it starts, to the same k cores
(`harness.pin_to_cores`; Ray gets num_cpus=k). Rounds alternate the order of the loaders;
medians of the rounds are reported. A run is `--epochs` passes over the data (ours: one Ray Data
execution, as a training pass of several epochs is), measured from the end of the first epoch
(every process is up and busy by then, as in a long training run) to the prefetch and shuffle
buffers' worth of samples before the end (those were produced before): both ends of the window
have every buffer full. The time to the first batch, Ray's start-up included, is reported apart.
Samples per CPU-second (CPU of the whole process tree over the window, Ray's own processes
included) is the per-core rate that holds on a busy machine, where the wall-clock rate also
depends on what else runs on the pinned cores.

    python benchmarks/ingest_ceiling.py --samples 1024 --epochs 4 --cores 1 2 --repeats 3
Goal: ours >= peer in samples/s per core.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import harness

harness.single_threaded()
sys.path.insert(0, harness.ROOT)
BENCH = os.path.dirname(os.path.abspath(__file__))
MODES = ("ours", "peer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1024, help="per epoch")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4, help="measured: from the first's end to the buffers' worth before the end")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shuffle-buffer", type=int, default=256,
                   help="rows, both loaders (0: none)")
    p.add_argument("--prefetch", type=int, default=8, help="ours: prefetch_batches (configs/base.json)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--workdir", default=None, help="keeps the shards for the next run")
    p.add_argument("--out", default="bench_out/ingest_ceiling.json")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_config():
    """The base preset's data and text settings (configs/base.json: BPE, batch 128)."""
    from mmtrain.config import load_run_config

    return load_run_config(os.path.join(harness.ROOT, "configs", "base.json"), data_paths=["-"], run_dir="-")


def prepare(work: str, args) -> str:
    """The shards and a BPE tokenizer trained on their captions, made once per --workdir."""
    from mmtrain.tokenizer import build_tokenizer, save_tokenizer
    from pipelines.ingest import captions

    data = os.path.join(work, f"shards-{args.samples}x{args.shards}")
    if not os.path.exists(os.path.join(data, "tokenizer", "tokenizer.json")):
        cfg = run_config()
        shards = harness.write_preprocessed_shards(data, args.samples, args.shards, cfg.data)
        texts = captions(shards[:4], cfg.data, preprocessed=True)
        save_tokenizer(build_tokenizer(cfg.tokenizer, texts=texts, vocab_size=cfg.bpe_vocab_size),
                       os.path.join(data, "tokenizer"))
    return data


def shard_list(data: str) -> list[str]:
    return sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".tar"))


def make_collate(data: str, batch_size: int):
    from mmtrain.batch import Collate
    from mmtrain.tokenizer import load_tokenizer

    cfg = run_config()
    return Collate(load_tokenizer(os.path.join(data, "tokenizer")), batch_size, cfg.model.max_text_len,
                   cfg.data.image.size, cfg.data.audio.n_mels, cfg.data.audio.num_frames)


class Clock:
    """Wall time and CPU seconds of the measured process tree over a window where every buffer
    is full at both ends: from the end of the first epoch (Ray's worker processes are up and
    busy by then, as in a long training run) to `tail` samples before the last batch (the
    prefetched batches and the shuffle buffer at the end were produced before it). Time to the
    first batch, Ray's start-up included, is reported apart."""

    def __init__(self, root_pid: int, started: float, args):
        self.root, self.started, self.samples, self.first, self.marks = root_pid, started, 0, None, []
        tail = (args.prefetch + 2) * args.batch_size + args.shuffle_buffer
        self.at = [args.samples, args.samples * args.epochs - tail]
        if self.at[1] - self.at[0] < args.samples:
            raise SystemExit(f"--epochs {args.epochs} of {args.samples} samples leave too short a window")

    def batch(self, n: int) -> None:
        self.first = self.first or time.monotonic()
        self.samples += n
        if len(self.marks) < 2 and self.samples >= self.at[len(self.marks)]:
            self.marks.append((time.monotonic(), harness.tree_cpu_by_pid(self.root), self.samples))

    def result(self) -> dict:
        (t0, before, n0), (t1, after, n1) = self.marks
        n, cpu = n1 - n0, harness.cpu_between(before, after)
        return {"samples": self.samples, "first_batch_s": round(self.first - self.started, 2),
                "window_from_s": round(t0 - self.started, 2), "window_s": round(t1 - t0, 2), "window_samples": n,
                "samples_per_s": round(n / (t1 - t0), 1), "cpu_s": round(cpu, 2),
                "samples_per_cpu_s": round(n / max(cpu, 1e-9), 1)}


# ------------------------------------------------------------------------------ ours

class Consumer:
    """A training worker without the model: iterates its split as `Worker.start_pass` does."""

    def run(self, split, data: str, args_json: str, root_pid: int, started: float) -> dict:
        args = argparse.Namespace(**json.loads(args_json))
        clock = Clock(root_pid, started, args)
        collate, buffer = make_collate(data, args.batch_size), args.shuffle_buffer or None
        for batch in split.iter_torch_batches(batch_size=args.batch_size, collate_fn=collate,
                                              prefetch_batches=args.prefetch, local_shuffle_buffer_size=buffer,
                                              local_shuffle_seed=1 if buffer else None):
            clock.batch(len(batch["ids"]))
        return clock.result()


def run_ours(data: str, args) -> dict:
    import ray

    from pipelines.ingest import build_dataset, epoch_clock
    from pipelines.runtime import init_ray, local_mode_env

    started = time.monotonic()
    local_mode_env()
    # the actor pickles this module's classes by value; `harness` is imported by name
    os.environ["PYTHONPATH"] = BENCH + os.pathsep + os.environ.get("PYTHONPATH", "")
    init_ray(num_cpus=args.k)
    name = f"ceiling-clock-{time.time_ns()}"
    clock = epoch_clock(name)  # held: a Ray actor lives while a handle to it does
    ray.get(clock.set.remote(0, args.epochs - 1))  # one pass of the epochs, nothing consumed yet
    ds = build_dataset(shard_list(data), run_config().data, seed=0, preprocessed=True, clock_name=name)
    split = ds.streaming_split(1, equal=False)[0]  # what mmtrain.trainer.ExactSplit hands a worker
    consumer = ray.remote(num_cpus=0)(Consumer).remote()
    return ray.get(consumer.run.remote(split, data, json.dumps(vars(args)), os.getpid(), started))


# ------------------------------------------------------------------------------ the peer

def peer_decode(sample: dict, cfg) -> tuple:
    """A webdataset sample (members by extension) -> the arrays of `pipelines.ingest`'s row
    decode, which it calls on the same member bytes."""
    from pipelines.dataset import SAMPLE_MEMBERS
    from pipelines.ingest import _decode_row

    row = {"key": sample["__key__"], "source": sample["__url__"], "position": 0, "audio": None}
    for column, ext in SAMPLE_MEMBERS.items():
        row[column], row[f"{column}_ext"] = sample.get(ext), ext if ext in sample else None
    return (row["key"], row["source"], *_decode_row(row, cfg))


class PeerCollate:
    """Decoded samples -> the numpy batch `pipelines.ingest.decode_batch` makes -> `Collate`."""

    def __init__(self, collate, cfg):
        self.collate, self.cfg = collate, cfg

    def __call__(self, samples: list[tuple]) -> dict:
        import numpy as np

        n, size, a = len(samples), self.cfg.image.size, self.cfg.audio
        b = {"key": np.array([s[0] for s in samples], object), "source": np.array([s[1] for s in samples], object),
             "epoch": np.zeros(n, np.int32), "image": np.zeros((n, size, size, 3), np.uint8),
             "image_present": np.array([s[2] is not None for s in samples]),
             "text": np.array([s[3] or "" for s in samples], object),
             "text_present": np.array([s[3] is not None for s in samples]),
             "mel": np.zeros((n, a.n_mels, a.num_frames), np.float16), "mel_frames": np.zeros(n, np.int32),
             "audio_present": np.array([s[4] is not None for s in samples])}
        for i, (_, _, image, _, mel, frames) in enumerate(samples):
            if image is not None:
                b["image"][i] = image
            if mel is not None:
                t = min(a.num_frames, mel.shape[1])
                b["mel"][i, :, :t], b["mel_frames"][i] = mel[:, :t], min(frames, t)
        return self.collate(b)


def peer_loader(shards: list[str], collate, cfg, *, workers: int, batch_size: int, shuffle_buffer: int):
    import functools

    import torch
    import webdataset as wds

    ds = wds.WebDataset(shards, shardshuffle=len(shards), seed=0, empty_check=False)
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer)
    ds = ds.map(functools.partial(peer_decode, cfg=cfg))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=PeerCollate(collate, cfg),
                                       num_workers=workers, prefetch_factor=4 if workers else None,
                                       persistent_workers=workers > 0)


def run_peer(data: str, args) -> dict:
    started = time.monotonic()
    loader = peer_loader(shard_list(data), make_collate(data, args.batch_size), run_config().data,
                         workers=args.k, batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer)
    clock = Clock(os.getpid(), started, args)
    for _ in range(args.epochs):
        for batch in loader:
            clock.batch(len(batch["ids"]))
    return clock.result()


# ------------------------------------------------------------------------------ the driver

def measure(mode: str, k: int, data: str, args, log: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--k", str(k), "--data", data,
           "--batch-size", str(args.batch_size), "--shuffle-buffer", str(args.shuffle_buffer),
           "--prefetch", str(args.prefetch), "--samples", str(args.samples), "--epochs", str(args.epochs)]
    for attempt in range(1, 4):  # on a busy machine Ray's node may not come up in its 30 s
        run = harness.run_tree(cmd, log, capture=True, timeout=900)
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
        if run.returncode == 0 and lines:
            return {"mode": mode, "cores": k, "attempt": attempt, **json.loads(lines[-1])}
        print(f"{mode} on {k} cores failed ({run.killed or run.returncode}), attempt {attempt}; see {log}", flush=True)
    raise SystemExit(f"{mode} on {k} cores failed 3 times; see {log}")


def summary(results: list[dict], cores: list[int], modes: list[str]) -> list[dict]:
    rows = []
    for k in cores:
        for mode in modes:
            rs = [r for r in results if r["mode"] == mode and r["cores"] == k]
            rate = harness.median([r["samples_per_s"] for r in rs], 1)
            rows.append({"cores": k, "mode": mode, "samples_per_s": rate, "per_core": round(rate / k, 1),
                         "samples_per_cpu_s": harness.median([r["samples_per_cpu_s"] for r in rs], 1),
                         "first_batch_s": harness.median([r["first_batch_s"] for r in rs], 1),
                         "cpu_rounds": [r["samples_per_cpu_s"] for r in rs]})
    return rows


def table(rows: list[dict]) -> str:
    """One row per (cores, loader); the ratios compare ours with the peer at the same cores,
    per CPU-second (the per-core rate) and per wall-clock second on the pinned cores."""
    peer = {r["cores"]: r for r in rows if r["mode"] == "peer"}
    out = []
    for r in rows:
        p = peer.get(r["cores"])
        cpu_ratio = wall_ratio = per_round = ""
        if r["mode"] == "ours" and p:
            cpu_ratio = f"**{harness.ratio(r['samples_per_cpu_s'], p['samples_per_cpu_s'], 2)}**"
            wall_ratio = harness.ratio(r["samples_per_s"], p["samples_per_s"], 2)
            per_round = ", ".join(f"{a / b:.2f}" for a, b in zip(r["cpu_rounds"], p["cpu_rounds"]))
        out.append([r["cores"], r["mode"], f"**{r['samples_per_cpu_s']}**", cpu_ratio, per_round,
                    r["samples_per_s"], r["per_core"], wall_ratio, r["first_batch_s"]])
    return harness.md_table(["cores", "loader", "samples per CPU-s (per core)", "ours / peer", "per round",
                             "samples/s on k pinned cores", "÷ k", "ours / peer (wall)", "first batch after s"], out)


def main() -> None:
    args = parse_args()
    if args.child:
        harness.pin_to_cores(args.k)
        print(json.dumps((run_ours if args.child == "ours" else run_peer)(args.data, args)), flush=True)
        return
    load = os.getloadavg()
    with harness.work_folder(args.workdir, "ingest-ceiling-") as work:
        t0 = time.time()
        data = prepare(work, args)
        print(f"data: {args.samples} samples in {args.shards} shards ({time.time() - t0:.0f} s)", flush=True)
        log, results = os.path.join(work, "runs.log"), []
        for rnd in range(args.repeats):
            for k in args.cores:
                order = args.modes if rnd % 2 == 0 else args.modes[::-1]
                for mode in order:
                    results.append({"round": rnd, **measure(mode, k, data, args, log)})
                    print(json.dumps(results[-1]), flush=True)
        rows = summary(results, args.cores, args.modes)
        harness.write_json(args.out, {"args": {k: v for k, v in vars(args).items() if k not in ("child", "k", "data")},
                                      "summary": rows, "results": results, **harness.machine(load)})
    print("\n" + table(rows))
    print(harness.load_line(load))


if __name__ == "__main__":
    main()
