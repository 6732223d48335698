"""Checkpoints: DeepSpeed state + data position + RNG + run config, as one ray.train.Checkpoint.

Layout of a checkpoint directory (every rank writes its own files into a local temp dir;
Ray Train merges all ranks' dirs into one directory in the run's storage):

    ds/ ...                DeepSpeed's files (`engine.save_checkpoint(dir, tag="ds")`)
    latest                 DeepSpeed's tag file (rank 0)
    run_config.json        the resolved run config (rank 0)
    train_state.json       step, epoch, world size, ZeRO stage (rank 0)
    position/rank_N.json   data position (every rank; see data_position.py)
    rng/rank_N.pt          python / numpy / torch RNG states (every rank)
    done/rank_N            written last by each rank: the rank's part is complete

A checkpoint is complete when `done/rank_N` exists for every rank of its world size. A
save killed half-way lacks some of them and is never used (see `latest_complete`).
"""
from __future__ import annotations

import json
import os
import random
import re
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data_position import DataPosition

DS_TAG = "ds"
CKPT_RE = re.compile(r"^checkpoint_(\d{9})$")


@dataclass
class TrainState:
    step: int = 0            # optimizer steps done
    epoch: int = 0
    samples: int = 0         # real samples trained on, all ranks
    world_size: int = 1
    zero_stage: int = 0


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:09d}"


@contextmanager
def staged_checkpoint(engine, state: TrainState, position: DataPosition, run_config_json: str, rank: int):
    """Writes this rank's part into a fresh local dir and yields it (for ray.train.report)."""
    with tempfile.TemporaryDirectory(prefix="mmckpt-") as d:
        engine.save_checkpoint(d, tag=DS_TAG)
        if rank == 0:
            with open(os.path.join(d, "run_config.json"), "w") as f:
                f.write(run_config_json)
            with open(os.path.join(d, "train_state.json"), "w") as f:
                json.dump(asdict(state), f)
        else:
            # DeepSpeed's rank-0-only files must come from rank 0 alone in the merged dir
            for name in ("latest", "zero_to_fp32.py"):
                p = os.path.join(d, name)
                if os.path.exists(p):
                    os.remove(p)
        position.save_rank(os.path.join(d, "position"), rank)
        os.makedirs(os.path.join(d, "rng"), exist_ok=True)
        torch.save(rng_state(), os.path.join(d, "rng", f"rank_{rank:05d}.pt"))
        os.makedirs(os.path.join(d, "done"), exist_ok=True)
        open(os.path.join(d, "done", f"rank_{rank:05d}"), "w").close()
        yield d


def restore(engine, directory: str, rank: int, world_size: int) -> tuple[TrainState, DataPosition]:
    """Loads model/optimizer/scheduler states, the data position and (same world size) RNG."""
    load_path, _ = engine.load_checkpoint(directory, tag=DS_TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")
    with open(os.path.join(directory, "train_state.json")) as f:
        state = TrainState(**json.load(f))
    position = DataPosition.load(os.path.join(directory, "position"))
    rng_file = os.path.join(directory, "rng", f"rank_{rank:05d}.pt")
    if state.world_size == world_size and os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    state.world_size = world_size
    return state, position


def is_complete(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "train_state.json")) as f:
            world = json.load(f)["world_size"]
        done = set(os.listdir(os.path.join(directory, "done")))
    except (OSError, ValueError, KeyError):
        return False
    return all(f"rank_{r:05d}" in done for r in range(world)) and os.path.isdir(os.path.join(directory, DS_TAG))


def list_checkpoints(storage_dir: str) -> list[str]:
    """Checkpoint directories in a local run's Ray Train storage folder, oldest first."""
    if not os.path.isdir(storage_dir):
        return []
    found = [n for n in os.listdir(storage_dir) if CKPT_RE.match(n)]
    return [os.path.join(storage_dir, n) for n in sorted(found)]


def latest_complete(storage_dir: str, log=print) -> str | None:
    """The newest complete checkpoint; incomplete newer ones are named and skipped."""
    for path in reversed(list_checkpoints(storage_dir)):
        if is_complete(path):
            return path
        log(f"skipping incomplete checkpoint {path} (a save was interrupted); using the previous one")
    return None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = False
