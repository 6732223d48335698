"""The workloads of benchmarks/preprocess.py and the check that two of them wrote the same samples.

  ours      the command line `python ray_job.py preprocess CORPUS --output OUT --config CFG
            --quiet` (CFG: JPEG q90), timed whole by the parent: Python and Ray start-up included.
  peer      the command line `python benchmarks/preprocess_peer.py CORPUS OUT` (webdataset +
            DataLoader, 2 workers, none of our pipeline's code), timed whole the same way.
  floor     the same shard work in one process, no Ray: `process_shards` (what each of our
            Ray tasks runs: read, decode, transform, encode, write the shard and its parts) over
            every shard in turn (`preprocess.py --child floor`, prints `RESULT {json}`).
  startup   Ray's start-up alone: `init_ray(dashboard=False, ray_data=False)` on a fresh embedded Ray, as the command runs it
            (`preprocess.py --child startup`, prints `RESULT {json}`).
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import sys
import tarfile
import time

import harness
from harness import Meter

# Our job's settings in this benchmark: the workload (JPEG q90; the rest as default).
OURS_CONFIG = {"image": {"jpeg_quality": 90}}


def _shards(corpus: str) -> list[str]:
    return sorted(glob.glob(os.path.join(corpus, "*.tar")))


def data_config():
    from pipelines.config import DataConfig

    return DataConfig.from_dict(OURS_CONFIG)


def ours_command(corpus: str, dest: str, config_path: str) -> list[str]:
    return [sys.executable, os.path.join(harness.ROOT, "ray_job.py"), "preprocess", corpus, "--output", dest,
            "--config", config_path, "--quiet"]


def peer_command(corpus: str, dest: str) -> list[str]:
    return [sys.executable, os.path.join(harness.ROOT, "benchmarks", "preprocess_peer.py"), corpus, dest,
            "--workers", "2"]


def run_floor(corpus: str, dest: str) -> dict:
    """The job's own shard work (`process_shards`, what each Ray task runs: read, decode,
    transform, encode, write the output shard and its parts) over every shard, in this one
    process, no Ray. Only the commit (a fraction of a second, after the shards) is left out."""
    import shutil

    from pipelines.shard_job import process_shards

    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    cfg = data_config().to_dict()
    with Meter() as m:
        stats = [s for i, url in enumerate(_shards(corpus))
                 for s in process_shards([(url, f"shard-{i:06d}.tar")], dest, {}, None, cfg)]
    stages: dict[str, float] = {}
    for s in stats:  # each shard's own StageClock, as in ours' `_stats.json`
        for k, v in s["stage_cpu_s"].items():
            stages[k] = stages.get(k, 0.0) + v
    return {**m.result(sum(s["counts"]["read"] for s in stats)),
            "written": sum(s["counts"].get("written", 0) for s in stats),
            "stage_cpu_s": {k: round(v, 3) for k, v in stages.items()}}


def run_startup() -> dict:
    from pipelines import runtime

    runtime.local_mode_env()  # what the command does before Ray is imported
    t0, c0 = time.perf_counter(), harness.tree_cpu()
    import ray

    runtime.init_ray(dashboard=False, ray_data=False)  # as `preprocess` starts its embedded Ray
    out = {"ray_startup_s": round(time.perf_counter() - t0, 3), "ray_startup_cpu_s": round(harness.tree_cpu() - c0, 2)}
    ray.shutdown()
    return out


def child_main(mode: str, corpus: str, dest: str | None = None) -> None:
    res = run_floor(corpus, dest) if mode == "floor" else run_startup()
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------ same samples?

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.(.+)$")  # webdataset's key.ext split


def read_outputs(folder: str, exts: tuple[str, ...] = ("jpg", "mel.npy")) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of the output shards' members with those extensions (others: key only)."""
    out: dict[str, dict[str, bytes]] = {}
    for path in _shards(folder):
        with tarfile.open(path) as tar:
            for info in tar:
                m = _KEY_EXT.match(info.name)
                if not info.isfile() or not m:
                    continue
                members = out.setdefault(m.group(1), {})
                if m.group(2) in exts:
                    members[m.group(2)] = tar.extractfile(info).read()
    return out


def compare_outputs(ours: str, peer: str, every: int = 1) -> dict:
    """Keys both wrote, and how far apart their images and log-mels are on every `every`-th
    common key.

    Images: mean |pixel difference| (0-255) per image, as stored, and after both are box-reduced
    4x (to 56 px): the two crop the center differently (ours: the source's center square
    resized; the peer: torchvision's resize, whose longer side is truncated, then a rounded
    crop), up to a pixel apart, which on a detailed photo alone moves the stored mean by several
    levels; the reduced comparison leaves that offset out and keeps colour, exposure and blur.
    Log-mels: per clip, over the bins within 8 of the clip's peak (the range Whisper's
    normalization keeps), the 99th percentile and the largest |log10 difference|. A bin near
    the bottom of that range holds 1e-8 of the peak's power, where a float32 FFT's rounding
    (the peer's) is already visible in log10; the percentile says what the bulk does."""
    import numpy as np
    from PIL import Image

    a, b = read_outputs(ours), read_outputs(peer)
    common = sorted(set(a) & set(b))
    px, px_small, mel_p99, mel_max = [], [], [], []
    for key in common[::max(1, every)]:
        if "jpg" in a[key] and "jpg" in b[key]:
            ia, ib = (Image.open(io.BytesIO(x[key]["jpg"])).convert("RGB") for x in (a, b))
            px.append(float(np.abs(np.asarray(ia, np.int16) - np.asarray(ib, np.int16)).mean()))
            sa, sb = (np.asarray(im.reduce(4), np.int16) for im in (ia, ib))
            px_small.append(float(np.abs(sa - sb).mean()))
        if "mel.npy" in a[key] and "mel.npy" in b[key]:
            ma, mb = (np.load(io.BytesIO(x[key]["mel.npy"])).astype(np.float32) for x in (a, b))
            d = np.abs(ma - mb)[ma >= ma.max() - 8]
            mel_p99.append(float(np.percentile(d, 99)))
            mel_max.append(float(d.max()))

    def spread(xs):
        return {"median": _r(np.median(xs)), "max": _r(max(xs))} if xs else {"median": None, "max": None}
    return {
        "ours_keys": len(a), "peer_keys": len(b), "same_keys": set(a) == set(b), "compared": len(px),
        "only_ours": sorted(set(a) - set(b))[:5], "only_peer": sorted(set(b) - set(a))[:5],
        "pixel_mean_abs_diff": spread(px), "pixel_mean_abs_diff_reduced_4x": spread(px_small),
        "mel_p99_abs_diff": spread(mel_p99), "mel_max_abs_diff": spread(mel_max),
    }


def _r(x: float) -> float:
    return round(float(x), 4)
