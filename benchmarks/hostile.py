#!/usr/bin/env python
"""Peak memory and wall time of `python ray_job.py preprocess` on bombs vs a clean corpus.

The clean corpus is `make_corpus` output in 5 shards (the last one a `.tar.gz`). Each bomb
replaces one shard by the same shard with one hostile sample in its middle, so every corpus
has the same shards and the same good samples:

  gzip      shard 0: KEY.txt.gz, one gzip member inflating to --gzip-gb GB (10)
  audio     shard 1: KEY.wav, 255 channels, 8-bit, 16 kHz, --audio-seconds s (15: 61 MB, under
            the 64 MiB member cap; 245 MB as float32 frames x channels)
  png16     shard 2: KEY.png, 16-bit grey 9459 x 9459 = 89.47 MP, just under Pillow's cap
            (89.48 MP); refused from its header at the default data.image.max_pixels (50 MP),
            decoded with --max-pixels 90000000
  members   shard 3: one key with 2,000 members of --member-kb KiB (32)
  longname  shard 4 (.tar.gz): a GNU long-name header whose size field says --longname-gb GB
            (4), followed by that many bytes, then the member it names

Every run is the CLI in a fresh process with its own embedded Ray, as a user runs it; the sum
of PSS over its process tree (driver, GCS, raylet, Ray workers) is sampled every 0.2 s (the
sampler of benchmarks/harness.py). A run whose tree passes --kill-above-gb, or that runs
past --timeout, is killed and reported as such (a bomb that got through must not take the
machine with it). Runs: clean, each bomb alone (with 4 clean shards), all bombs together;
--repeats rounds, the order rotating. Goal: every hostile run's peak within 1.5 x the clean
run's, every run finishing (exit 0) in bounded time.

Large runs of zeros are written as one deflate block repeated (a 10 GB gzip member costs
~10 MB and ~20 s, mostly its CRC), and corpora are kept under --workdir for the next run.

    python benchmarks/hostile.py --workdir /tmp/hostile-bench
    python benchmarks/hostile.py --gzip-gb 1 --longname-gb 1 --only clean,gzip,longname
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shutil
import struct
import sys
import tarfile
import time
import zlib

import harness
from harness import ROOT

harness.single_threaded()
sys.path.insert(0, ROOT)
from pipelines.dataset import QUARANTINE_FILE, PreprocessedDataset  # noqa: E402

BOMBS = ("gzip", "audio", "png16", "members", "longname")
SHARDS = 5
_ZCHUNK = 16 << 20
_FORMAT = 3  # of the corpora: in the name of their folder, so an old one is never reused


# ------------------------------------------------------------------------------ streams of zeros

@functools.lru_cache(maxsize=1)
def _zero_block() -> bytes:
    """Raw deflate of _ZCHUNK zeros, ending byte-aligned with the history reset (Z_FULL_FLUSH):
    the same bytes may follow any stream that was itself full-flushed, as often as needed."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return z.compress(bytes(_ZCHUNK)) + z.flush(zlib.Z_FULL_FLUSH)


class GzipSink:
    """A gzip stream written to `f`, whose long runs of zeros cost a few KB per 16 MiB."""

    def __init__(self, f):
        self.f, self.crc, self.size = f, 0, 0
        self.z = zlib.compressobj(6, zlib.DEFLATED, -15)
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # magic, deflate, no flags, mtime 0, OS unknown

    def write(self, data: bytes) -> None:
        self.f.write(self.z.compress(data))
        self.crc, self.size = zlib.crc32(data, self.crc), self.size + len(data)

    def zeros(self, n: int) -> None:
        self.f.write(self.z.flush(zlib.Z_FULL_FLUSH))
        block, chunk = _zero_block(), bytes(_ZCHUNK)
        for _ in range(n // _ZCHUNK):
            self.f.write(block)
            self.crc = zlib.crc32(chunk, self.crc)  # the slow part: ~0.5 s per GB
        self.size += n - n % _ZCHUNK
        self.write(bytes(n % _ZCHUNK))

    def close(self) -> None:
        self.f.write(self.z.flush())
        self.f.write(struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))


class FileSink:
    def __init__(self, f):
        self.f = f

    def write(self, data: bytes) -> None:
        self.f.write(data)

    def zeros(self, n: int) -> None:
        for i in range(0, n, _ZCHUNK):
            self.f.write(bytes(min(_ZCHUNK, n - i)))

    def close(self) -> None:
        pass


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.mtime = size, kind, 0o644, 0
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _member(sink, name: str, data: bytes) -> None:
    sink.write(_header(name, len(data)) + data + bytes(-len(data) % 512))


# ------------------------------------------------------------------------------ the bombs

def gzip_bomb(gb: float) -> bytes:
    buf = io.BytesIO()
    sink = GzipSink(buf)
    sink.zeros(int(gb * 2**30))
    sink.close()
    return buf.getvalue()


def wav_255_channels(seconds: float, sr: int = 16000) -> bytes:
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sr, 255, "PCM_U8", format="WAV") as f:
        block = np.zeros((sr, 255), np.float32)
        for _ in range(int(seconds)):
            f.write(block)
    return buf.getvalue()


