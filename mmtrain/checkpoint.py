"""Checkpoints: DeepSpeed state + data position + RNG + run config, as one ray.train.Checkpoint.

Layout of a checkpoint directory (every rank writes its own files into a local temp dir;
Ray Train merges all ranks' dirs into one directory in the run's storage):

    ds/ ...                DeepSpeed's files (`engine.save_checkpoint(dir, tag="ds")`)
    latest                 DeepSpeed's tag file (rank 0)
    run_config.json        the resolved run config (rank 0)
    train_state.json       step, epoch, world size, ZeRO stage (rank 0)
    position/rank_N.json   data position (every rank; see data_position.py)
    rng/rank_N.pt          python / numpy / torch RNG states (every rank)
    done/rank_N            written last by each rank: the size of every file of its part
    ds_universal/          only after an elastic resume: DeepSpeed's universal checkpoint

A checkpoint is complete when `done/rank_N` exists for every rank of its world size and every
file it lists has the listed size. A save killed half-way (in DeepSpeed's write or in Ray's
upload, which copies files in no particular order) fails that check, as does a file that was
truncated later, and is never loaded: `select` falls back to the previous complete one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data_position import DataPosition

DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"  # DeepSpeed's world-size-free format, made on an elastic resume
# checkpoint_<step>, or checkpoint_<step>_r<n> when an abandoned folder holds the plain name
CKPT_RE = re.compile(r"^checkpoint_(\d{9})(?:_r(\d+))?$")
ABANDONED = "ABANDONED"  # marker in an emptied folder of an abandoned save (see discard_newer)


@dataclass
class TrainState:
    step: int = 0            # optimizer steps done
    epoch: int = 0
    samples: int = 0         # real samples trained on, all ranks
    world_size: int = 1
    zero_stage: int = 0


def checkpoint_name(step: int, taken: frozenset[str] | set[str] = frozenset()) -> str:
    """The folder name for a save of `step`: never one in `taken` (folders already in storage,
    abandoned ones included), so Ray Train never tracks two checkpoints at one path."""
    name, n = f"checkpoint_{step:09d}", 0
    while (f"{name}_r{n}" if n else name) in taken:
        n += 1
    return f"{name}_r{n}" if n else name


def staging_dir(run_dir: str, rank: int) -> str:
    """Where a rank writes its part before Ray Train uploads it: node-local, and the same path
    for every save and attempt of the run, so what a killed save left is cleared by the next."""
    run = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "mmtrain-staging", run, f"rank_{rank:05d}")


@contextmanager
def staged_checkpoint(engine, state: TrainState, position: DataPosition, run_config_json: str, rank: int,
                      run_dir: str):
    """Writes this rank's part into its staging dir and yields it (for ray.train.report)."""
    d = staging_dir(run_dir, rank)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    try:
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
        sizes = {os.path.relpath(os.path.join(root, n), d): os.path.getsize(os.path.join(root, n))
                 for root, _, names in os.walk(d) for n in names}
        os.makedirs(os.path.join(d, "done"), exist_ok=True)
        with open(os.path.join(d, "done", f"rank_{rank:05d}"), "w") as f:
            json.dump(sizes, f)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def restore(engine, directory: str, rank: int, world_size: int, universal: bool = False
            ) -> tuple[TrainState, DataPosition]:
    """Loads model/optimizer/scheduler states, the data position and (same world size) RNG.
    `universal`: from the universal copy (the engine was built with load_universal)."""
    load_path, _ = engine.load_checkpoint(directory, tag=UNIVERSAL_TAG if universal else DS_TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")
    state = saved_state(directory)
    position = DataPosition.load(os.path.join(directory, "position"))
    rng_file = os.path.join(directory, "rng", f"rank_{rank:05d}.pt")
    if state.world_size == world_size and os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    state.world_size = world_size
    return state, position


def problem(directory: str) -> str | None:
    """Why the checkpoint cannot be loaded, or None if it is complete."""
    try:
        with open(os.path.join(directory, "train_state.json")) as f:
            world = json.load(f)["world_size"]
    except (OSError, ValueError, KeyError):
        return "train_state.json is missing or unreadable"
    for r in range(world):
        try:
            with open(os.path.join(directory, "done", f"rank_{r:05d}")) as f:
                sizes = json.load(f)
        except (OSError, ValueError):
            return f"rank {r} of {world} did not finish its part"
        for name, size in sizes.items():
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                return f"{name} (rank {r}) is missing"
            if os.path.getsize(path) != size:
                return f"{name} (rank {r}) has {os.path.getsize(path)} bytes, {size} were written"
    return None


def is_complete(directory: str) -> bool:
    return problem(directory) is None


def checkpoint_folders(storage_dir: str) -> list[str]:
    """Names of every checkpoint folder in storage, abandoned ones included."""
    if not os.path.isdir(storage_dir):
        return []
    return [n for n in os.listdir(storage_dir) if CKPT_RE.match(n)]


def list_checkpoints(storage_dir: str) -> list[str]:
    """Checkpoint directories in a local run's Ray Train storage folder, oldest first, without
    the folders of abandoned saves."""
    found = [n for n in checkpoint_folders(storage_dir)
             if not os.path.exists(os.path.join(storage_dir, n, ABANDONED))]
    return [os.path.join(storage_dir, n) for n in sorted(found, key=_order)]


def _order(name: str) -> tuple[int, int]:
    m = CKPT_RE.match(os.path.basename(name.rstrip("/")))
    return int(m.group(1)), int(m.group(2) or 0)


def step_of(path: str) -> int:
    return _order(path)[0]


def latest_complete(storage_dir: str, log=print, *, newest: str | None = None) -> str | None:
    """The newest complete checkpoint (no newer than `newest`, if given); incomplete newer
    ones are named, with the reason, and skipped."""
    for path in reversed(list_checkpoints(storage_dir)):
        if newest is not None and step_of(path) > step_of(newest):
            continue
        why = problem(path)
        if why is None:
            return path
        log(f"checkpoint {os.path.basename(path)} is incomplete ({why}): a save was interrupted "
            f"or files were lost; falling back to the previous complete checkpoint")
    return None


def select(registered: str | None, storage_dir: str, log=print) -> str | None:
    """The checkpoint to resume from: the one Ray Train registered last if it is complete,
    else the newest complete one before it. With nothing registered (a run whose Ray Train
    snapshot is gone), the newest complete one in storage."""
    if registered is not None and problem(registered) is None:
        return registered
    return latest_complete(storage_dir, log, newest=registered)


def discard_newer(storage_dir: str, step: int, log=print) -> None:
    """Checkpoint folders newer than the one resumed from belong to an abandoned attempt (an
    interrupted save, or one registered and damaged later). Their files go; the folder stays,
    empty but for a marker: Ray Train may still list it and delete it when it rotates it out
    (its delete fails the whole run if the folder is gone), and the new attempt's saves of
    those steps take other names (`checkpoint_name`)."""
    for path in list_checkpoints(storage_dir):
        if step_of(path) > step:
            log(f"removing {os.path.basename(path)}: written by an interrupted attempt after the "
                f"checkpoint this run resumes from")
            for name in os.listdir(path):
                target = os.path.join(path, name)
                shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else os.remove(target)
            with open(os.path.join(path, ABANDONED), "w") as f:
                f.write(f"abandoned: a later attempt resumed from step {step}\n")


def saved_state(directory: str) -> TrainState:
    with open(os.path.join(directory, "train_state.json")) as f:
        return TrainState(**json.load(f))


def needs_universal(directory: str, world_size: int) -> bool:
    """ZeRO 1-3 partition optimizer states (stage 3: parameters too) by rank, so DeepSpeed can
    load them only at the world size that wrote them; stage 0 keeps whole states per file."""
    saved = saved_state(directory)
    return saved.world_size != world_size and saved.zero_stage >= 1


def ensure_universal(directory: str, log=print) -> None:
    """Converts the checkpoint's ZeRO files to DeepSpeed's universal checkpoint (one file per
    parameter, any world size can load it) with DeepSpeed's own converter, once: into a
    temporary folder renamed into place, so a conversion killed half-way is redone."""
    target = os.path.join(directory, UNIVERSAL_TAG)
    if os.path.isdir(target):
        return
    tmp = os.path.join(directory, f".{UNIVERSAL_TAG}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"converting {os.path.basename(directory)} to a universal checkpoint for the new worker count")
    r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                        "--input_folder", os.path.join(directory, DS_TAG), "--output_folder", tmp,
                        "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"DeepSpeed could not convert {directory} to a universal checkpoint: {last}")
    os.replace(tmp, target)


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
