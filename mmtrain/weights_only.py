"""DeepSpeed's checkpoint files loaded without arbitrary unpickling, where DeepSpeed lets us.

DeepSpeed 0.19 reads its `.pt` files with `torch.load(weights_only=False)`: a pickle can run
any code, and a checkpoint may sit in a bucket others can write. Every load of a regular
(same world size) restore goes through the engine's checkpoint engine (`engine.checkpoint_engine
.load`), so we replace that one method with a `weights_only=True` load that accepts, besides
tensors and containers, only the few plain DeepSpeed classes that ZeRO 0-3 checkpoints hold.
A file needing anything else is refused by torch with the class named, rather than unpickled.

Not covered, as DeepSpeed offers no hook there: the universal-checkpoint converter and loader
(an elastic resume) and `zero_to_fp32` (export). There, and as a second guard here, a rank
loads only files whose sha256 matches what our save recorded (checkpoint/records.py).
"""
from __future__ import annotations

import torch


def deepspeed_globals() -> list:
    """The DeepSpeed classes pickled inside its optimizer-state files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location=None):
    with torch.serialization.safe_globals(deepspeed_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loads(engine) -> bool:
    """Makes the engine's checkpoint engine load with weights_only=True, if it is DeepSpeed's
    default (torch) one; returns whether it did."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return False
    engine.checkpoint_engine.load = load_weights_only  # shadows the class's method on this instance only
    return True
