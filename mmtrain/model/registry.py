"""Name -> model factory, so a run config can pick a model by `ModelConfig.name`.

A factory is any callable `(ModelConfig) -> nn.Module`, a class included. The model it builds
must follow the contract of `MultimodalModel`:
  forward(batch) -> dict with a scalar "loss" tensor (plus optional float-like parts to log),
  encode(batch)  -> dict of L2-normalized [B, D] embeddings "image", "text", "audio".

    @register_model("my_model")
    class MyModel(nn.Module):
        def __init__(self, cfg: ModelConfig): ...

    model = build_model(ModelConfig(name="my_model"))

"multimodal" is registered when `mmtrain.model` is imported.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch.nn as nn

from .config import ConfigError, ModelConfig

Factory = Callable[[ModelConfig], nn.Module]
F = TypeVar("F", bound=Factory)

_REGISTRY: dict[str, Factory] = {}


def register_model(name: str, *, override: bool = False) -> Callable[[F], F]:
    """Decorator registering `factory` under `name`; a second registration needs override=True."""

    def decorator(factory: F) -> F:
        if name in _REGISTRY and not override and _REGISTRY[name] is not factory:
            raise ValueError(f"model {name!r} is already registered (pass override=True to replace it)")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"unknown model {cfg.name!r}; registered: {', '.join(available_models())}")
    return _REGISTRY[cfg.name](cfg)
