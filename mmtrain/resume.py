"""Where a worker group resumes: the checkpoint every rank agrees on (a collective)."""
from __future__ import annotations

import os

import ray.train
import torch.distributed as dist

from .checkpoint import (checkpoint_folders, discard_newer, ensure_universal, fetch, latest_complete, needs_universal,
                         say_incomplete, select, step_of)


def resume_point(storage: str, rank: int, world: int, storage_options: dict
                  ) -> tuple[str | None, bool, frozenset[str]]:
    """Rank 0 picks the checkpoint (Ray Train's latest if complete, else the previous complete
    one) and converts it to DeepSpeed's universal format if the worker count changed; every
    rank then fetches and checks (sizes and hashes) the files it will load, and a problem on
    any rank falls back to the previous complete checkpoint. Then rank 0 empties folders of
    abandoned saves after the one chosen (none when there is none: a run that finds no
    complete checkpoint starts over beside the others and deletes nothing). Returns, on every
    rank, the checkpoint, whether it is universal, and the folder names saves must not reuse."""
    path = None
    if rank == 0:
        registered = ray.train.get_checkpoint()
        # Ray's path is on its own filesystem object, without the URL scheme: name it by ours
        path = select(f"{storage}/{os.path.basename(registered.path)}" if registered is not None else None,
                      storage, storage_options=storage_options)
    while True:
        choice = [(path, rank == 0 and path is not None and needs_universal(path, world, storage_options))]
        dist.broadcast_object_list(choice, src=0)
        path, universal = choice[0]
        if path is None:
            break
        why = ensure_universal(path, storage_options=storage_options) if universal and rank == 0 else None
        dist.barrier()  # the universal copy, if any, is in storage
        why = why or fetch(path, rank, universal, storage_options)
        reasons = [None] * world
        dist.all_gather_object(reasons, why)
        found = next((f"rank {r}: {w}" for r, w in enumerate(reasons) if w is not None), None)
        if found is None:
            break
        if rank == 0:
            print(f"rank 0: {say_incomplete(path, found)}")
            path = latest_complete(storage, before=path, storage_options=storage_options)
    taken = [frozenset()]
    if rank == 0:
        discard_newer(storage, step_of(path) if path is not None else None, storage_options=storage_options)
        if path is not None:
            print(f"rank 0: resuming from {path}" + (" (universal, new worker count)" if universal else ""))
        taken = [frozenset(checkpoint_folders(storage, storage_options))]
    dist.broadcast_object_list(taken, src=0)
    return path, universal, taken[0]
