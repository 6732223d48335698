"""Typed settings of the model and its size presets.

One frozen `ModelConfig` describes the whole network. It is plain data: it goes to JSON with
`dataclasses.asdict`, comes back with `ModelConfig.from_dict` (which refuses unknown keys so a
typo in a run config fails loudly instead of being silently ignored), and is saved next to
every checkpoint so a model can be rebuilt without the code that trained it.

All encoders, the fusion stack and the caption decoder share one `width`: no projection layers
between stages, and one number to scale.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import ConfigError
from pipelines.settings import Settings, at_least, setting

from ..train_config import ATTENTIONS, CONTRASTIVE_LOSSES

PAD_ID = 0  # the batch contract pads text with 0 (ByteTokenizer and BPETokenizer agree)
MEL_NORMS = ("none", "whisper")
IMAGE_POOLS = ("mean", "cls")


@dataclass(frozen=True)
class ModelConfig(Settings):
    LABEL = "model config"

    name: str = "multimodal"        # registry key used by build_model
    # --- size (defaults are the "tiny" preset) ---
    width: int = 128                # model dimension of every transformer
    heads: int = 4
    mlp_ratio: float = 4.0
    image_depth: int = 2            # ViT blocks
    text_depth: int = 1             # text encoder blocks
    audio_depth: int = 1            # audio encoder blocks
    fusion_depth: int = 1           # blocks over the concatenated image+audio tokens
    decoder_depth: int = 1          # caption decoder blocks (self + cross attention)
    embed_dim: int = 128            # contrastive embedding size
    # --- inputs ---
    patch_size: int = 32            # big patches keep the image token count small (224/32 -> 49)
    patch_split: int = 4            # >1: embed (patch/split)^2 sub-patches, GELU, merge split x split per token
    image_size: int = 224           # largest image side; positions are sliced for smaller inputs
    n_mels: int = 80
    max_audio_frames: int = 1024    # longest mel accepted (10 s at 10 ms hop is 1001 frames)
    audio_stride: int = 16          # time stride of the conv stem: frames per audio token
    vocab_size: int = 259           # ByteTokenizer; set from the tokenizer when using BPE
    max_text_len: int = 64          # longest token sequence (BOS ... EOS) accepted
    mel_norm: str = setting("whisper", choices=MEL_NORMS,
                            help="none | whisper: per-clip max-8 floor, then (x + 4) / 4")
    image_pool: str = setting("mean", choices=IMAGE_POOLS,
                              help="mean (of the patch tokens) | cls: image state for the contrastive embedding")
    # --- training ---
    dropout: float = 0.0
    gradient_checkpointing: bool = False  # recompute blocks in backward: less memory, ~30% more compute
    gather_across_ranks: bool = True      # contrastive negatives from all ranks (OpenCLIP style)
    # the speed switches (set from the train section; each gives the default's loss and gradients)
    contrastive_loss: str = setting("global", choices=CONTRASTIVE_LOSSES,
                                    help="global: every rank computes the N x N logits | local: its own rows")
    attention: str = setting("sdpa", choices=ATTENTIONS,
                             help="sdpa: F.scaled_dot_product_attention | math: explicit softmax(QK^T/sqrt(d))V")
    caption_weight: float = 1.0
    contrastive_weight: float = 1.0

    def checks(self):
        # fail at construction, with one line, rather than deep inside a forward pass
        yield from at_least(self, 1, "width", "heads", "embed_dim", "patch_size", "patch_split", "image_size",
                            "n_mels", "max_audio_frames", "audio_stride", "vocab_size")
        yield from at_least(self, 0, "image_depth", "text_depth", "audio_depth", "fusion_depth", "decoder_depth",
                            "mlp_ratio", "dropout")
        yield self.max_text_len >= 2, f"max_text_len must hold at least BOS and EOS, got {self.max_text_len}"
        yield self.width % self.heads == 0, f"width {self.width} is not divisible by heads {self.heads}"
        yield (self.image_size % self.patch_size == 0,
               f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        yield (self.patch_size % self.patch_split == 0,
               f"patch_split must divide patch_size {self.patch_size}, got {self.patch_split}")
        yield self.dropout < 1.0, f"dropout must be below 1, got {self.dropout}"

    @property
    def max_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # + CLS

    @property
    def max_audio_tokens(self) -> int:
        return -(-self.max_audio_frames // self.audio_stride)  # the stem pads time up to a multiple of the stride

    @classmethod
    def preset(cls, name: str, /, **overrides) -> "ModelConfig":  # /: a "name" override is the model's
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name].to_dict(), **overrides})


# Sizes. Parameter counts are those of the default vocab (259); see tests/test_model.py and
# `count_parameters`. Block params are ~12*width^2, so depth x width^2 sets the size.
# The larger presets keep the original image/audio front ends (one linear 16 px patch embedding,
# CLS pooling, raw log-mel): the tiny settings above were measured on tiny only.
_ORIGINAL_FRONT_END = {"patch_split": 1, "image_pool": "cls", "mel_norm": "none", "patch_size": 16}
_SIZE_FIELDS = ("width", "heads", "image_depth", "text_depth", "audio_depth", "fusion_depth", "decoder_depth",
                "embed_dim", "audio_stride")

PRESETS: dict[str, ModelConfig] = {
    # ~2M params: the CPU default. Few tokens (50 image, 63 audio, 64 text) and 6 blocks in all, so a
    # step on a CPU core takes a fraction of a second. Its front ends (8 px sub-patches merged into each
    # 32 px token, mean-pooled image tokens, Whisper's log-mel scaling) are chosen for how fast they
    # learn the synthetic corpus (benchmarks/README.md, "Measurements behind design choices").
    "tiny": ModelConfig(),
    **{name: ModelConfig(**dict(zip(_SIZE_FIELDS, size)), **_ORIGINAL_FRONT_END) for name, size in {
        #         width heads image text audio fusion decoder embed audio_stride
        "small": (384, 6, 6, 4, 4, 2, 4, 256, 8),          # ~40M: a quick single-GPU run
        "base": (768, 12, 8, 4, 6, 2, 4, 512, 4),          # ~184M: ViT-B width for the GPU MFU benchmark
        "large": (1536, 24, 12, 6, 8, 3, 6, 768, 4),       # ~1.06B: multi-GPU with ZeRO-2/3
        "xl": (2560, 32, 14, 6, 8, 4, 5, 1024, 4),         # ~3.1B: Adam states alone (~37 GB fp32) need ZeRO-3
    }.items()},
}
