"""Checkpoints: DeepSpeed state + data position + RNG + run config, as one ray.train.Checkpoint.

Layout of a checkpoint directory (every rank writes its own files into a local temp dir;
Ray Train merges all ranks' dirs into one directory in the run's storage):

    ds/ ...                DeepSpeed's files (`engine.save_checkpoint(dir, tag="ds")`)
    latest                 DeepSpeed's tag file (rank 0)
    run_config.json        the resolved run config (rank 0)
    train_state.json       step, epoch, world size, ZeRO stage (rank 0)
    position/rank_N.json   data position (every rank; see data_position.py)
    rng/rank_N.json        python / numpy / torch (and CUDA) RNG states (every rank), as JSON
    done/rank_N            written last by each rank: size and sha256 of every file of its part
    ds_universal/          only after an elastic resume: DeepSpeed's universal checkpoint
    done/ds_universal      written last by the conversion: the same for ds_universal/

A checkpoint is complete when `done/rank_N` exists for every rank of its world size, every
file it lists has the listed size (checked on a listing), and every file a rank loads has the
listed hash (checked on the copy it loads, just before). A save killed half-way (in
DeepSpeed's write or in Ray's upload, which copies files in no particular order) fails that
check, as does a file truncated or replaced later, and is never loaded: the run falls back
to the previous complete one. A read that fails for another reason than a missing file stops
the resume with one line and deletes nothing (see checkpoint_records.py).

What is unpickled: our own files are JSON. DeepSpeed's (`ds/*.pt`) are pickles, which DeepSpeed
0.19 loads with `torch.load(weights_only=False)`; restores load them with weights_only=True
through its checkpoint engine (weights_only.py), but its universal loader and zero_to_fp32
offer no hook. So, everywhere, a rank loads only files whose sha256 matches what our save
recorded: files this run wrote, not whatever else landed in the storage.

Checkpoint paths are local paths or fsspec URLs (see storage.py); `storage_options` reach the
latter. A worker restores from a node-local copy of what its rank reads (nothing is copied
when the storage is local).
"""
from __future__ import annotations

import base64
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
from .checkpoint_records import (CheckpointUnreadable, all_records, guarded, guarded_listing,  # noqa: F401
                                 local_problem, read_bytes, read_record, record_of, size_problem)
from .data_position import DataPosition
from .weights_only import use_weights_only_loads

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
        with open(os.path.join(d, "rng", f"rank_{rank:05d}.json"), "w") as f:
            json.dump(rng_state(), f)
        record = record_of(d)  # hashed here, before upload: the record says what this rank wrote
        os.makedirs(os.path.join(d, "done"), exist_ok=True)
        with open(os.path.join(d, "done", f"rank_{rank:05d}"), "w") as f:
            json.dump(record, f)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fetch(directory: str, rank: int, universal: bool = False, storage_options: dict | None = None) -> str | None:
    """Makes the files this rank's restore reads available locally (a copy in its restore
    dir when the storage is remote) and checks each against the done records: why they
    cannot be loaded (the copy is then removed), or None. Run it, on every rank, before
    `restore`; a reason on any rank means falling back (see loop._resume_point)."""
    wanted = read_by(rank, universal)
    expected = all_records(directory, storage_options)
    tags = (UNIVERSAL_TAG,) if universal else (DS_TAG,)
    if storage.is_local(directory):
        return local_problem(storage.filesystem(directory, None)[1], expected, wanted, tags)
    local = restore_dir(directory, rank)
    why = None
    for _ in range(2):  # a mismatch is downloaded once more: a copy damaged on its way is not the checkpoint
        try:
            guarded(directory, storage.download, directory, local, storage_options, wanted)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        why = local_problem(local, expected, wanted, tags)
        if why is None:
            return None
        shutil.rmtree(local, ignore_errors=True)
    return why


