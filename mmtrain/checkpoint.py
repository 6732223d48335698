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

Checkpoint paths are local paths or fsspec URLs (see storage.py); `storage_options` reach the
latter. A worker restores from a node-local copy of what its rank reads (nothing is copied
when the storage is local).
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

from . import storage
from .data_position import DataPosition

DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"  # DeepSpeed's world-size-free format, made on an elastic resume
# checkpoint_<step>, or checkpoint_<step>_r<n> when an abandoned folder holds the plain name
CKPT_RE = re.compile(r"^checkpoint_(\d{9})(?:_r(\d+))?$")
ABANDONED = "ABANDONED"  # marker in an emptied folder of an abandoned save (see discard_newer)
# files that one rank alone reads back: DeepSpeed loads only its own ZeRO partition (model
# states too at stage 3) unless zero_optimization.elastic_checkpoint is on, which we never set
OWN_FILE_RE = re.compile(rf"^(?:{DS_TAG}/(?:bf16_)?zero_pp_rank_|rng/rank_)(\d+)")
UNIVERSAL_DONE = f"done/{UNIVERSAL_TAG}"


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


def restore(engine, directory: str, rank: int, world_size: int, universal: bool = False,
            storage_options: dict | None = None) -> tuple[TrainState, DataPosition]:
    """Loads model/optimizer/scheduler states, the data position and (same world size) RNG.
    `universal`: from the universal copy (the engine was built with load_universal)."""
    with storage.local_copy(directory, storage_options, read_by(rank, universal),
                            work=restore_dir(directory, rank)) as local:
        load_path, _ = engine.load_checkpoint(local, tag=UNIVERSAL_TAG if universal else DS_TAG)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")
        state = saved_state(local)
        position = DataPosition.load(os.path.join(local, "position"))
        rng_file = os.path.join(local, "rng", f"rank_{rank:05d}.pt")
        if state.world_size == world_size and os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
    state.world_size = world_size
    return state, position


def restore_dir(directory: str, rank: int) -> str:
    """Node-local folder for a rank's copy of a checkpoint in remote storage."""
    key = hashlib.sha1(directory.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "mmtrain-restore", f"{key}.rank_{rank:05d}")


def read_by(rank: int, universal: bool):
    """Which files of a checkpoint a rank's restore reads: the shared ones, every rank's data
    position (it is re-split), its own ZeRO partition and RNG state, and of the two DeepSpeed
    copies the one it loads (every rank reads all of the universal one: one file per parameter,
    each sliced to the rank's partition)."""
    skip = ("done", DS_TAG if universal else UNIVERSAL_TAG)

    def wanted(name: str) -> bool:
        own = OWN_FILE_RE.match(name)
        return name.split("/", 1)[0] not in skip and (own is None or int(own.group(1)) == rank)

    return wanted


def problem(directory: str, storage_options: dict | None = None) -> str | None:
    """Why the checkpoint cannot be loaded, or None if it is complete."""
    try:
        world = saved_state(directory, storage_options).world_size
    except (OSError, ValueError, TypeError):
        return "train_state.json is missing or unreadable"
    files = storage.listing(directory, storage_options)
    for r in range(world):
        try:
            sizes = _read_json(directory, f"done/rank_{r:05d}", storage_options)
        except (OSError, ValueError):
            return f"rank {r} of {world} did not finish its part"
        why = _size_problem(files, sizes, f"rank {r}")
        if why:
            return why
    return None


def _size_problem(files: dict[str, int], sizes: dict[str, int], who: str) -> str | None:
    for name, size in sizes.items():
        if name not in files:
            return f"{name} ({who}) is missing"
        if files[name] != size:
            return f"{name} ({who}) has {files[name]} bytes, {size} were written"
    return None


def _read_json(directory: str, name: str, storage_options: dict | None):
    fs, path = storage.filesystem(directory, storage_options)
    return json.loads(fs.cat_file(storage.join(path, name)))


def is_complete(directory: str, storage_options: dict | None = None) -> bool:
    return problem(directory, storage_options) is None


def checkpoint_folders(storage_dir: str, storage_options: dict | None = None) -> list[str]:
    """Names of every checkpoint folder in storage (a path or URL), abandoned ones included."""
    fs, path = storage.filesystem(storage_dir, storage_options)
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return [n for n in names if CKPT_RE.match(n)]


def list_checkpoints(storage_dir: str, storage_options: dict | None = None) -> list[str]:
    """Checkpoint folders in a run's Ray Train storage folder (a path or URL), oldest first,
    without the folders of abandoned saves."""
    fs, path = storage.filesystem(storage_dir, storage_options)
    found = [n for n in checkpoint_folders(storage_dir, storage_options)
             if not fs.exists(storage.join(path, n, ABANDONED))]
    return [storage.join(storage_dir, n) for n in sorted(found, key=_order)]


def _order(name: str) -> tuple[int, int]:
    m = CKPT_RE.match(os.path.basename(name.rstrip("/")))
    return int(m.group(1)), int(m.group(2) or 0)


def step_of(path: str) -> int:
    return _order(path)[0]


