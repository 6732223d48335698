"""The three unimodal encoders.

Each takes its batch tensors and returns
  tokens [B, N, width]  final-LayerNorm'd token states (image and audio ones feed the fusion stack),
  mask   [B, N] bool    True on real tokens,
  emb    [B, embed_dim] the pooled, projected, L2-normalized embedding used by the contrastive loss.

Inputs are cast to the parameters' dtype: the data arrives as float32 but under DeepSpeed bf16
the weights are bf16 and nothing else casts the batch.

Sequence lengths (image side, text length, mel frames) come from the batch; the learned
position tables are sized by the config maxima and sliced.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import PAD_ID, ModelConfig
from .layers import Transformer, learned


def make_transformer(cfg: ModelConfig, depth: int, cross: bool = False) -> Transformer:
    return Transformer(cfg.width, depth, cfg.heads, cfg.mlp_ratio, cfg.dropout, cross, cfg.gradient_checkpointing,
                       cfg.attention)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the real tokens of each row ([B, N, C], [B, N] -> [B, C])."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def whisper_norm(mel: Tensor, valid_frames: Tensor) -> Tensor:
    """Whisper's log-mel scaling: floor each clip at its loudest (valid) bin - 8, then (x + 4) / 4.

    Log10 mels run from about -10 (silence) to 2; this maps a clip to about [-1, 1.5] with the
    silence floor set relative to the clip's own level, so quiet and loud clips look alike.
    Only valid frames set the maximum: padding must not change a clip's embedding.
    """
    peak = mel.masked_fill(~valid_frames[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # a clip with no frames
    return (torch.maximum(mel, peak - 8.0) + 4.0) / 4.0


class ImageEncoder(nn.Module):
    """ViT: non-overlapping conv patches, learned 2D positions, a CLS token.

    The contrastive embedding pools the mean of the patch tokens (`image_pool="mean"`) or the CLS
    state ("cls"). With `patch_split` s > 1 each patch token comes from s x s sub-patches, each
    linearly embedded, through a GELU, and merged by an s x s conv: the first layer has the FLOPs
    of the plain patch conv, and the token count is unchanged. On the synthetic corpus (a coloured
    shape on a random gradient) the plain linear 32 px patch, pooled from CLS, barely learned
    image-text retrieval in 300 steps; the split stem with mean pooling learns it in ~120.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.grid = cfg.image_size // cfg.patch_size
        self.pool = cfg.image_pool
        if cfg.patch_split == 1:
            self.patch = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        else:
            # Same FLOPs as the plain patch conv for the first layer, plus a cheap nonlinear merge:
            # per-sub-patch features ("is this corner red") instead of one linear view of the patch.
            sub, k = cfg.patch_size // cfg.patch_split, cfg.patch_split
            self.patch = nn.Sequential(
                nn.Conv2d(3, cfg.width, sub, stride=sub), nn.GELU(), nn.Conv2d(cfg.width, cfg.width, k, stride=k))
        self.cls = learned(1, 1, cfg.width)
        # Kept as a 2D grid so a smaller image takes the top-left gh x gw positions: slicing a
        # flattened table would give patches the positions of other rows.
        self.pos = learned(1, self.grid, self.grid, cfg.width)
        self.transformer = make_transformer(cfg, cfg.image_depth)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.patch(image.to(self.pos.dtype))                       # [B, C, gh, gw]
        B, C, gh, gw = x.shape
        if gh > self.grid or gw > self.grid:
            raise ValueError(f"image {tuple(image.shape[-2:])} is larger than the config's image_size")
        x = x.flatten(2).transpose(1, 2) + self.pos[:, :gh, :gw].reshape(1, gh * gw, C)
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)
        x = self.transformer(x)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return x, mask, F.normalize(self.proj(pooled), dim=-1)


class TextEncoder(nn.Module):
    """Bidirectional transformer over token embeddings, masked-mean pooled.

    Masked mean rather than the EOS state: it does not depend on which id the tokenizer uses
    for EOS, and with bidirectional attention every position sees the whole caption anyway.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_len = cfg.max_text_len
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = learned(1, cfg.max_text_len, cfg.width)
        self.transformer = make_transformer(cfg, cfg.text_depth)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        L = ids.shape[1]
        if L > self.max_len:
            raise ValueError(f"text length {L} exceeds max_text_len {self.max_len}")
        mask = ids != PAD_ID
        x = self.tok(ids) + self.pos[:, :L]
        x = self.transformer(x, key_mask=mask)
        return x, mask, F.normalize(self.proj(masked_mean(x, mask)), dim=-1)


class AudioEncoder(nn.Module):
    """Log-mel -> strided Conv1d stem -> transformer -> masked mean.

    The stem treats the mel bins as channels. Its first conv cuts time into non-overlapping
    windows of `audio_stride` frames (kernel = stride, like ViT patches; 16 frames = 160 ms for
    tiny); a kernel-3 conv then mixes neighbouring windows. Both are followed by GELU. The
    patch-like first conv is much cheaper than a tower of overlapping stride-2 convs, which would
    run at T/2 frames with n_mels x width weights. Time is right-padded to a multiple of the
    stride, so T frames give ceil(T / stride) tokens and a row's valid tokens are
    ceil(mel_frames / stride).

    With `mel_norm="whisper"` the log10 mel (about -10 for silence up to 2) is first scaled as
    Whisper does: floored at the clip's own maximum - 8, then (x + 4) / 4, to about [-1, 1.5].
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.stride = cfg.audio_stride
        self.max_frames = cfg.max_audio_frames
        self.mel_norm = cfg.mel_norm
        self.stem = nn.Sequential(
            nn.Conv1d(cfg.n_mels, cfg.width, kernel_size=cfg.audio_stride, stride=cfg.audio_stride),
            nn.GELU(),
            nn.Conv1d(cfg.width, cfg.width, kernel_size=3, padding=1),
            nn.GELU(),
        )
        self.pos = learned(1, cfg.max_audio_tokens, cfg.width)
        self.transformer = make_transformer(cfg, cfg.audio_depth)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)

    def forward(self, mel: Tensor, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        T = mel.shape[-1]
        if T > self.max_frames:
            raise ValueError(f"mel has {T} frames, more than max_audio_frames {self.max_frames}")
        frames = frames.clamp(0, T)
        valid_frames = torch.arange(T, device=mel.device) < frames[:, None]
        # Zero the padding so it cannot reach the last valid tokens through the conv receptive
        # field: a clip's embedding must not depend on how far its batch was padded.
        x = mel.to(self.pos.dtype)
        if self.mel_norm == "whisper":
            x = whisper_norm(x, valid_frames)
        x = x * valid_frames[:, None, :]
        x = F.pad(x, (0, -T % self.stride))                            # a partial last window still counts
        x = self.stem(x).transpose(1, 2)                               # [B, ceil(T/stride), C]
        n = x.shape[1]
        mask = torch.arange(n, device=mel.device) < (frames[:, None] + self.stride - 1) // self.stride
        x = self.transformer(x + self.pos[:, :n], key_mask=mask)
        return x, mask, F.normalize(self.proj(masked_mean(x, mask)), dim=-1)
