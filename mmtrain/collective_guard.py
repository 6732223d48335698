"""`train.check_collectives`: refuse, on any run, a collective that NCCL would refuse on GPU.

On GPU an NCCL-only process group takes only tensors on the worker's own CUDA device; a
tensor made on the host without a device is refused there at the first step. On CPU the
training device is the host too, so such a tensor looks right, and gloo takes it. The guard
tells the two apart by how a tensor was made: a torch function mode (`TorchFunctionMode`, the
thread's hook into every torch call) marks tensors that factory functions make without a
`device=` (torch.tensor, zeros, arange, from_numpy, ...), and tensors computed only from such
tensors; an explicit move (`.to(device)`, `.cuda()`) clears the mark. The list collectives of
torch.distributed (all_reduce, broadcast, reduce, all_gather, gather, scatter, reduce_scatter,
send/recv and their coalesced forms) dispatch through the same mode (c10d's
`handle_torch_function`), so the guard checks them, ours and DeepSpeed's, whatever module calls
them, and refuses a marked tensor, or one off the training device, with a RuntimeError phrased
as NCCL's refusal that names the call site and where the tensor was made. The flat-buffer forms
(all_gather_into_tensor, reduce_scatter_tensor, all_to_all) do not call that hook in torch, so
they go unchecked: DeepSpeed's ZeRO buffers, made on the engine's device, are what use them.

Torch has no such check (its debug modes check collective shapes and ordering, not devices),
hence this module. The mode covers the thread that enters it: the training loop's. It costs a
Python call per torch call, so it is a debugging setting.
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

# factory functions: a tensor without `device=` lands on the host (or torch's default device,
# which the project never sets)
_FACTORIES = {getattr(torch, n) for n in (
    "tensor", "as_tensor", "asarray", "from_numpy", "frombuffer", "scalar_tensor", "zeros", "ones", "empty",
    "full", "arange", "range", "linspace", "logspace", "eye", "rand", "randn", "randint", "randperm",
    "empty_strided", "tril_indices", "triu_indices") if hasattr(torch, n)}
_COLLECTIVES = {getattr(dist, n) for n in (
    "all_reduce", "all_reduce_coalesced", "broadcast", "reduce", "all_gather", "all_gather_single",
    "all_gather_coalesced", "gather", "scatter", "reduce_scatter", "reduce_scatter_single",
    "send", "recv", "isend", "irecv") if hasattr(dist, n)}
_SKIP = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch,)) + (__file__,)


class CollectiveGuard(TorchFunctionMode):
    """Enter it (`with` or `install`) in the training thread; `device`: the training device."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.host_made = WeakIdKeyDictionary()  # tensor -> where it was made without a device
        self.checked = Counter()  # file that called a collective -> collectives checked

    def install(self) -> CollectiveGuard:
        self.__enter__()
        return self

    def close(self) -> None:
        self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _COLLECTIVES:
            self._check(func, args, kwargs)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if _places(func, args, kwargs, self.host_made):
            for t in _tensors(out):
                self.host_made.pop(t, None)
            return out
        inputs = list(_tensors((args, kwargs)))
        if inputs:
            made = [self.host_made.get(t) for t in inputs]
            site = made[0] if all(m is not None for m in made) else None
        else:
            site = _call_site() if func in _FACTORIES else None
        if site is not None:
            for t in _tensors(out):
                self.host_made[t] = site
        return out

    def summary(self) -> str:
        """One line: how many collectives were checked, by the file that called them."""
        return "train.check_collectives: " + (", ".join(f"{n} from {_short(f)}" for f, n in sorted(self.checked.items()))
                                              or "no collective") + " checked"

    def _check(self, func, args, kwargs) -> None:
        site = _call_site()
        self.checked[site.partition(":")[0]] += 1
        for t in _tensors((args, kwargs)):
            made = self.host_made.get(t)
            if t.device != self.device or made is not None:
                what = (f"a tensor on {t.device} created without a device at {made}" if made is not None
                        else f"a tensor on {t.device}")
                target = (f"cuda:{self.device.index}" if self.device.type == "cuda"
                          else "cuda:N (this run's training device is cpu)")
                raise RuntimeError(f"collective {func.__name__} at {site} got {what}; NCCL accepts only "
                                   f"tensors on the training device {target} (train.check_collectives)")


def _places(func, args, kwargs, host_made) -> bool:
    """Whether the call puts its result where the caller asked: a `device=`, `.cuda()`, or
    `.to(device)` (not `.to(dtype)`, which leaves the tensor where it is)."""
    if kwargs.get("device") is not None or func is torch.Tensor.cuda:
        return True
    if func is not torch.Tensor.to:
        return False
    # .to(device), .to("cuda"), .to(0), or .to(other) where `other` is itself placed; a bool is
    # `non_blocking`, not a device index
    return any(isinstance(a, (torch.device, str)) or (isinstance(a, int) and not isinstance(a, bool))
               or (isinstance(a, torch.Tensor) and a not in host_made) for a in args[1:])


def _tensors(obj):
    """The tensors in a call's arguments or result (nested in tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _call_site() -> str:
    """file:line (function) of the innermost caller outside torch and this module."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"


def _short(path: str) -> str:
    """A source file as its package path (mmtrain/device.py, deepspeed/comm/torch.py)."""
    for root in ("site-packages" + os.sep, os.sep + "mmtrain" + os.sep):
        if root in path:
            return ("mmtrain" + os.sep if root.endswith("mmtrain" + os.sep) else "") + path.rsplit(root, 1)[1]
    return path
