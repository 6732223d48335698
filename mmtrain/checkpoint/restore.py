"""The restore side: every rank fetches the files it loads and checks them against the done
records (`fetch`), then loads them (`restore`). A rank loads only files whose sha256 matches
what our save recorded: DeepSpeed's files are pickles (see weights_only.py), so what is loaded
must be what this run wrote, not whatever else landed in the storage. A rank reads a
node-local copy of its files when the storage is remote, the files in place when it is local.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING

from pipelines.storage import filesystem, is_local

from ..data_position import DataPosition
from .errors import guarded
from .layout import DS_TAG, TRAIN_STATE, UNIVERSAL_TAG, TrainState, read_by, restore_dir, rng_file
from .records import local_problem

if TYPE_CHECKING:
    from .store import CheckpointStore


def read_from(checkpoint: str, rank: int) -> str:
    """The local folder a rank reads the checkpoint from: itself, or the rank's copy."""
    return filesystem(checkpoint)[1] if is_local(checkpoint) else restore_dir(checkpoint, rank)


def fetch(store: CheckpointStore, checkpoint: str, rank: int, universal: bool = False) -> str | None:
    """Makes the files this rank's restore reads available locally (a copy in its restore
    dir when the storage is remote) and checks each against the done records: why they
    cannot be loaded (the copy is then removed), or None. Run it, on every rank, before
    `restore`; a reason on any rank means falling back (see resume.resume_point)."""
    wanted = read_by(rank, universal)
    expected = store.all_records(checkpoint)
    tags = (UNIVERSAL_TAG,) if universal else (DS_TAG,)
    local = read_from(checkpoint, rank)
    if store.local:
        return local_problem(local, expected, wanted, tags)
    why = None
    for _ in range(2):  # a mismatch is downloaded once more: a copy damaged on its way is not the checkpoint
        try:
            guarded(checkpoint, store.download, checkpoint, local, wanted)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        why = local_problem(local, expected, wanted, tags)
        if why is None:
            return None
        shutil.rmtree(local, ignore_errors=True)
    return why


def restore(engine, checkpoint: str, rank: int, world_size: int, universal: bool = False,
            log=print) -> tuple[TrainState, DataPosition]:
    """Loads model/optimizer/scheduler states, the data position and (same world size) RNG
    from what `fetch` checked. `universal`: from the universal copy (the engine was built
    with load_universal)."""
    from ..weights_only import use_weights_only_loads  # torch: here, so that listing checkpoints (show) stays light

    local = read_from(checkpoint, rank)
    try:
        use_weights_only_loads(engine)
        load_path, _ = engine.load_checkpoint(local, tag=UNIVERSAL_TAG if universal else DS_TAG)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {checkpoint}")
        with open(os.path.join(local, TRAIN_STATE)) as f:
            state = TrainState.from_json(f.read())
        position = DataPosition.load(os.path.join(local, "position"))
        if state.world_size == world_size:
            _restore_rng(local, checkpoint, rank, log, engine.device)
    finally:
        if not is_local(checkpoint):
            shutil.rmtree(local, ignore_errors=True)
    state.world_size = world_size
    return state, position


def _restore_rng(local: str, checkpoint: str, rank: int, log, device) -> None:
    """This rank's RNG states, the CUDA one onto its training `device` (seeding.set_rng_state's rule)."""
    from ..seeding import set_rng_state  # torch: here, as above

    path = os.path.join(local, rng_file(rank))
    if os.path.exists(path):
        with open(path) as f:
            note = set_rng_state(json.load(f), device)
        if note is not None and rank == 0:
            log(f"{os.path.basename(checkpoint)}: {note}")
    elif rank == 0:
        log(f"{os.path.basename(checkpoint)} keeps its RNG states as pickles (rng/*.pt, written before "
            f"JSON), which are not unpickled: random streams restart from the seed")
