"""Transformer building blocks shared by the encoders, the fusion stack and the caption decoder.

Pre-LayerNorm blocks (GPT-2 / ViT): stable without warmup tricks at every preset size.

Masks follow `F.scaled_dot_product_attention`'s boolean convention: a key mask is bool
[B, S] and True marks a real token that may be attended to.

A rule kept throughout the model for DeepSpeed ZeRO-3: a module's forward only touches its
own parameters directly and reaches its children's parameters by calling them, because ZeRO-3
gathers a module's partitioned parameters in that module's own forward hook.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


class MLP(nn.Module):
    def __init__(self, width: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


def math_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                   dropout_p: float) -> Tensor:
    """softmax(QK^T / sqrt(d)) V written out, with `F.scaled_dot_product_attention`'s arguments and
    boolean mask convention (True: may attend): the reference its fused kernels (flash /
    memory-efficient on GPU) are checked against. Scores and softmax are float32 in any dtype."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if is_causal:
        T, S = scores.shape[-2:]
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p).to(v.dtype)
    return weights @ v


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention.

    Queries and keys/values have separate projections so one class serves both uses.
    `attention` picks the kernel: "sdpa" (torch's fused kernels) or "math" (`math_attention`).
    """

    def __init__(self, width: int, heads: int, dropout: float, attention: str = "sdpa") -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.attend = F.scaled_dot_product_attention if attention == "sdpa" else math_attention
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        ctx = x if context is None else context
        B, T, C = x.shape
        S = ctx.shape[1]
        h = self.heads
        q = self.q(x).view(B, T, h, C // h).transpose(1, 2)                    # [B, h, T, hd]
        k, v = self.kv(ctx).view(B, S, 2, h, C // h).permute(2, 0, 3, 1, 4)  # 2 x [B, h, S, hd]
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # broadcast over heads, queries
        if causal and attn_mask is not None:
            raise ValueError("causal attention takes no key mask (right padding never reaches a real query)")
        y = self.attend(q, k, v, attn_mask=attn_mask, is_causal=causal,
                        dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """Pre-LN block: self-attention, optional cross-attention, MLP, each residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, cross: bool = False,
                 attention: str = "sdpa") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout, attention)
        self.ln_x = nn.LayerNorm(width) if cross else None
        self.cross = Attention(width, heads, dropout, attention) if cross else None
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None, causal: bool, context: Tensor | None,
                context_mask: Tensor | None) -> Tensor:
        """Called by `Transformer` only, which passes every argument (masks already `never_empty`)."""
        x = x + self.attn(self.ln_1(x), key_mask=key_mask, causal=causal)
        if self.cross is not None:
            x = x + self.cross(self.ln_x(x), context=context, key_mask=context_mask)
        return x + self.mlp(self.ln_2(x))


def never_empty(key_mask: Tensor | None) -> Tensor | None:
    """Let rows with no real key attend to every key.

    A row whose keys are all masked (a missing modality) makes softmax compute 0/0 = NaN, and a
    NaN poisons the gradients even when that row's output is later multiplied by zero. Such
    rows' outputs are discarded by the callers, so what they attend to does not matter.
    """
    if key_mask is None:
        return None
    return key_mask | ~key_mask.any(dim=-1, keepdim=True)


class Transformer(nn.Module):
    """A stack of blocks plus the final LayerNorm."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        cross: bool = False,
        gradient_checkpointing: bool = False,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, cross, attention) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.gradient_checkpointing = gradient_checkpointing

    def forward(
        self,
        x: Tensor,
        key_mask: Tensor | None = None,
        causal: bool = False,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        key_mask, context_mask = never_empty(key_mask), never_empty(context_mask)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant checkpointing: works with kwargs, inputs that need no grad and ZeRO-3 hooks.
                x = checkpoint(block, x, key_mask, causal, context, context_mask, use_reentrant=False)
            else:
                x = block(x, key_mask, causal, context, context_mask)
        return self.ln_f(x)


def init_weights(module: nn.Module) -> None:
    """GPT-2 style init: N(0, 0.02) weights, zero biases. Applied with `model.apply`."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def learned(*shape: int) -> nn.Parameter:
    """A learned embedding table (positions, CLS, type tokens), N(0, 0.02)."""
    return nn.Parameter(torch.randn(*shape) * 0.02)
