"""Seeding every RNG a worker uses, and their states as JSON for checkpoints (never a pickle:
a checkpoint's files are only unpickled after their hashes are checked, and ours need not be)."""
from __future__ import annotations

import base64
import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = False


def rng_state(device: torch.device | None = None) -> dict:
    """Every RNG's state as JSON: python's is a tuple of ints, numpy's a tuple around a uint32
    array, torch's a uint8 tensor, and, on a CUDA training `device`, that device's (this rank's
    own GPU only: another process's GPUs, or the GPUs it sees, are not this rank's state)."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(keys), gauss],
             "numpy": [kind, np_keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(s: dict, device: torch.device | None = None) -> str | None:
    """Restores what `rng_state` saved; a damaged state is a ValueError. The CUDA state is
    restored onto the CUDA training `device` only. Otherwise its stream keeps its seed, and
    the reason is returned: a run on GPU from a checkpoint written without one, or a run
    without a GPU from one written on GPU (which has no CUDA stream to restore)."""
    cuda = _cuda_state(s)
    version, keys, gauss = s["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, np_keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(s["torch"]))
    on_gpu = device is not None and device.type == "cuda"
    if cuda is not None and on_gpu:
        torch.cuda.set_rng_state(cuda, device)
        return None
    if cuda is not None:
        return f"the checkpoint's CUDA RNG state is not restored: this run's device is {device or 'cpu'}"
    if on_gpu:
        return "the checkpoint has no CUDA RNG state (written without a GPU): the CUDA stream keeps its seed"
    return None


def _cuda_state(s: dict) -> torch.Tensor | None:
    """The saved CUDA state, checked; None when there is none."""
    if "cuda" not in s:
        return None
    text = s["cuda"]
    try:
        state = _tensor(text) if isinstance(text, str) else None
    except ValueError:
        state = None
    if state is None or not len(state):
        raise ValueError("the CUDA RNG state is not one device's base64 state: written by another version")
    return state


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    data = bytearray(base64.b64decode(text, validate=True))  # binascii.Error is a ValueError
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