def png16_grey(side: int) -> bytes:
    """A 16-bit grey PNG of zeros, side x side, its zlib stream made of repeated zero blocks."""
    raw = side * (1 + 2 * side)  # a filter byte and two bytes a pixel per row, all zero
    body = io.BytesIO()
    body.write(b"\x78\xda")
    block = _zero_block()
    for _ in range(raw // _ZCHUNK):
        body.write(block)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    body.write(z.compress(bytes(raw % _ZCHUNK)) + z.flush())
    body.write(struct.pack(">I", (raw % 65521) << 16 | 1))  # adler32 of zeros: a = 1, b = n

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body.getvalue()) + chunk(b"IEND", b"")


def write_bomb(sink, bomb: str, args) -> None:
    if bomb == "gzip":
        _member(sink, "bomb-gzip.txt.gz", gzip_bomb(args.gzip_gb))
    elif bomb == "audio":
        _member(sink, "bomb-audio.wav", wav_255_channels(args.audio_seconds))
    elif bomb == "png16":
        _member(sink, "bomb-png16.png", png16_grey(9459))
    elif bomb == "members":
        data = bytes(args.member_kb * 1024)
        for i in range(2000):
            _member(sink, f"bomb-members.m{i:04d}", data)
    elif bomb == "longname":
        n = int(args.longname_gb * 2**30)
        name = b"bomb-longname.txt\0"  # tarfile reads all n bytes, then cuts at the first NUL
        sink.write(_header("././@LongLink", n, tarfile.GNUTYPE_LONGNAME) + name)
        sink.zeros(n - len(name) + -n % 512)
        _member(sink, "placeholder.txt", b"the member the long name names")
    else:
        raise ValueError(bomb)


# ------------------------------------------------------------------------------ corpora