def restore(engine, directory: str, rank: int, world_size: int, universal: bool = False,
            log=print) -> tuple[TrainState, DataPosition]:
    """Loads model/optimizer/scheduler states, the data position and (same world size) RNG
    from what `fetch` checked. `universal`: from the universal copy (the engine was built
    with load_universal)."""
    local = storage.filesystem(directory, None)[1] if storage.is_local(directory) else restore_dir(directory, rank)
    try:
        use_weights_only_loads(engine)
        load_path, _ = engine.load_checkpoint(local, tag=UNIVERSAL_TAG if universal else DS_TAG)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")
        state = saved_state(local)
        position = DataPosition.load(os.path.join(local, "position"))
        if state.world_size == world_size:
            rng_file = os.path.join(local, "rng", f"rank_{rank:05d}.json")
            if os.path.exists(rng_file):
                with open(rng_file) as f:
                    set_rng_state(json.load(f))
            elif rank == 0:
                log(f"{os.path.basename(directory)} keeps its RNG states as pickles (rng/*.pt, written before "
                    f"JSON), which are not unpickled: random streams restart from the seed")
    finally:
        if not storage.is_local(directory):
            shutil.rmtree(local, ignore_errors=True)
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
    folders = ("position", "rng", UNIVERSAL_TAG if universal else DS_TAG)

    def wanted(name: str) -> bool:
        own = OWN_FILE_RE.match(name)
        return ("/" not in name or name.split("/", 1)[0] in folders) and (own is None or int(own.group(1)) == rank)

    return wanted


def problem(directory: str, storage_options: dict | None = None) -> str | None:
    """Why the checkpoint is incomplete, or None if it is complete as far as its listing
    shows (sizes; hashes are checked by `fetch` on what is loaded). Raises
    CheckpointUnreadable when a file cannot be read for another reason than its absence."""
    data = read_bytes(directory, "train_state.json", storage_options)
    if data is None:
        return "train_state.json is missing"
    try:
        world = TrainState(**json.loads(data)).world_size
    except (ValueError, TypeError):
        world = None
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        return "train_state.json is unparseable"
    files = guarded_listing(directory, storage_options)
    for r in range(world):
        record = read_record(directory, f"done/rank_{r:05d}", storage_options)
        if record is None:
            return f"rank {r} of {world} did not finish its part (done/rank_{r:05d} is missing or unparseable)"
        why = size_problem(files, record, f"rank {r}")
        if why:
            return why
    return None


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
    def live() -> list[str]:
        fs, path = storage.filesystem(storage_dir, storage_options)
        return [n for n in checkpoint_folders(storage_dir, storage_options)
                if not fs.exists(storage.join(path, n, ABANDONED))]

    return [storage.join(storage_dir, n) for n in sorted(guarded(storage_dir, live), key=_order)]


def _order(name: str) -> tuple[int, int]:
    m = CKPT_RE.match(os.path.basename(name.rstrip("/")))
    return int(m.group(1)), int(m.group(2) or 0)


def step_of(path: str) -> int:
    return _order(path)[0]


def latest_complete(storage_dir: str, log=print, *, newest: str | None = None, before: str | None = None,
                    storage_options: dict | None = None) -> str | None:
    """The newest complete checkpoint (no newer than `newest`, older than `before`, if
    given); incomplete newer ones are named, with the reason, and skipped."""
    for path in reversed(list_checkpoints(storage_dir, storage_options)):
        if newest is not None and step_of(path) > step_of(newest):
            continue
        if before is not None and _order(path) >= _order(before):
            continue
        why = problem(path, storage_options)
        if why is None:
            return path
        log(say_incomplete(path, why))
    return None


def say_incomplete(path: str, why: str) -> str:
    return (f"checkpoint {os.path.basename(path)} is incomplete ({why}): a save was interrupted or files were "
            f"lost or changed; falling back to the previous complete checkpoint")


def select(registered: str | None, storage_dir: str, log=print, *, storage_options: dict | None = None) -> str | None:
    """The checkpoint to resume from: the one Ray Train registered last if it is complete,
    else the newest complete one before it. With nothing registered (a run whose Ray Train
    snapshot is gone), the newest complete one in storage."""
    if registered is not None and problem(registered, storage_options) is None:
        return registered
    return latest_complete(storage_dir, log, newest=registered, storage_options=storage_options)


def discard_newer(storage_dir: str, step: int | None, log=print, *, storage_options: dict | None = None) -> None:
    """Checkpoint folders newer than the one resumed from (at `step`) belong to an abandoned
    attempt (an interrupted save, or one registered and damaged later). Their files go; the
    folder stays, empty but for a marker: Ray Train may still list it and delete it when it
    rotates it out (its delete fails the whole run if the folder is gone), and the new
    attempt's saves of those steps take other names (`checkpoint_name`). The marker is
    written first: in an object store a folder is only its objects, so it must never be
    empty. With nothing resumed (`step` None: no complete checkpoint was found) nothing is
    abandoned: the run starts over beside every folder, and its saves take other names."""
    if step is None:
        return
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
    data = read_bytes(directory, "train_state.json", storage_options)
    if data is None:
        raise FileNotFoundError(storage.join(directory, "train_state.json"))
    return TrainState(**json.loads(data))


