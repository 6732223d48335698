"""Parameter counting and a training-FLOPs estimate, for model-FLOPs utilization (MFU).

MFU = flops_per_sample * samples_per_second / peak_flops_of_the_hardware.

The estimate is the usual one (Kaplan et al. 2020; PaLM appendix B; nanoGPT's estimate_mfu):
  - every weight of a matmul costs 2 FLOPs per token it is applied to in the forward pass and
    4 in the backward pass: 6 * params * tokens;
  - attention scores and the weighted sum cost 2 * 2 * width * (query tokens) * (key tokens) in
    the forward pass, times 3 with the backward: 12 * width * Tq * Tk per layer. Causal masking
    is not discounted (the kernels mostly compute the masked half anyway; PaLM counts it too).
Embedding lookups, LayerNorms, biases, activations and the losses are left out (a few %).
Recomputation by gradient checkpointing is not counted: MFU counts useful model FLOPs only.
Every row of a batch costs the same: the model runs each encoder, the fusion stack and the decoder
on every row, absent modalities included (they are zeros; see multimodal.py), so a batch's FLOPs
follow from its shapes. The one exception is the vocabulary head, which the model applies only at
positions with a caption target: `flops_per_batch` takes their count when it is known.
"""
from __future__ import annotations

import torch.nn as nn

from .config import ModelConfig


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    # Under ZeRO-3 a partitioned parameter's numel() is 0 on this rank; DeepSpeed keeps the full
    # size in ds_numel.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def token_counts(
    cfg: ModelConfig, image_size: int | None = None, text_len: int | None = None, audio_frames: int | None = None
) -> tuple[int, int, int]:
    """(image_tokens incl. CLS, text_len, audio_tokens) for the given input sizes (default: the maxima)."""
    s = image_size or cfg.image_size
    t = audio_frames or cfg.max_audio_frames
    return (s // cfg.patch_size) ** 2 + 1, text_len or cfg.max_text_len, -(-t // cfg.audio_stride)


def _stack(cfg: ModelConfig, depth: int, tokens: int) -> float:
    """A self-attention stack: 6 * block matmul params * tokens + attention."""
    w = cfg.width
    block_params = 4 * w * w + 2 * int(w * cfg.mlp_ratio) * w  # q, kv, proj + MLP in and out
    return depth * (6 * block_params * tokens + 12 * w * tokens * tokens)


def flops_per_sample(cfg: ModelConfig, image_tokens: int, text_len: int, audio_tokens: int) -> float:
    """Training (forward + backward) FLOPs for one sample; see the module docstring.

    image_tokens counts the CLS token, text_len is the padded caption length (BOS ... EOS PAD*),
    audio_tokens is after the conv stem (see `token_counts`).
    """
    w = cfg.width
    patches = image_tokens - 1
    # Patch embedding: 3 x patch^2 -> width per patch, whatever the split; a split stem adds its
    # split x split merge conv (width * split^2 -> width) per patch.
    stem_params = 3 * cfg.patch_size**2 * w + (w * w * cfg.patch_split**2 if cfg.patch_split > 1 else 0)
    image = 6 * stem_params * patches + _stack(cfg, cfg.image_depth, image_tokens)
    text = _stack(cfg, cfg.text_depth, text_len)

    # Stem: a kernel=stride conv (n_mels -> width) and a kernel-3 conv (width -> width), per token.
    stem = 6 * (cfg.n_mels * w * cfg.audio_stride + 3 * w * w) * audio_tokens
    audio = stem + _stack(cfg, cfg.audio_depth, audio_tokens)

    fused = image_tokens + audio_tokens + 1  # + the null token
    fusion = _stack(cfg, cfg.fusion_depth, fused)

    dec_len = text_len - 1  # teacher forcing drops the last position
    cross = cfg.decoder_depth * (
        6 * (2 * w * w) * dec_len          # cross-attention q and output projections, on text tokens
        + 6 * (2 * w * w) * fused          # cross-attention k and v, on the fused tokens
        + 12 * w * dec_len * fused         # cross-attention scores and sum
    )
    decoder = _stack(cfg, cfg.decoder_depth, dec_len) + cross + head_flops_per_target(cfg) * dec_len
    projections = 6 * w * cfg.embed_dim * 3  # the three pooled embeddings
    return float(image + text + audio + fusion + decoder + projections)


def head_flops_per_target(cfg: ModelConfig) -> float:
    """Training FLOPs of the vocabulary head (width -> vocab_size) at one decoder position."""
    return float(6 * cfg.width * cfg.vocab_size)


def flops_per_batch(cfg: ModelConfig, rows: int, image_size: int, text_len: int, audio_frames: int,
                    caption_targets: int | None = None) -> float:
    """Training FLOPs of one batch of `rows` rows of these padded sizes (image side in pixels,
    text length in tokens, mel frames). The head is counted at `caption_targets` positions, or
    at every decoder position of every row when that is None (what `flops_per_sample` assumes)."""
    per_row = flops_per_sample(cfg, *token_counts(cfg, image_size, text_len, audio_frames))
    if caption_targets is None:
        return rows * per_row
    head = head_flops_per_target(cfg)
    return rows * (per_row - head * (text_len - 1)) + head * caption_targets
