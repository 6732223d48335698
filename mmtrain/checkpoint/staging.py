"""The save side: each rank writes its part of a checkpoint into a node-local staging folder,
which Ray Train then uploads and merges with the other ranks' parts into one folder of the
store. The rank's done record, hashed here before the upload, is written last: it says what
this rank wrote, so a part cut short in the upload (Ray copies files in no particular order)
or changed later is told apart from a complete one."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict

from ..data_position import DataPosition
from .layout import DS_TAG, TRAIN_STATE, TrainState, done_record, rng_file
from .records import record_of


def staging_dir(run_dir: str, rank: int) -> str:
    """Where a rank writes its part before Ray Train uploads it: node-local, and the same path
    for every save and attempt of the run, so what a killed save left is cleared by the next."""
    run = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "mmtrain-staging", run, f"rank_{rank:05d}")


@contextmanager
def staged_checkpoint(engine, state: TrainState, position: DataPosition, run_config_json: str, rank: int,
                      run_dir: str):
    """Writes this rank's part into its staging dir and yields it (for ray.train.report)."""
    from ..seeding import rng_state  # torch: here, so that importing the checkpoint package (show) stays light

    d = staging_dir(run_dir, rank)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    try:
        engine.save_checkpoint(d, tag=DS_TAG)
        if rank == 0:
            _write(d, "run_config.json", run_config_json)
            _write(d, TRAIN_STATE, json.dumps(asdict(state)))
        else:
            # DeepSpeed's rank-0-only files must come from rank 0 alone in the merged dir
            for name in ("latest", "zero_to_fp32.py"):
                if os.path.exists(os.path.join(d, name)):
                    os.remove(os.path.join(d, name))
        position.save_rank(os.path.join(d, "position"), rank)
        _write(d, rng_file(rank), json.dumps(rng_state(engine.device)))  # this rank's device
        _write(d, done_record(rank), json.dumps(record_of(d)))  # hashes all the files above
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _write(directory: str, name: str, text: str) -> None:
    path = os.path.join(directory, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
