"""DeepSpeed ops compiled on the node at run time (torch's JIT extensions): the one training
never uses is not built, and a build lock left by a killed compile is named instead of waited
on in silence.

DeepSpeed's communication backend builds its shared-memory all-reduce op
(`deepspeed_shm_comm`, CPU accelerator only) whenever it starts, though only inference's
`inference_all_reduce` calls it. Torch guards every JIT build, even one with nothing left to
compile, with a lock file in the op's build folder (`FileBaton`): a compile killed mid-way
leaves it behind, and every later run waits on it forever. The lock has no owner recorded, so a
live compile cannot be told from a dead one; an old lock is only reported, never removed.
"""
from __future__ import annotations

import glob
import os
import time

# the longest a DeepSpeed op takes to compile on a loaded node is minutes; a lock older than
# this is almost surely left by a killed compile
STALE_AFTER_S = 20 * 60
UNUSED_OPS = ("deepspeed_shm_comm",)


def skip_unused_ops() -> None:
    """Marks the ops training never calls as not buildable on this node, before DeepSpeed's
    backend starts: it then goes without them (the CUDA accelerator has none of them)."""
    import deepspeed.ops

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    compatible = deepspeed.ops.__compatible_ops__  # one dict, probed once per process and kept
    for name in UNUSED_OPS:
        compatible[name] = False


def stale_build_locks(now: float | None = None) -> list[str]:
    """One line per torch extension build lock older than STALE_AFTER_S."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    # torch builds under TORCH_EXTENSIONS_DIR/OP, else under the default root's pyXY_ACC/OP
    pattern = os.path.join(root, "*", "lock") if root else os.path.join(get_default_build_root(), "*", "*", "lock")
    now = time.time() if now is None else now
    lines = []
    for lock in sorted(glob.glob(pattern)):
        try:
            age = now - os.path.getmtime(lock)
        except FileNotFoundError:  # a build finished meanwhile
            continue
        if age > STALE_AFTER_S:
            lines.append(f"torch extension build lock {lock} is {age / 60:.0f} minutes old: a compile killed "
                         f"mid-way leaves it, and a run building {os.path.basename(os.path.dirname(lock))} then "
                         f"waits forever; delete it if no compile is running on this node")
    return lines
