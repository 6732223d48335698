"""The three workloads of benchmarks/preprocess.py, each run in a child process of its own
(`preprocess.py --child MODE`): the same per-sample work on the same corpus, done three ways.

  floor     one process, no Ray, no DataLoader: read + decode + transform + encode, no writing.
  baseline  webdataset + a torch DataLoader with 2 workers, writing one tar per input shard.
  ours      `pipelines.preprocess.preprocess(..., workers=2)` on a fresh embedded Ray.

Each prints one line `RESULT {json}` for the parent.
"""
from __future__ import annotations

import glob
import json
import os
import time

from harness import Meter


def _shards(corpus: str) -> list[str]:
    return sorted(glob.glob(os.path.join(corpus, "*.tar")))


def run_floor(corpus: str) -> dict:
    from pipelines.config import DataConfig
    from pipelines.reasons import SampleError
    from pipelines.source import iter_tar_samples
    from pipelines.tarheaders import ReadLimits
    from pipelines.transform import encode_members, transform_sample

    cfg, n, ok = DataConfig(), 0, 0
    with Meter() as m:
        for url in _shards(corpus):
            for raw in iter_tar_samples(url, limits=ReadLimits.from_config(cfg)):
                n += 1
                try:
                    encode_members(transform_sample(raw, cfg), cfg)
                    ok += 1
                except SampleError:
                    pass
    return {**m.result(n), "written": ok}


class _BaselineTransform:
    """Runs inside a DataLoader worker: wds sample dict -> RawSample -> transform -> members.

    A worker reads whole shards one after the other (wds' split_by_worker), so the position of
    a sample in its shard is a per-URL counter, as in `pipelines.source`."""

    def __init__(self):
        self.positions: dict[str, int] = {}

    def __call__(self, sample: dict):
        import gzip

        from pipelines.config import DataConfig
        from pipelines.reasons import SampleError
        from pipelines.source import RawSample, gzip_member_ext
        from pipelines.transform import encode_members, transform_sample

        url = sample["__url__"]
        pos = self.positions.get(url, 0)
        self.positions[url] = pos + 1
        members = {}
        for ext, data in sample.items():
            if ext.startswith("__"):
                continue
            ext, gz = gzip_member_ext(ext)  # the reader's rule: KEY.txt.gz is KEY.txt
            members[ext] = gzip.decompress(data) if gz else data
        raw = RawSample(sample["__key__"], url, pos, members=members)
        cfg = DataConfig()
        try:
            p = transform_sample(raw, cfg)
        except SampleError:
            return {"url": url, "key": raw.key, "members": None}
        return {"url": url, "key": raw.key, "members": encode_members(p, cfg)}


def _out_name(dest: str, index: dict[str, int], url: str) -> str:
    return os.path.join(dest, f"shard-{index[url]:06d}.tar")


def _write_in_worker(dest: str, index: dict[str, int]):
    """A wds pipeline stage: write each sample into the output tar of its input shard, pass on
    only a small record (the worker holds one open writer at a time)."""
    def stage(src):
        import webdataset as wds

        url, f, writer = None, None, None
        try:
            for s in src:
                if s["url"] != url:
                    if writer is not None:
                        writer.close()
                        f.close()
                    url = s["url"]
                    f = open(_out_name(dest, index, url), "wb")
                    writer = wds.TarWriter(f, encoder=False, mtime=0)
                if s["members"] is not None:
                    writer.write({"__key__": s["key"], **s["members"]})
                yield {"key": s["key"], "written": s["members"] is not None}
        finally:
            if writer is not None:
                writer.close()
                f.close()
    return stage


def run_baseline(corpus: str, dest: str, writer_mode: str) -> dict:
    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader

    import pipelines.transform  # noqa: F401  (imported before the workers fork: they inherit it)

    torch.set_num_threads(1)
    urls = _shards(corpus)
    index = {u: i for i, u in enumerate(urls)}
    os.makedirs(dest, exist_ok=True)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(_BaselineTransform())
    if writer_mode == "worker":
        ds = ds.compose(_write_in_worker(dest, index))
    loader = DataLoader(ds, batch_size=None, num_workers=2, prefetch_factor=4)
    n = ok = 0
    with Meter() as m:
        if writer_mode == "worker":
            for rec in loader:
                n += 1
                ok += rec["written"]
        else:
            writers: dict[str, tuple] = {}
            for s in loader:
                n += 1
                if s["url"] not in writers:
                    f = open(_out_name(dest, index, s["url"]), "wb")
                    writers[s["url"]] = (f, wds.TarWriter(f, encoder=False, mtime=0))
                if s["members"] is not None:
                    writers[s["url"]][1].write({"__key__": s["key"], **s["members"]})
                    ok += 1
            for f, w in writers.values():
                w.close()
                f.close()
    return {**m.result(n), "written": ok}


def run_ours(corpus: str, dest: str, warm: bool) -> dict:
    from pipelines import runtime

    if hasattr(runtime, "local_mode_env"):
        runtime.local_mode_env()  # what the CLI does before Ray is imported
    t0 = time.perf_counter()
    import ray

    from pipelines.runtime import init_ray

    init_ray()
    startup = time.perf_counter() - t0
    from pipelines.preprocess import preprocess

    out: dict = {"ray_startup_s": round(startup, 3)}
    try:
        for label in ("cold", "warm") if warm else ("cold",):
            with Meter() as m:
                stats = preprocess([corpus], os.path.join(dest, label), workers=2, progress=False)
            out[label] = {**m.result(stats["read"]), "written": stats["written"],
                          "worker_seconds": stats["worker_seconds"]}
    finally:
        ray.shutdown()
    return out


def child_main(mode: str, corpus: str, dest: str, baseline_writer: str, warm: bool) -> None:
    if mode == "floor":
        res = run_floor(corpus)
    elif mode == "baseline":
        res = run_baseline(corpus, dest, baseline_writer)
    else:
        res = run_ours(corpus, dest, warm)
    print("RESULT " + json.dumps(res), flush=True)