def build_corpora(work: str, args) -> dict[str, str]:
    """name -> corpus folder: clean, one per bomb, all. Reused when already complete."""
    from pipelines.corpus import make_corpus
    from pipelines.source import base_plus_ext

    tag = f"v{_FORMAT}-s{args.samples}-g{args.gzip_gb}-a{args.audio_seconds}-m{args.member_kb}-l{args.longname_gb}"
    base = os.path.join(work, f"corpora-{tag}")
    done = os.path.join(base, "_complete")
    names = ["clean", *BOMBS, "all"]
    corpora = {n: os.path.join(base, n) for n in names}
    if os.path.exists(done):
        print(f"[hostile] reusing corpora in {base}", flush=True)
        return corpora
    shutil.rmtree(base, ignore_errors=True)
    t0 = time.perf_counter()
    make_corpus(os.path.join(base, "source"), args.samples, SHARDS, seed=args.seed)
    members = []
    for i in range(SHARDS):
        with tarfile.open(os.path.join(base, "source", f"shard-{i:06d}.tar")) as t:
            members.append([(m.name, t.extractfile(m).read()) for m in t])
    shard_names = [f"shard-{i:06d}.tar" + (".gz" if i == SHARDS - 1 else "") for i in range(SHARDS)]
    shard_files = {}
    for variant in ("clean", *BOMBS):
        for i, name in enumerate(shard_names):
            if variant != "clean" and BOMBS.index(variant) != i:
                continue
            path = os.path.join(base, "shards", variant, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                sink = GzipSink(f) if name.endswith(".gz") else FileSink(f)
                keys = [base_plus_ext(m[0])[0] for m in members[i]]
                half = keys.index(keys[len(keys) // 2])  # the bomb goes between two samples
                for m in members[i][:half]:
                    _member(sink, *m)
                if variant != "clean":
                    write_bomb(sink, variant, args)
                for m in members[i][half:]:
                    _member(sink, *m)
                sink.write(bytes(1024))  # the end-of-archive blocks
                sink.close()
            shard_files[variant, i] = path
            print(f"[hostile]   {variant:<8} {name}: {os.path.getsize(path) / 1e6:.1f} MB on disk", flush=True)
    for corpus in names:
        os.makedirs(corpora[corpus])
        for i, name in enumerate(shard_names):
            own = corpus == "all" or (corpus in BOMBS and BOMBS.index(corpus) == i)
            variant = BOMBS[i] if own else "clean"
            os.link(shard_files[variant, i], os.path.join(corpora[corpus], name))
    open(done, "w").close()
    print(f"[hostile] corpora made in {time.perf_counter() - t0:.1f} s", flush=True)
    return corpora


# ------------------------------------------------------------------------------ one run

def run_preprocess(corpus: str, out: str, log: str, args, config: str | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "ray_job.py"), "preprocess", corpus, "--output", out,
           "--workers", "2"] + (["--config", config] if config else [])
    run = harness.run_tree(cmd, log, sample_memory=True, kill_above_gb=args.kill_above_gb, timeout=args.timeout)
    res = {"exit": run.returncode, "killed": run.killed, "wall_s": round(run.wall_s, 1), **run.memory.summary()}
    output = PreprocessedDataset.find(out) if run.returncode == 0 else None
    if output is not None:
        import pyarrow.parquet as pq

        stats = output.stats
        q = pq.read_table(os.path.join(out, QUARANTINE_FILE)).to_pylist()
        res.update(read=stats["read"], written=stats["written"], quarantined=stats["quarantined"],
                   filtered=stats["filtered"],
                   # a header bomb is refused before its name is known: a shard-level row, key ""
                   bombs={r["key"] or f"shard {os.path.basename(r['source'])}": r["reason"] for r in q
                          if r["key"].startswith("bomb-") or not r["key"]})
    shutil.rmtree(out, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------ report

def summarize(runs: dict[str, list[dict]]) -> dict:
    def med(name, key):
        return harness.median([r[key] for r in runs[name] if r["exit"] == 0], digits=1)

    clean_peak, clean_wall = med("clean", "peak_mb"), med("clean", "wall_s")
    rows = {}
    for name, rs in runs.items():
        peak, wall = med(name, "peak_mb"), med(name, "wall_s")
        worst = max(rs, key=lambda r: r["peak_mb"])
        rows[name] = {
            "ok_runs": sum(r["exit"] == 0 for r in rs), "runs": len(rs), "peak_mb": peak or worst["peak_mb"],
            "peak_ratio": round(peak / clean_peak, 2) if peak and clean_peak else None,
            "wall_s": wall or worst["wall_s"],
            "wall_ratio": round(wall / clean_wall, 2) if wall and clean_wall else None,
            "outcome": _outcome(name, rs),
        }
    hostile = [n for n in rows if n != "clean"]
    goals = {
        "every run exits 0 (none killed, none failed)": all(r["ok_runs"] == r["runs"] for r in rows.values()),
        "every hostile peak <= 1.5 x clean": all((rows[n]["peak_ratio"] or 99) <= 1.5 for n in hostile),
    }
    return {"rows": rows, "goals": goals}


def _outcome(name: str, rs: list[dict]) -> str:
    failed = [r["killed"] or f"exit {r['exit']}" for r in rs if r["exit"] != 0]
    done = [r["bombs"] for r in rs if r.get("bombs") is not None]
    if failed or not done:
        return "; ".join(failed) or "-"
    if name == "clean":
        return "-"
    return ", ".join(f"{k}: {v}" for k, v in sorted(done[0].items())) or "not quarantined"


def table(s: dict) -> str:
    lines = ["| corpus | runs ok | peak PSS MB (median) | / clean | wall s | / clean | the bomb ended as |",
             "|---|---|---|---|---|---|---|"]
    for name, r in s["rows"].items():
        lines.append(f"| {name} | {r['ok_runs']}/{r['runs']} | {r['peak_mb']} | {r['peak_ratio'] or '-'} | "
                     f"{r['wall_s']} | {r['wall_ratio'] or '-'} | {r['outcome']} |")
    lines += [f"| goal: {g} | {'met' if ok else 'NOT met'} | | | | | |" for g, ok in s["goals"].items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100, help="good samples over the 5 shards")
    ap.add_argument("--gzip-gb", type=float, default=10.0)
    ap.add_argument("--audio-seconds", type=int, default=15)
    ap.add_argument("--member-kb", type=int, default=32, help="size of each of the 2,000 members")
    ap.add_argument("--longname-gb", type=float, default=4.0)
    ap.add_argument("--max-pixels", type=int, help="data.image.max_pixels for every run (default: the default)")
    ap.add_argument("--only", help="comma-separated corpora to run (clean,gzip,audio,png16,members,longname,all)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--kill-above-gb", type=float, default=4.0, help="memory guard on each run's process tree")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is killed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the corpora here for the next run (default: a temporary folder)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "hostile.json"))
    args = ap.parse_args()

    started = time.perf_counter()
    load_at_start = os.getloadavg()
    with harness.work_folder(args.workdir, "hostile-bench-") as work:
        log = os.path.join(work, "runs.log")
        corpora = build_corpora(work, args)
        config = None
        if args.max_pixels:
            config = os.path.join(work, "data-config.json")
            with open(config, "w") as f:
                json.dump({"image": {"max_pixels": args.max_pixels}}, f)
        names = [n for n in ["clean", *BOMBS, "all"] if not args.only or n in args.only.split(",")]
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                r = run_preprocess(corpora[name], os.path.join(work, "out"), log, args, config)
                runs[name].append(r)
                print(f"[hostile] round {rep + 1} {name:<9} exit {r['exit']}  peak {r['peak_mb']:8.1f} MB  "
                      f"wall {r['wall_s']:6.1f} s  {r['killed'] or r.get('bombs', '')}", flush=True)
        summary = summarize(runs)
        print()
        print(table(summary))
        print(f"\n{harness.load_line(load_at_start)}; {os.cpu_count()} cpus")
        result = {"config": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")},
                  "machine": harness.machine(load_at_start),
                  "summary": summary, "runs": runs, "total_seconds": round(time.perf_counter() - started, 1)}
        harness.write_json(args.out, result)
        print(f"wrote {args.out}; run logs in {log}")


if __name__ == "__main__":
    main()
