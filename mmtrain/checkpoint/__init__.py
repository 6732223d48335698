"""Checkpoints: DeepSpeed state + data position + RNG + run config, as one ray.train.Checkpoint.

Every rank writes its part into a node-local staging folder (staging.py); Ray Train uploads
and merges the parts into one folder, `checkpoint_NNNNNNNNN`, of the run's checkpoint store
(location.py: the run directory or any fsspec URL). The folder's files are in layout.py.

A checkpoint is complete when `done/rank_N` exists for every rank of its world size, every
file it lists has the listed size (checked on a listing: `CheckpointStore.problem`), and every
file a rank loads has the listed hash (checked on the copy it loads, just before: restore.py).
A save killed half-way (in DeepSpeed's write or in Ray's upload, which copies files in no
particular order) fails that check, as does a file truncated or replaced later, and is never
loaded: the run falls back to the previous complete one. A read that fails for another reason
than a missing file stops the resume with one line and deletes nothing (errors.py).

What is unpickled: our own files are JSON. DeepSpeed's (`ds/*.pt`) are pickles, which DeepSpeed
loads with `torch.load(weights_only=False)`; restores load them with weights_only=True
through its checkpoint engine (weights_only.py), but its universal converter and zero_to_fp32
offer no hook. So, everywhere, a rank loads only files whose sha256 matches what our save
recorded (records.py): files this run wrote, not whatever else landed in the storage.

    store.py     CheckpointStore: one store's filesystem, listing, completeness, selection,
                 discarding abandoned saves, copies in and out
    location.py  where a run's store is (run directory or checkpoint_storage), Ray Train's view of it
    layout.py    folder names and the files a checkpoint holds; TrainState
    records.py   the done/ records and checks of files against them
    staging.py   the save side;  restore.py: the load side;  universal.py: elastic conversion
    errors.py, keys.py   what a read can fail with; keys that are safe to join into local paths

Importing the package does not import torch (`show` lists checkpoints in a fraction of a
second): restore.py and staging.py import what needs torch inside the functions that use it.
"""
from .errors import CheckpointDamaged, CheckpointUnreadable, UnsafeKey
from .layout import (ABANDONED, DS_TAG, UNIVERSAL_TAG, TrainState, checkpoint_name, read_by, restore_dir,
                     say_incomplete, step_of)
from .records import local_problem, record_of
from .restore import fetch, restore
from .staging import staged_checkpoint, staging_dir
from .store import CheckpointStore
from .universal import ensure_universal

__all__ = ["ABANDONED", "DS_TAG", "UNIVERSAL_TAG", "CheckpointDamaged", "CheckpointStore", "CheckpointUnreadable",
           "TrainState", "UnsafeKey", "checkpoint_name", "ensure_universal", "fetch", "local_problem", "read_by",
           "record_of", "restore", "restore_dir", "say_incomplete", "staged_checkpoint", "staging_dir", "step_of"]
