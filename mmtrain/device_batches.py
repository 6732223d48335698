"""Batches onto a CUDA training device: pinned host memory, and each batch's copy started on a
side stream before the step ahead of it runs, so the copy overlaps that step's compute.

Ray Data does both for batches made only of tensors (`iter_torch_batches(device=...,
pin_memory=True)`: pinning in its collate threads, the copy in its background thread). Ours
carry their sample ids (python tuples: the data position) beside the tensors, and Ray passes
such a batch over untouched, so the same is done here: pinning with Ray's own helper in Ray's
collate threads (`PinnedCollate`), the copy in the training thread one batch ahead
(`on_device`). On CPU neither applies: the batches are used as they come.
"""
from __future__ import annotations

import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.util.torch_utils import pin_tensors_to_memory


class PinnedCollate(NumpyBatchCollateFn):
    """`collate` with its tensors in pinned (page-locked) memory, which a copy to the GPU can
    read without blocking the host. Runs in Ray Data's collate threads, as Ray's own pinning."""

    def __init__(self, collate):
        super().__init__()
        self.collate = collate

    def __call__(self, rows: dict) -> dict:
        batch = self.collate(rows)
        return {k: pin_tensors_to_memory(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def on_device(batches, device: torch.device):
    """Yields `batches` with their tensors on `device`. On a CUDA device the next batch is taken
    and its copy started on a side stream before the current one is yielded; the step's stream
    waits for that copy alone (an event), and the tensors are marked as used by it, so their
    memory is not reused while the step runs."""
    if device.type != "cuda":
        yield from batches
        return
    side, it = torch.cuda.Stream(device), iter(batches)
    ahead = _start_copy(next(it, None), device, side)
    while ahead is not None:
        batch, copied = ahead
        step_stream = torch.cuda.current_stream(device)
        step_stream.wait_event(copied)
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                v.record_stream(step_stream)
        ahead = _start_copy(next(it, None), device, side)
        yield batch


def _start_copy(batch: dict | None, device: torch.device, stream) -> tuple[dict, object] | None:
    if batch is None:
        return None
    with torch.cuda.stream(stream):
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        copied = torch.cuda.Event()
        copied.record(stream)
    return moved, copied