def needs_universal(directory: str, world_size: int, storage_options: dict | None = None) -> bool:
    """ZeRO 1-3 partition optimizer states (stage 3: parameters too) by rank, so DeepSpeed can
    load them only at the world size that wrote them; stage 0 keeps whole states per file."""
    saved = saved_state(directory, storage_options)
    return saved.world_size != world_size and saved.zero_stage >= 1


def ensure_universal(directory: str, log=print, storage_options: dict | None = None) -> str | None:
    """Converts the checkpoint's ZeRO files to DeepSpeed's universal checkpoint (one file per
    parameter, any world size can load it) with DeepSpeed's own converter, once.

    In remote storage the converter runs on rank 0's node-local copy (all ranks' ZeRO files),
    whose `ds_universal/` is then uploaded, `done/ds_universal` (its file sizes) last: that
    marker, checked like a rank's, tells a finished upload from one cut short. Rank 0's
    restore then finds the converted files already in its copy.

    The converter unpickles every rank's files, so they are checked against the done
    records first: returns why they cannot be converted (the caller falls back), or None."""
    if storage.is_local(directory):
        local = storage.filesystem(directory, None)[1]
        if not os.path.isdir(os.path.join(local, UNIVERSAL_TAG)):
            why = local_problem(local, all_records(directory, None), _converter_reads, (DS_TAG,))
            if why is not None:
                return why
            _convert(local, directory, log)
        _drop_latest_universal(local)  # also from a conversion made before done/ds_universal existed
        if not os.path.exists(os.path.join(local, UNIVERSAL_DONE)):
            names = [os.path.relpath(os.path.join(root, n), local)
                     for root, _, files in os.walk(os.path.join(local, UNIVERSAL_TAG)) for n in files]
            with open(os.path.join(local, UNIVERSAL_DONE) + ".tmp", "w") as f:
                json.dump(record_of(local, names), f)
            os.replace(os.path.join(local, UNIVERSAL_DONE) + ".tmp", os.path.join(local, UNIVERSAL_DONE))
        return None
    files = guarded_listing(directory, storage_options)
    if UNIVERSAL_DONE in files:
        done = read_record(directory, UNIVERSAL_DONE, storage_options)
        if done is not None and size_problem(files, done, "universal") is None:
            return None
    local = restore_dir(directory, 0)
    guarded(directory, storage.download, directory, local, storage_options, _converter_reads)
    why = local_problem(local, all_records(directory, storage_options), _converter_reads, (DS_TAG,))
    if why is not None:
        shutil.rmtree(local, ignore_errors=True)
        return why
    _convert(local, directory, log)
    fs, path = storage.filesystem(directory, storage_options)
    if fs.exists(storage.join(path, UNIVERSAL_TAG)):
        fs.rm(storage.join(path, UNIVERSAL_TAG), recursive=True)  # a conversion cut short: stale files
    record = record_of(os.path.join(local, UNIVERSAL_TAG))
    storage.upload(os.path.join(local, UNIVERSAL_TAG), storage.join(directory, UNIVERSAL_TAG), storage_options)
    record["files"] = {f"{UNIVERSAL_TAG}/{n}": v for n, v in record["files"].items()}
    fs.pipe_file(storage.join(path, UNIVERSAL_DONE), json.dumps(record).encode())
    return None


def _converter_reads(name: str) -> bool:
    """DeepSpeed's converter reads every rank's files of the tag (and the top-level ones)."""
    return name.startswith(f"{DS_TAG}/") or "/" not in name


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
    _drop_latest_universal(directory)


def _drop_latest_universal(directory: str) -> None:
    """DeepSpeed's converter leaves `latest_universal` beside its output, naming the temporary
    folder: nothing reads it (we load by tag), and a rank refuses files in no done record."""
    if os.path.exists(os.path.join(directory, "latest_universal")):
        os.remove(os.path.join(directory, "latest_universal"))


def rng_state() -> dict:
    """Every RNG's state as JSON (never a pickle): python's is a tuple of ints, numpy's a
    tuple around a uint32 array, torch's (and each CUDA device's) a uint8 tensor."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(keys), gauss],
             "numpy": [kind, np_keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(s: dict) -> None:
    version, keys, gauss = s["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, np_keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(s["torch"]))
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_tensor(x) for x in s["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = False
