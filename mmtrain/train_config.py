"""The train and scale sections of the run config (mmtrain/config.py).

Apart from the model, so that the command line builds its `train` flags from these fields
without importing torch: every command's start pays for what its parser imports.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.settings import Settings, at_least, setting

from .elastic import parse_workers

PRECISIONS = ("fp32", "bf16", "fp16")
CONTRASTIVE_LOSSES = ("global", "local")
ATTENTIONS = ("sdpa", "math")


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
    activation_checkpointing: bool = setting(False, flag=True,
                                             help="recompute each transformer block's activations in backward")
    compile: bool = setting(False, flag=True, help="torch.compile the model (through DeepSpeed's engine.compile)")
    contrastive_loss: str = setting("global", choices=CONTRASTIVE_LOSSES, flag=True,
                                    help="global: every rank computes the full N x N logits; local: each rank its "
                                         "own rows against all gathered embeddings (same loss and gradients)")
    attention: str = setting("sdpa", choices=ATTENTIONS, flag=True,
                             help="sdpa: torch's scaled_dot_product_attention (flash / memory-efficient kernels on "
                                  "GPU); math: the explicit softmax(QK^T)V reference")
    profile_steps: str | None = setting(None, flag=True,
                                        help="A:B: a torch.profiler trace of optimizer steps A to B under RUN/profile/")
    peak_tflops: float | None = setting(None, help="peak dense bf16 TFLOP/s of one worker's device, for mfu; "
                                                   "default: looked up by the GPU's name (none on CPU)")
    check_collectives: bool = setting(False, help="debugging: refuse a collective on a tensor that is not on the "
                                                  "training device, as NCCL does, also on CPU runs")
    log_every: int = setting(10, help="optimizer steps between metrics lines")
    checkpoint_every: int = setting(100, flag=True,
                                    help="optimizer steps between checkpoints; a final one is always written")
    keep_checkpoints: int = setting(3, help="complete checkpoints kept")
    shuffle_buffer: int = setting(256, help="local shuffle buffer per worker (rows)")
    prefetch_batches: int = setting(4, help="batches each worker prefetches")
    samples_per_epoch: int | None = setting(None, help="samples per epoch of a mixture of data.sources (default: the "
                                                       "sum of the sources' sizes, or of repeat x size)")
    epochs_per_pass: int = setting(0, help="epochs per Ray Data execution; 0: as many as fit in 200k samples")
    deterministic: bool = setting(False, flag=True, help="reproducible data order, RNG and kernels")
    audit_samples: bool = setting(False, flag=True, help="write RUN/audit/*.jsonl: sample ids per step")
    max_failures: int = setting(3, flag=True, help="automatic restarts after a worker or node dies; -1: unlimited")
    mlflow: str | None = setting(None, flag=True,
                                 help="also track the run in MLflow: a local folder, a file: URI or an http(s):// "
                                      "tracking server (mlflow_tracking.py); a re-run continues the same MLflow run "
                                      "(default: the one RUN/mlflow.json records, else none)")

    def checks(self):
        yield from at_least(self, 1, "batch_size", "grad_accum", "max_steps", "epochs", "log_every",
                            "checkpoint_every", "keep_checkpoints", "samples_per_epoch")
        yield from at_least(self, 0, "warmup_steps", "shuffle_buffer", "epochs_per_pass")
        yield from at_least(self, -1, "max_failures")
        yield self.lr > 0, f"lr must be positive, got {self.lr}"
        yield 0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
        yield self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}"
        yield not self.offload_params or self.zero_stage == 3, "offload_params needs zero_stage 3"
        yield not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer needs zero_stage 1, 2 or 3"
        yield not (self.check_collectives and self.compile), (
            "check_collectives watches every torch call from Python, which torch.compile cannot trace: "
            "use it without compile")
        yield self.peak_tflops is None or self.peak_tflops > 0, f"peak_tflops must be positive, got {self.peak_tflops}"
        yield self.profile_steps is None or profile_range(self.profile_steps) is not None, (
            f"profile_steps must be A:B with 1 <= A <= B (optimizer steps), got {self.profile_steps!r}")

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """profile_steps as (first, last) optimizer step, both included; None when not profiling."""
        return profile_range(self.profile_steps) if self.profile_steps else None


def profile_range(text: str) -> tuple[int, int] | None:
    """"A:B" -> (A, B) with 1 <= A <= B; None when it is not that."""
    first, sep, last = str(text).partition(":")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        return None
    a, b = int(first), int(last)
    return (a, b) if 1 <= a <= b else None


@dataclass(frozen=True)
class ScaleConfig(Settings):
    workers: int = setting(2, flag=True, flag_type=parse_workers,
                           help="Ray Train workers: N, or MIN-MAX to go on with fewer (down to MIN) when nodes are "
                                "lost and grow back (up to MAX) when they return; the global batch stays "
                                "batch_size x grad_accum x MAX (mmtrain/elastic.py)")
    min_workers: int | None = setting(None, help="elastic runs: the fewest workers (scale.workers is then the most); "
                                                 "None: a fixed count")
    resize_check_s: float = setting(60.0, help="elastic runs: seconds between Ray Train's looks for capacity to "
                                               "grow into")
    use_gpu: bool = setting(False, flag=True, help="train on GPUs: gpus_per_worker each, NCCL between workers")
    cpus_per_worker: float = setting(1.0, help="CPUs each worker holds")
    gpus_per_worker: float = setting(1.0, flag=True, help="GPUs each worker holds, only with use_gpu "
                                                           "(given on the command line, it also sets use_gpu)")
    resources_per_worker: dict = setting(factory=dict, help="extra custom resources per worker")

    def checks(self):
        yield from at_least(self, 1, "workers", "min_workers")
        yield from at_least(self, 0, "cpus_per_worker", "gpus_per_worker", "resize_check_s")
        yield (self.min_workers is None or self.min_workers <= self.workers,
               f"min_workers {self.min_workers} is above workers {self.workers} (the most): give MIN-MAX with MIN <= MAX")
        yield not self.use_gpu or self.gpus_per_worker > 0, "use_gpu needs gpus_per_worker above 0"
        # Ray may pack two workers holding a fraction each onto one GPU, and NCCL refuses two ranks
        # on one device ("Duplicate GPU detected")
        yield (not self.use_gpu or self.workers == 1 or self.gpus_per_worker >= 1,
               f"{self.workers} workers on GPUs need at least one GPU each (gpus_per_worker "
               f"{self.gpus_per_worker:g}): NCCL cannot join two ranks on one GPU")

    @property
    def elastic(self) -> bool:
        """The worker count may change during the run (between min_workers and workers)."""
        return self.min_workers is not None and self.min_workers < self.workers

    @property
    def fewest(self) -> int:
        """The fewest workers the run trains on."""
        return self.min_workers if self.elastic else self.workers

    @property
    def described(self) -> str:
        """"2" or "1-2": the worker count as --workers takes it."""
        return f"{self.min_workers}-{self.workers}" if self.elastic else str(self.workers)
