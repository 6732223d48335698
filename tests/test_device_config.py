"""What a run is set up with on its node, checked where no GPU is: the optimizer a GPU run asks
DeepSpeed for, the ops DeepSpeed would compile at run time, and the batches' way to the device."""
import os
import time

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from mmtrain.config import load_run_config
from mmtrain.deepspeed_config import build_deepspeed_config
from mmtrain.device_batches import on_device
from mmtrain.op_builds import STALE_AFTER_S, skip_unused_ops, stale_build_locks


def optimizer_params(on_gpu: bool, **train) -> dict:
    cfg = load_run_config(None, data_paths=["x"], run_dir="r", train=train)
    ds = build_deepspeed_config(cfg, world_size=2, steps=10, on_gpu=on_gpu)
    assert ds["optimizer"]["type"] == "AdamW"
    return ds["optimizer"]["params"]


def test_gpu_runs_use_torchs_fused_adamw_which_needs_no_build():
    params = optimizer_params(True)
    assert params["torch_adam"] is True and params["fused"] is True
    # what DeepSpeed 0.19's engine makes of it: torch.optim.AdamW, `fused` passed through
    # (torch_adam returns before the engine's state is read, so no engine is needed)
    rest = dict(params)
    cls, kwargs = DeepSpeedEngine.get_optimizer_configuration(None, rest, True)
    assert cls is torch.optim.AdamW
    opt = cls([torch.nn.Parameter(torch.zeros(2))], **rest, **kwargs)  # fused AdamW also runs on CPU
    assert opt.defaults["fused"] is True and opt.defaults["lr"] == params["lr"]

    assert "fused" not in optimizer_params(False) and optimizer_params(False)["torch_adam"] is True  # CPU: as before
    offloaded = optimizer_params(True, zero_stage=2, offload_optimizer=True)
    assert "torch_adam" not in offloaded and "fused" not in offloaded  # DeepSpeed's CPUAdam


def test_the_unused_shm_op_is_not_built_and_a_stale_build_lock_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir()
        lock.touch()
    os.utime(old, (time.time() - STALE_AFTER_S - 60,) * 2)
    lines = stale_build_locks()
    assert len(lines) == 1 and lines[0].startswith(f"torch extension build lock {old} is 21 minutes old")
    assert "building deepspeed_shm_comm then waits forever" in lines[0]

    # DeepSpeed's backend asks for the op at start; with the lock above, building it would wait forever
    from deepspeed.comm.torch import build_shm_op

    skip_unused_ops()
    assert build_shm_op() is None
    assert os.listdir(old.parent) == ["lock"]  # nothing built, the lock left alone


def test_batches_reach_a_cpu_device_as_they_come_ids_and_all():
    batches = [{"image": torch.full((2, 1), float(i)), "ids": [("s", f"k{i}", 0)]} for i in range(3)]
    out = list(on_device(iter(batches), torch.device("cpu")))
    assert [b is a for a, b in zip(batches, out)] == [True] * 3  # no copy, no lookahead on CPU
    assert [b["ids"] for b in out] == [[("s", "k0", 0)], [("s", "k1", 0)], [("s", "k2", 0)]]
