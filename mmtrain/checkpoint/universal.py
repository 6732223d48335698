"""Conversion of a checkpoint's ZeRO files to DeepSpeed's universal checkpoint (one file per
parameter, loadable at any world size), with DeepSpeed's own converter, once per checkpoint.

In remote storage the converter runs on rank 0's node-local copy (all ranks' ZeRO files),
whose `ds_universal/` is then uploaded, `done/ds_universal` (its file sizes and hashes) last:
that record, checked like a rank's, tells a finished upload from one cut short. Rank 0's
restore then finds the converted files already in its copy.

The converter unpickles every rank's files, so they are checked against the done records
first; a checkpoint that fails the check is not converted and the caller falls back.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

from pipelines.storage import join

from .errors import guarded
from .layout import DS_TAG, UNIVERSAL_DONE, UNIVERSAL_TAG, converter_reads, restore_dir
from .records import local_files, local_problem, record_of, size_problem

if TYPE_CHECKING:
    from .store import CheckpointStore


def ensure_universal(store: CheckpointStore, checkpoint: str, log=print) -> str | None:
    """Why the checkpoint cannot be converted, or None once its universal copy is complete."""
    if store.local:
        return _ensure_local(store, checkpoint, log)
    return _ensure_remote(store, checkpoint, log)


def _ensure_local(store: CheckpointStore, checkpoint: str, log) -> str | None:
    local = store.fs_path(checkpoint)
    if not os.path.isdir(os.path.join(local, UNIVERSAL_TAG)):
        why = local_problem(local, store.all_records(checkpoint), converter_reads, (DS_TAG,))
        if why is not None:
            return why
        _convert(local, checkpoint, log)
    _drop_latest_universal(local)  # also from a conversion made before done/ds_universal existed
    done = os.path.join(local, UNIVERSAL_DONE)
    if not os.path.exists(done):
        names = [os.path.join(UNIVERSAL_TAG, n) for n in local_files(os.path.join(local, UNIVERSAL_TAG))]
        with open(done + ".tmp", "w") as f:
            json.dump(record_of(local, names), f)
        os.replace(done + ".tmp", done)
    return None


def _ensure_remote(store: CheckpointStore, checkpoint: str, log) -> str | None:
    files = store.listing(checkpoint)
    if UNIVERSAL_DONE in files:
        done = store.read_record(checkpoint, UNIVERSAL_DONE)
        if done is not None and size_problem(files, done, "universal") is None:
            return None
    local = restore_dir(checkpoint, 0)
    guarded(checkpoint, store.download, checkpoint, local, converter_reads)
    why = local_problem(local, store.all_records(checkpoint), converter_reads, (DS_TAG,))
    if why is not None:
        shutil.rmtree(local, ignore_errors=True)
        return why
    _convert(local, checkpoint, log)
    remote = join(store.fs_path(checkpoint), UNIVERSAL_TAG)
    if store.fs.exists(remote):
        store.fs.rm(remote, recursive=True)  # a conversion cut short: stale files
    record = record_of(os.path.join(local, UNIVERSAL_TAG))
    store.upload(os.path.join(local, UNIVERSAL_TAG), join(checkpoint, UNIVERSAL_TAG))
    record["files"] = {f"{UNIVERSAL_TAG}/{n}": v for n, v in record["files"].items()}
    store.fs.pipe_file(join(store.fs_path(checkpoint), UNIVERSAL_DONE), json.dumps(record).encode())
    return None


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
