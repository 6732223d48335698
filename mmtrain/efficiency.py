"""How efficiently a run uses its devices, for every metrics line (metrics_window.py): model
FLOPs per second (`tflops_per_s`), model FLOPs utilization (`mfu`) against the device's peak,
and peak device memory (`gpu_mem_allocated_gb`, `gpu_mem_reserved_gb`).

What is counted: the training FLOPs (forward + backward) of the model's matmuls and attention,
as model/flops.py estimates them, for every micro-step this rank runs, padded rows and the
empty batches of a rank that ran out of data included (the model computes them all), with the
vocabulary head counted only at the positions the model applies it to (the caption targets).
Activation checkpointing's recomputed forward is not counted, nor are optimizer updates,
embedding lookups, norms or the contrastive logits: MFU counts the model's FLOPs, not the
hardware's work. tflops_per_s is the FLOPs of all ranks / the world size / the line's wall time
(the mean over ranks), data waits included, like samples_per_s.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from .device import max_over_ranks
from .model.config import PAD_ID, ModelConfig
from .model.flops import flops_per_batch, head_flops_per_target

# Peak dense (no structured sparsity) BF16 tensor-core TFLOP/s of one GPU, by the model token of
# torch.cuda.get_device_name() and, where one model comes in variants, a variant token; the first
# row whose tokens are all in the name wins, so variants come before their model's default.
# Sources: NVIDIA's datasheets (nvidia.com/en-us/data-center/<model>/). Where a datasheet gives
# only the "with sparsity" figure (H100, H200, L4, B200, GB200), the dense one is half of it.
PEAK_BF16_TFLOPS: tuple[tuple[str, str | None, float], ...] = (
    ("H100", "NVL", 835.0),    # 1,671 with sparsity
    ("H100", "PCIE", 756.0),   # 1,513 with sparsity
    ("H100", None, 989.0),     # SXM ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    ("H200", "NVL", 835.0),    # 1,671 with sparsity
    ("H200", None, 989.0),     # SXM: 1,979 with sparsity
    ("H800", "PCIE", 756.0),   # the H100's compute, export variant
    ("H800", None, 989.0),
    ("GH200", None, 989.0),    # the Grace Hopper superchip's H100/H200 GPU
    ("A100", None, 312.0),     # 40GB and 80GB, SXM4 and PCIe alike
    ("A800", None, 312.0),     # the A100's compute, export variant
    ("A10G", None, 125.0),     # AWS's A10 part; NVIDIA publishes no A10G datasheet: the A10's figure
    ("A10", None, 125.0),
    ("A30", None, 165.0),
    ("A40", None, 149.7),
    ("L4", None, 121.0),       # 242 with sparsity
    ("L40S", None, 362.0),
    ("L40", None, 181.0),
    ("B200", None, 2250.0),    # HGX B200: 36 PFLOPS with sparsity for 8 GPUs
    ("GB200", None, 2500.0),   # GB200 NVL72: 360 PFLOPS with sparsity for 72 GPUs
)

GIB = 2**30


def peak_bf16_tflops(device_name: str) -> float | None:
    """The table's peak for a name as torch reports it ("NVIDIA H100 80GB HBM3",
    "NVIDIA A100-SXM4-40GB"); None for a GPU the table does not know.

    Names are compared by whole tokens (split at anything not a letter or digit), so "L4" is not
    found in "NVIDIA L40S", nor "A10" in "NVIDIA A100-PCIE-40GB", nor "H200" in "NVIDIA GH200".
    """
    tokens = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    for model, variant, tflops in PEAK_BF16_TFLOPS:
        if model in tokens and (variant is None or variant in tokens):
            return tflops
    return None


def device_peak_tflops(device: torch.device, configured: float | None, rank: int) -> float | None:
    """`train.peak_tflops` when set; else on a GPU the table's figure for its name, None (and a
    warning from rank 0) for a GPU it does not know; else None: a CPU has no peak to compare with."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_tflops(name)
    if peak is None and rank == 0:
        print(f"rank 0: warning: no peak bf16 TFLOP/s known for GPU {name!r}: mfu is null; "
              "set it with --set train.peak_tflops=N")
    return peak


def caption_targets_count(inputs: dict) -> torch.Tensor:
    """Positions the model applies its vocabulary head to (a 0-dim tensor on the batch's device,
    not synced): the non-PAD next-token targets of rows with a caption and an image or a clip,
    as MultimodalModel._caption_loss picks them (an image is present when flagged; a clip when
    flagged and at least one frame long; a caption's presence shows in its non-PAD targets)."""
    ids = inputs["text_ids"]
    source = inputs["image_present"].bool() | (inputs["audio_present"].bool() & (inputs["mel_frames"] > 0))
    rows = inputs["text_present"].bool() & source
    return ((ids[:, 1:] != PAD_ID) & rows[:, None]).sum()


class EfficiencyMeter:
    """One rank's efficiency between two metrics lines: `count` every micro-step, `values` at
    each line (a collective on GPU runs: every rank calls it)."""

    def __init__(self, model_cfg: ModelConfig, device: torch.device, peak_tflops: float | None = None,
                 rank: int = 0, head_everywhere: bool = False):
        # head_everywhere: a compiled model applies the vocabulary head at every decoder position
        # (static shapes, see MultimodalModel._caption_loss), not only at the caption targets
        self.cfg, self.device, self.head_everywhere = model_cfg, device, head_everywhere
        self.peak = device_peak_tflops(device, peak_tflops, rank)
        self._body: dict[tuple, float] = {}  # FLOPs of a batch shape without the head, computed once
        self._head = head_flops_per_target(model_cfg)
        self.flops, self._targets = 0.0, None

    def count(self, inputs: dict) -> None:
        """Adds one micro-step's FLOPs. Its vocabulary-head positions stay a tensor on the device
        until `take_flops`, so counting them adds no host-device sync to a step."""
        image, ids, mel = inputs["image"], inputs["text_ids"], inputs["mel"]
        shape = (ids.shape[0], image.shape[-1], ids.shape[1], mel.shape[-1])
        if shape not in self._body:
            self._body[shape] = flops_per_batch(self.cfg, *shape, caption_targets=None if self.head_everywhere else 0)
        self.flops += self._body[shape]
        if self.head_everywhere:
            return
        targets = caption_targets_count(inputs)
        self._targets = targets if self._targets is None else self._targets + targets

    def take_flops(self) -> float:
        """The FLOPs counted since the last call."""
        flops = self.flops + (self._head * float(self._targets) if self._targets is not None else 0.0)
        self.flops, self._targets = 0.0, None
        return flops

    def values(self, flops_per_worker: float, seconds: float) -> dict:
        """tflops_per_s, mfu and the peak memory since the last call (the largest on any rank)."""
        tflops = flops_per_worker / max(seconds, 1e-9) / 1e12
        allocated, reserved = self._peak_memory_gb()
        return {"tflops_per_s": tflops, "mfu": tflops / self.peak if self.peak else None,
                "gpu_mem_allocated_gb": allocated, "gpu_mem_reserved_gb": reserved}

    def _peak_memory_gb(self) -> tuple[float | None, float | None]:
        """GiB allocated and reserved by torch's caching allocator at their peak since the last
        call, the maximum over ranks (one all-reduce on the training device); None on CPU."""
        if self.device.type != "cuda":
            return None, None
        peak = [torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)]
        torch.cuda.reset_peak_memory_stats(self.device)
        if dist.is_available() and dist.is_initialized():
            peak = max_over_ranks(peak, self.device).tolist()
        allocated, reserved = (x / GIB for x in peak)
        return allocated, reserved
