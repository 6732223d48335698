"""The multimodal model: three encoders, a fusion stack, a caption decoder, and the losses.

    image ─ ImageEncoder ─┬─ emb ──────────────┐
    text  ─ TextEncoder  ─┼─ emb ──────────────┼─ InfoNCE per pair (image_text, image_audio, text_audio)
    mel   ─ AudioEncoder ─┼─ emb ──────────────┘
                          └─ image+audio tokens ─ Fusion ─ cross-attn ─ CaptionDecoder(text) ─ CE

Any modality may be missing on any row (the batch's *_present flags). Missing rows are still run
through their encoder (they are zeros) and then masked out, instead of being skipped, so every
rank calls the same modules with the same shapes: DeepSpeed ZeRO-3 all-gathers a module's
parameters when it is called, and a rank that skipped a module would hang the others. A
modality is skipped only when its key is absent from the batch, which the data schema fixes
for all ranks alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from .config import PAD_ID, ModelConfig
from .encoders import AudioEncoder, ImageEncoder, TextEncoder, make_transformer
from .layers import init_weights, learned
from .losses import (caption_loss_from_logits, caption_targets, contrastive_loss, gather_rows, global_from_shares,
                     local_contrastive_loss, own_rows)
from .registry import register_model

MODALITIES = ("image", "text", "audio")
PAIRS = (("image", "text"), ("image", "audio"), ("text", "audio"))
_DATA_KEY = {"image": "image", "text": "text_ids", "audio": "mel"}


@dataclass
class Encoded:
    emb: dict[str, Tensor]                        # [B, embed_dim], zeros on absent rows, all modalities
    present: dict[str, Tensor]                    # [B] bool, all modalities
    tokens: dict[str, tuple[Tensor, Tensor]]      # image/audio token states and masks, for fusion


class Fusion(nn.Module):
    """Self-attention over the concatenated image and audio tokens.

    Why concatenation + self-attention: one key padding mask handles any subset of modalities
    per row (a missing modality's tokens are simply hidden), every token can attend across
    modalities in every layer, and it is a plain transformer, so it scales like the encoders.
    Learned type embeddings tell the two token kinds apart. Text is deliberately not fused: it
    is the captioning target, and fusing it would leak the answer into the decoder's conditioning.

    A learned null token is always visible: a row with neither image nor audio still has one
    key to attend to, and the decoder has a defined (unconditional) context for it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.type_emb = learned(2, cfg.width)  # 0: image, 1: audio
        self.null = learned(1, 1, cfg.width)
        self.transformer = make_transformer(cfg, cfg.fusion_depth)

    def forward(self, tokens: dict[str, tuple[Tensor, Tensor]], batch_size: int) -> tuple[Tensor, Tensor]:
        parts = [self.null.expand(batch_size, -1, -1)]
        masks = [torch.ones(batch_size, 1, dtype=torch.bool, device=self.null.device)]
        for i, name in enumerate(("image", "audio")):
            if name in tokens:
                x, mask = tokens[name]
                parts.append(x + self.type_emb[i])
                masks.append(mask)
        mask = torch.cat(masks, dim=1)
        return self.transformer(torch.cat(parts, dim=1), key_mask=mask), mask


class CaptionDecoder(nn.Module):
    """Causal transformer over text tokens, cross-attending to the fused tokens in every block.

    Returns hidden states; the model applies `head` only at positions that have a target (the
    vocabulary projection is the largest activation for a BPE vocab). The head is not tied to
    the token embedding: tying shares one tensor between two modules, which safetensors refuses
    to save as-is and ZeRO-3 handles only with extra care; it costs vocab x width parameters.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_len = cfg.max_text_len
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = learned(1, cfg.max_text_len, cfg.width)
        self.transformer = make_transformer(cfg, cfg.decoder_depth, cross=True)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)

    def forward(self, ids: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        L = ids.shape[1]
        if L > self.max_len:
            raise ValueError(f"text length {L} exceeds max_text_len {self.max_len}")
        x = self.tok(ids) + self.pos[:, :L]
        # Causal self-attention needs no padding mask: text is right-padded, so a real token
        # never sees a PAD, and PAD positions carry no loss.
        return self.transformer(x, causal=True, context=context, context_mask=context_mask)


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = ImageEncoder(cfg)
        self.text = TextEncoder(cfg)
        self.audio = AudioEncoder(cfg)
        self.fusion = Fusion(cfg)
        self.decoder = CaptionDecoder(cfg)
        self.apply(init_weights)
        # CLIP's temperature: logits = exp(logit_scale) * cosine, starting at 1/0.07. Shape [1], not
        # a 0-dim scalar: DeepSpeed broadcasts parameters viewed as bytes, which a 0-dim bf16 tensor refuses.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    # ---------------------------------------------------------------- encoding
    def _encode(self, batch: dict[str, Tensor], run: tuple[str, ...] = MODALITIES) -> Encoded:
        """Run the encoders named in `run` whose data key is in the batch."""
        ref = next((batch[k] for k in _DATA_KEY.values() if k in batch), None)
        if ref is None:
            raise ValueError(f"batch has none of {', '.join(_DATA_KEY.values())}")
        B, device = ref.shape[0], ref.device
        emb: dict[str, Tensor] = {}
        present: dict[str, Tensor] = {}
        tokens: dict[str, tuple[Tensor, Tensor]] = {}
        for name in MODALITIES:
            key = _DATA_KEY[name]
            if key not in batch:
                present[name] = torch.zeros(B, dtype=torch.bool, device=device)
            else:
                present[name] = batch.get(f"{name}_present", torch.ones(B, dtype=torch.bool, device=device)).bool()
            if key not in batch or name not in run:
                emb[name] = torch.zeros(B, self.cfg.embed_dim, device=device)
                continue
            if name == "image":
                x, mask, e = self.image(batch["image"])
            elif name == "text":
                x, mask, e = self.text(batch["text_ids"])
            else:
                mel = batch["mel"]
                frames = batch.get("mel_frames", torch.full((B,), mel.shape[-1], device=device))
                x, mask, e = self.audio(mel, frames)
            # A row flagged present but with no real token (all PAD, 0 frames) has nothing to embed.
            p = present[name] = present[name] & mask.any(dim=1)
            emb[name] = e.float() * p[:, None]
            if name != "text":
                tokens[name] = (x, mask & p[:, None])
        return Encoded(emb, present, tokens)

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """L2-normalized embeddings {"image", "text", "audio"}: [B, embed_dim] each, zeros on absent rows."""
        return self._encode(batch).emb

    # ---------------------------------------------------------------- losses
    def _caption_loss(self, batch: dict[str, Tensor], enc: Encoded) -> Tensor:
        if "text_ids" not in batch:
            return self.logit_scale.sum() * 0.0  # a zero that is still part of the graph
        ids = batch["text_ids"]
        # Only rows with a caption and something to caption it from.
        rows = enc.present["text"] & (enc.present["image"] | enc.present["audio"])
        fused, fused_mask = self.fusion(enc.tokens, ids.shape[0])
        target = caption_targets(ids, rows)                         # teacher forcing: predict ids[1:]
        hidden = self.decoder(ids[:, :-1], fused, fused_mask)
        if torch.compiler.is_compiling():
            # every position through the head: static shapes, so one graph, not a graph break and a
            # recompile as the caption count changes (the same loss: other targets are ignored)
            return caption_loss_from_logits(self.decoder.head(hidden).flatten(0, 1), target.flatten())
        keep = target != -100
        return caption_loss_from_logits(self.decoder.head(hidden[keep]), target[keep])

    def caption_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean next-token CE of the captions given image and/or audio (for eval; runs no text encoder)."""
        return self._caption_loss(batch, self._encode(batch, run=("image", "audio")))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.cfg
        enc = self._encode(batch)
        # Clamped at 100 as in CLIP, so the temperature cannot run away.
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp().squeeze(0)

        # One all-gather for all three embeddings and one for the flags (when distributed). Every
        # modality is gathered even if absent, so every rank runs the same collectives.
        emb = torch.cat([enc.emb[m] for m in MODALITIES], dim=1)
        present = torch.stack([enc.present[m] for m in MODALITIES], dim=1)
        if cfg.gather_across_ranks:
            emb, present = gather_rows(emb, present)
        embs = dict(zip(MODALITIES, emb.split(cfg.embed_dim, dim=1)))
        flags = dict(zip(MODALITIES, present.unbind(dim=1)))

        if cfg.contrastive_loss == "local" and cfg.gather_across_ranks:
            rows = own_rows(emb.shape[0])
            shares = [local_contrastive_loss(embs[a], embs[b], flags[a] & flags[b], scale, rows) for a, b in PAIRS]
            pair_losses = global_from_shares(torch.stack(shares)).unbind()
        else:
            pair_losses = [contrastive_loss(embs[a], embs[b], flags[a] & flags[b], scale) for a, b in PAIRS]
        parts = {f"loss_{a}_{b}": loss for (a, b), loss in zip(PAIRS, pair_losses)}
        parts["loss_caption"] = self._caption_loss(batch, enc)
        loss = cfg.contrastive_weight * sum(parts[f"loss_{a}_{b}"] for a, b in PAIRS)
        loss = loss + cfg.caption_weight * parts["loss_caption"]
        # Parts are detached: they are for logging, and a logger that keeps them must not keep graphs.
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}, "logit_scale": scale.detach()}

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def caption_context(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """What the caption decoder cross-attends to: the fused image+audio tokens [B, S, width],
        their key mask [B, S], and which rows have an image or audio at all [B] bool (the others
        see only the fusion's null token). Runs no text encoder."""
        enc = self._encode(batch, run=("image", "audio"))
        B = enc.present["image"].shape[0]
        fused, fused_mask = self.fusion(enc.tokens, B)
        return fused, fused_mask, enc.present["image"] | enc.present["audio"]

    @torch.no_grad()
    def generate_caption(
        self,
        batch: dict[str, Tensor],
        max_len: int | None = None,
        bos_id: int = 1,
        eos_id: int = 2,
        stop_early: bool = True,
    ) -> Tensor:
        """Greedy captions [B, <= max_len] int64: BOS, tokens, EOS, then PAD. Call in eval mode.

        Without a KV cache each step re-runs the decoder on the prefix: simple, and cheap at
        caption lengths. Under ZeRO-3 pass stop_early=False so every rank runs the same steps.
        """
        enc = self._encode(batch, run=("image", "audio"))
        B = enc.present["image"].shape[0]
        fused, fused_mask = self.fusion(enc.tokens, B)
        max_len = min(max_len or self.cfg.max_text_len, self.cfg.max_text_len)
        ids = torch.full((B, 1), bos_id, dtype=torch.long, device=fused.device)
        done = torch.zeros(B, dtype=torch.bool, device=fused.device)
        for _ in range(max_len - 1):
            hidden = self.decoder(ids, fused, fused_mask)[:, -1]
            nxt = self.decoder.head(hidden).argmax(dim=-1).masked_fill(done, PAD_ID)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if stop_early and bool(done.all()):
                break
        return ids


@register_model("multimodal")
def _build_multimodal(cfg: ModelConfig) -> nn.Module:
    return MultimodalModel(cfg)
