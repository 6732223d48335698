"""The train and scale sections of the run config (mmtrain/config.py).

Apart from the model, so that the command line builds its `train` flags from these fields
without importing torch: every command's start pays for what its parser imports.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.settings import Settings, at_least, setting

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig(Settings):
    # flag=True: also a flag of `train` (--batch-size ...); every field can be set with --set train.NAME=VALUE
    batch_size: int = setting(32, flag=True, help="samples per worker per micro step")
    grad_accum: int = setting(1, help="micro steps per optimizer step")
    max_steps: int | None = setting(None, flag=True, help="stop after this many optimizer steps (instead of --epochs)")
    epochs: int = setting(20, flag=True, help="passes over the data")
    lr: float = setting(1e-3, help="peak learning rate")
    min_lr_ratio: float = setting(0.05, help="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = setting(30, help="linear warmup steps")
    weight_decay: float = setting(0.05, help="AdamW weight decay")
    betas: tuple[float, float] = setting((0.9, 0.98), help="AdamW betas")
    grad_clip: float = setting(1.0, help="gradient norm clip")
    precision: str = setting("fp32", choices=PRECISIONS, flag=True, help="training precision")
    zero_stage: int = setting(2, flag=True, help="DeepSpeed ZeRO stage 0-3")
    offload_optimizer: bool = setting(False, help="ZeRO optimizer states to CPU memory")
    offload_params: bool = setting(False, help="ZeRO-3 parameters to CPU memory")
    activation_checkpointing: bool = setting(False, help="recompute activations in backward")
    log_every: int = setting(10, help="optimizer steps between metrics lines")
    checkpoint_every: int = setting(100, flag=True,
                                    help="optimizer steps between checkpoints; a final one is always written")
    keep_checkpoints: int = setting(3, help="complete checkpoints kept")
    shuffle_buffer: int = setting(256, help="local shuffle buffer per worker (rows)")
    prefetch_batches: int = setting(4, help="batches each worker prefetches")
    epochs_per_pass: int = setting(0, help="epochs per Ray Data execution; 0: as many as fit in 200k samples")
    deterministic: bool = setting(False, flag=True, help="reproducible data order, RNG and kernels")
    audit_samples: bool = setting(False, flag=True, help="write RUN/audit/*.jsonl: sample ids per step")
    max_failures: int = setting(3, flag=True, help="automatic restarts after a worker or node dies; -1: unlimited")

    def checks(self):
        yield from at_least(self, 1, "batch_size", "grad_accum", "max_steps", "epochs", "log_every",
                            "checkpoint_every", "keep_checkpoints")
        yield from at_least(self, 0, "warmup_steps", "shuffle_buffer", "epochs_per_pass")
        yield from at_least(self, -1, "max_failures")
        yield self.lr > 0, f"lr must be positive, got {self.lr}"
        yield 0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
        yield self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}"
        yield not self.offload_params or self.zero_stage == 3, "offload_params needs zero_stage 3"
        yield not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer needs zero_stage 1, 2 or 3"


@dataclass(frozen=True)
class ScaleConfig(Settings):
    workers: int = setting(2, flag=True, help="Ray Train workers")
    use_gpu: bool = setting(False, help="one GPU per worker (gpus_per_worker)")
    cpus_per_worker: float = setting(1.0, help="CPUs each worker holds")
    gpus_per_worker: float = setting(1.0, help="GPUs each worker holds, only with use_gpu")
    resources_per_worker: dict = setting(factory=dict, help="extra custom resources per worker")

    def checks(self):
        yield from at_least(self, 1, "workers")
        yield from at_least(self, 0, "cpus_per_worker", "gpus_per_worker")
