"""Where a worker group resumes: the checkpoint every rank agrees on (a collective)."""
from __future__ import annotations

import os

import ray.train
import torch.distributed as dist

from .checkpoint import CheckpointStore, ensure_universal, fetch, say_incomplete, step_of
from .progress import say


def resume_point(storage: str, rank: int, world: int, storage_options: dict
                  ) -> tuple[str | None, bool, frozenset[str]]:
    """Rank 0 picks the checkpoint (Ray Train's latest if complete, else the previous complete
    one) and converts it to DeepSpeed's universal format if the worker count changed; every
    rank then fetches and checks (sizes and hashes) the files it will load, and a problem on
    any rank falls back to the previous complete checkpoint. Then rank 0 empties folders of
    abandoned saves after the one chosen (none when there is none: a run that finds no
    complete checkpoint starts over beside the others and deletes nothing). Returns, on every
    rank, the checkpoint, whether it is universal, and the folder names saves must not reuse."""
    path, store = None, CheckpointStore(storage, storage_options)
    if rank == 0:
        registered = ray.train.get_checkpoint()
        # Ray's path is on its own filesystem object, without the URL scheme: name it by ours
        path = store.select(f"{storage}/{os.path.basename(registered.path)}" if registered is not None else None)
    while True:
        choice = [(path, rank == 0 and path is not None and store.needs_universal(path, world))]
        dist.broadcast_object_list(choice, src=0)
        path, universal = choice[0]
        if path is None:
            break
        why = ensure_universal(store, path) if universal and rank == 0 else None
        dist.barrier()  # the universal copy, if any, is in storage
        why = why or fetch(store, path, rank, universal)
        reasons = [None] * world
        dist.all_gather_object(reasons, why)
        found = next((f"rank {r}: {w}" for r, w in enumerate(reasons) if w is not None), None)
        if found is None:
            break
        if rank == 0:
            say(f"rank 0: {say_incomplete(path, found)}")
            path = store.latest_complete(before=path)
    taken = [frozenset()]
    if rank == 0:
        store.discard_newer(step_of(path) if path is not None else None)
        if path is not None:
            say(f"rank 0: resuming from {path}" + (" (universal, new worker count)" if universal else ""))
        taken = [frozenset(store.folders())]
    dist.broadcast_object_list(taken, src=0)
    return path, universal, taken[0]
