"""The training device and the training loop's own collectives on it.

Ray Train decides each worker's device (`ray.train.torch.get_device()`: its GPU, or the CPU)
and the process group's backend: NCCL on GPU, which takes only tensors on the worker's own
CUDA device, gloo on CPU. The loop's collectives (lockstep's flag, the metrics window's sums and
peak memory, the attempt number) go through the functions here, each given the device, so every tensor they
reduce is made where the backend takes it. Object collectives and barriers (resume.py) need
none: torch picks their device from the group's backend and the current CUDA device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def training_device(use_gpu: bool) -> torch.device:
    """Ray Train's device for this worker; a GPU run that got none is a one-line error."""
    import ray.train.torch

    from pipelines.errors import UserError

    device = ray.train.torch.get_device()
    if use_gpu and device.type != "cuda":
        raise UserError(f"scale.use_gpu is set but Ray Train gave this worker the device {device}: "
                        f"no GPU is visible to it (check the node's GPUs and scale.gpus_per_worker)")
    return device


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any rank (a collective)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(values: list[float], device: torch.device) -> torch.Tensor:
    """Each value summed over ranks (a collective), as a float64 tensor on the host."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu()


def max_over_ranks(values: list[float], device: torch.device) -> torch.Tensor:
    """Each value's maximum over ranks (a collective), as a float64 tensor on the host."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu()


def broadcast_int(value: int, device: torch.device, src: int = 0) -> int:
    """Rank `src`'s `value` on every rank (a collective)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=src)
    return int(t.item())
