"""`pipelines.ingest.decode_batch` CPU per sample: the stored log-mel read by `np.load` (before)
against `pipelines.ingest._load_npy` (now), in one process on the same blocks, alternating.

Data: `--samples` preprocessed samples (`harness.write_preprocessed_shards`, the base preset's
data settings: 224 px JPEG crop, float16 80 x 1001 log-mel, caption, metadata) read by the
training datasource into blocks of 16 rows, the block size `build_dataset` decodes. A round
decodes every block once per variant, in alternating order; CPU time of this process
(`time.process_time`) per sample, medians of the rounds. Both variants' outputs are checked
equal (every key, dtype and value) before timing.

    python benchmarks/decode_batch.py --samples 128 --rounds 9
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

import harness

harness.single_threaded()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()

    import numpy as np

    from ingest_ceiling import run_config
    from pipelines import ingest

    cfg = run_config().data
    with tempfile.TemporaryDirectory() as work:
        shards = harness.write_preprocessed_shards(os.path.join(work, "shards"), args.samples, 1, cfg, pool=32)
        source = ingest.EpochShuffledDatasource(shards, seed=0, preprocessed=True, rows_per_block=16)
        blocks = list(source._reader(shards, source.schema())())
    variants = {"np.load (before)": lambda b: np.load(io.BytesIO(b), allow_pickle=False), "_load_npy": ingest._load_npy}

    def decode(name, block):
        ingest._load_npy = variants[name]
        return ingest.decode_batch(block, cfg)

    for block in blocks:
        a, b = (decode(name, block) for name in variants)
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    us = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            t0 = time.process_time()
            for block in blocks:
                decode(name, block)
            us[name].append((time.process_time() - t0) / args.samples * 1e6)
    before, now = us["np.load (before)"], us["_load_npy"]
    for name, v in us.items():
        print(f"{name:18s} median {statistics.median(v):7.1f} us/sample  rounds {[round(x) for x in v]}")
    ratios = [b / n for b, n in zip(before, now)]
    print(f"before / now per round {[round(x, 2) for x in ratios]}  median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
