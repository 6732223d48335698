"""The multimodal model: config and presets, the network, the registry, FLOPs accounting.

    from mmtrain.model import ModelConfig, build_model
    model = build_model(ModelConfig.preset("tiny"))
    out = model(batch)            # {"loss", "loss_image_text", ..., "logit_scale"}
    emb = model.encode(batch)     # {"image", "text", "audio"}: [B, embed_dim], L2-normalized

Files: config.py (ModelConfig, PRESETS), layers.py (transformer blocks), encoders.py (image,
text, audio), losses.py (InfoNCE, captioning CE, cross-rank gather), multimodal.py (fusion,
decoder, the model), generation.py (beam search over the caption decoder), registry.py,
flops.py (parameter and FLOPs counts for MFU).
"""
from .config import PAD_ID, PRESETS, ModelConfig
from .flops import count_parameters, flops_per_sample, token_counts
from .multimodal import MultimodalModel  # importing it registers "multimodal"
from .registry import available_models, build_model, register_model

__all__ = [
    "PAD_ID",
    "PRESETS",
    "ModelConfig",
    "MultimodalModel",
    "available_models",
    "build_model",
    "count_parameters",
    "flops_per_sample",
    "register_model",
    "token_counts",
]
