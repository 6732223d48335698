"""A trained model ready to use: from a run directory (its newest complete checkpoint) or an
exported `model.safetensors`, with the data settings and tokenizer it was trained with."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from pipelines.config import DataConfig
from pipelines.errors import UserError

from ..model import ModelConfig, build_model
from ..tokenizer import BPETokenizer, Tokenizer, load_tokenizer, tokenizer_from_dict


@dataclass
class LoadedModel:
    model: torch.nn.Module  # MultimodalModel, eval mode, on `device`
    model_cfg: ModelConfig
    data_cfg: DataConfig   # the transforms the model was trained on: inputs get the same
    tokenizer: Tokenizer
    origin: str            # what was loaded: "RUN_DIR (checkpoint NAME)" or the file
    device: torch.device

    @property
    def embed_dim(self) -> int:
        return self.model_cfg.embed_dim


def load_model(path: str, *, device: str | torch.device = "cpu", storage_options: dict | None = None) -> LoadedModel:
    """`path`: a run directory (local or remote, its newest complete checkpoint whose files
    match their records) or an exported `.safetensors` file. A path that is neither, or a run
    without a complete checkpoint, is a one-line UserError."""
    device = torch.device(device)
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise UserError(f"--model {path}: no such file")
        return _from_exported(path, device)
    return _from_run(path, device, storage_options)


def _from_run(run_dir: str, device: torch.device, storage_options: dict | None) -> LoadedModel:
    from ..checkpoint.location import run_store
    from ..config import RunConfig
    from ..export import load_latest

    checkpoint, run, weights = load_latest(run_store(run_dir, storage_options))
    if checkpoint is None:
        raise UserError(f"--model {run_dir}: no complete checkpoint (a run directory after `train`, "
                        f"or an exported .safetensors file)")
    cfg = RunConfig.from_dict({**run, "storage_options": storage_options or {}})
    model = build_model(cfg.model)
    model.load_state_dict(weights, strict=True)
    tok_dir = os.path.join(run_dir, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        raise UserError(f"--model {run_dir}: no tokenizer/ beside the checkpoints")
    return LoadedModel(model.eval().to(device), cfg.model, cfg.data, load_tokenizer(tok_dir),
                       f"{run_dir} (checkpoint {os.path.basename(checkpoint)})", device)


def _from_exported(path: str, device: torch.device) -> LoadedModel:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        model_cfg = ModelConfig.from_dict(json.loads(meta["model_config"]))
        data_cfg = DataConfig.from_dict(json.loads(meta.get("data_config") or "{}"))
        tokenizer = tokenizer_from_dict(json.loads(meta.get("tokenizer") or "{}"), meta.get("tokenizer_bpe"))
    except (KeyError, ValueError, OSError, SafetensorError) as e:  # not one of our exports, or not safetensors
        raise UserError(f"--model {path}: not a model exported by `ray_job.py export` ({type(e).__name__}: {e})")
    model = build_model(model_cfg)
    model.load_state_dict(load_file(path, device="cpu"), strict=True)
    return LoadedModel(model.eval().to(device), model_cfg, data_cfg, tokenizer, path, device)


__all__ = ["LoadedModel", "load_model", "BPETokenizer"]
