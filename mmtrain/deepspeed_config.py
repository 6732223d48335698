"""The standard DeepSpeed JSON config, built from the run config.

Everything DeepSpeed does (ZeRO stage, offload, precision, accumulation, clipping,
optimizer, LR schedule) is expressed in its own config format, so the file written to
RUN/deepspeed_config.json can be read, diffed and reused outside this project.
"""
from __future__ import annotations

import math

from .config import ConfigError, RunConfig


def total_steps(cfg: RunConfig, samples_per_epoch: int | None, world_size: int, epochs_per_pass: int = 1) -> int:
    """Optimizer steps the schedule spans: --max-steps, else the steps of every pass of epochs
    (a pass is one stream, so only its last step is short)."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    if not samples_per_epoch:
        raise ConfigError("the number of samples per epoch is unknown; pass --max-steps")
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    steps, epochs = 0, cfg.train.epochs
    while epochs > 0:
        k = min(epochs, epochs_per_pass)
        steps += math.ceil(math.ceil(samples_per_epoch * k / world_size) / per_step)
        epochs -= k
    return steps


def for_world_size(ds_config: dict, world_size: int) -> dict:
    """The config a group of `world_size` workers trains with: its global batch (train_batch_size)
    kept, the gradient accumulation adapted (elastic runs, mmtrain/elastic.py); where the global
    batch does not divide into whole micro batches of every worker, the nearest below it."""
    micro, total = ds_config["train_micro_batch_size_per_gpu"], ds_config["train_batch_size"]
    accum = max(1, total // (micro * world_size))
    return {**ds_config, "gradient_accumulation_steps": accum, "train_batch_size": micro * accum * world_size}


def build_deepspeed_config(cfg: RunConfig, world_size: int, steps: int, *, on_gpu: bool) -> dict:
    t = cfg.train
    zero: dict = {
        "stage": t.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": on_gpu,  # overlapping needs CUDA streams; on CPU it only adds buffers
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
    }
    if t.zero_stage == 3:
        zero.update({
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_param_persistence_threshold": 1e5,
            "stage3_prefetch_bucket_size": 5e7,
        })
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    warmup = max(1, min(t.warmup_steps, steps - 1)) if steps > 1 else 1
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay,
                **_adamw_implementation(on_gpu, t.offload_optimizer),
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(steps, warmup + 1), "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.0, "cos_min_ratio": t.min_lr_ratio, "warmup_type": "linear",
            },
        },
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own metrics do the reporting
        "wall_clock_breakdown": False,
    }


def _adamw_implementation(on_gpu: bool, offload_optimizer: bool) -> dict:
    """Which AdamW DeepSpeed builds. Torch's (`torch_adam`) on the device: on GPU its fused
    kernel (DeepSpeed passes the remaining params, `fused` among them, to torch.optim.AdamW),
    which ships with torch, where DeepSpeed's FusedAdam is compiled on the node at the first
    run (nvcc and minutes). With the optimizer offloaded, DeepSpeed's CPUAdam, its one
    optimizer for states in CPU memory."""
    if offload_optimizer:
        return {}
    return {"torch_adam": True, "fused": True} if on_gpu else {"torch_adam": True}