def latest_complete(storage_dir: str, log=print, *, newest: str | None = None,
                    storage_options: dict | None = None) -> str | None:
    """The newest complete checkpoint (no newer than `newest`, if given); incomplete newer
    ones are named, with the reason, and skipped."""
    for path in reversed(list_checkpoints(storage_dir, storage_options)):
        if newest is not None and step_of(path) > step_of(newest):
            continue
        why = problem(path, storage_options)
        if why is None:
            return path
        log(f"checkpoint {os.path.basename(path)} is incomplete ({why}): a save was interrupted "
            f"or files were lost; falling back to the previous complete checkpoint")
    return None


def select(registered: str | None, storage_dir: str, log=print, *, storage_options: dict | None = None) -> str | None:
    """The checkpoint to resume from: the one Ray Train registered last if it is complete,
    else the newest complete one before it. With nothing registered (a run whose Ray Train
    snapshot is gone), the newest complete one in storage."""
    if registered is not None and problem(registered, storage_options) is None:
        return registered
    return latest_complete(storage_dir, log, newest=registered, storage_options=storage_options)


def discard_newer(storage_dir: str, step: int, log=print, *, storage_options: dict | None = None) -> None:
    """Checkpoint folders newer than the one resumed from belong to an abandoned attempt (an
    interrupted save, or one registered and damaged later). Their files go; the folder stays,
    empty but for a marker: Ray Train may still list it and delete it when it rotates it out
    (its delete fails the whole run if the folder is gone), and the new attempt's saves of
    those steps take other names (`checkpoint_name`). The marker is written first: in an
    object store a folder is only its objects, so it must never be empty."""
    for path in list_checkpoints(storage_dir, storage_options):
        if step_of(path) > step:
            log(f"removing {os.path.basename(path)}: written by an interrupted attempt after the "
                f"checkpoint this run resumes from")
            fs, fs_path = storage.filesystem(path, storage_options)
            fs.pipe_file(storage.join(fs_path, ABANDONED),
                         f"abandoned: a later attempt resumed from step {step}\n".encode())
            fs.invalidate_cache(fs_path)
            for entry in fs.ls(fs_path, detail=False):
                if entry.rstrip("/").rsplit("/", 1)[-1] != ABANDONED:
                    fs.rm(entry, recursive=True)


def saved_state(directory: str, storage_options: dict | None = None) -> TrainState:
    return TrainState(**_read_json(directory, "train_state.json", storage_options))


def needs_universal(directory: str, world_size: int, storage_options: dict | None = None) -> bool:
    """ZeRO 1-3 partition optimizer states (stage 3: parameters too) by rank, so DeepSpeed can
    load them only at the world size that wrote them; stage 0 keeps whole states per file."""
    saved = saved_state(directory, storage_options)
    return saved.world_size != world_size and saved.zero_stage >= 1


def ensure_universal(directory: str, log=print, storage_options: dict | None = None) -> None:
    """Converts the checkpoint's ZeRO files to DeepSpeed's universal checkpoint (one file per
    parameter, any world size can load it) with DeepSpeed's own converter, once.

    In remote storage the converter runs on rank 0's node-local copy (all ranks' ZeRO files),
    whose `ds_universal/` is then uploaded, `done/ds_universal` (its file sizes) last: that
    marker, checked like a rank's, tells a finished upload from one cut short. Rank 0's
    restore then finds the converted files already in its copy."""
    if storage.is_local(directory):
        _convert(directory, directory, log)
        return
    files = storage.listing(directory, storage_options)
    if UNIVERSAL_DONE in files:
        if _size_problem(files, _read_json(directory, UNIVERSAL_DONE, storage_options), "universal") is None:
            return
    local = restore_dir(directory, 0)
    storage.download(directory, local, storage_options,
                     lambda n: n.startswith(f"{DS_TAG}/") or "/" not in n)
    _convert(local, directory, log)
    fs, path = storage.filesystem(directory, storage_options)
    if fs.exists(storage.join(path, UNIVERSAL_TAG)):
        fs.rm(storage.join(path, UNIVERSAL_TAG), recursive=True)  # a conversion cut short: stale files
    sizes = storage.upload(os.path.join(local, UNIVERSAL_TAG), storage.join(directory, UNIVERSAL_TAG),
                           storage_options)
    fs.pipe_file(storage.join(path, UNIVERSAL_DONE),
                 json.dumps({f"{UNIVERSAL_TAG}/{n}": size for n, size in sizes.items()}).encode())


def _convert(directory: str, name: str, log) -> None:
    """DeepSpeed's converter on a local checkpoint (`name`: where it is stored): into a
    temporary folder renamed into place, so a conversion killed half-way is redone."""
    target = os.path.join(directory, UNIVERSAL_TAG)
    if os.path.isdir(target):
        return
    tmp = os.path.join(directory, f".{UNIVERSAL_TAG}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"converting {os.path.basename(name)} to a universal checkpoint for the new worker count")
    r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                        "--input_folder", os.path.join(directory, DS_TAG), "--output_folder", tmp,
                        "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"DeepSpeed could not convert {name} to a universal checkpoint: {last}")
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
