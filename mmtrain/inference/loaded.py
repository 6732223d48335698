"""A trained model ready to use: from a run directory (its newest complete checkpoint) or an
exported `model.safetensors`, with the data settings and tokenizer it was trained with."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
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
        return _from_exported(path, device, storage_options)
    return _from_run(path, device, storage_options)


# the identity hashes carry this number: a change to what they cover changes it
FINGERPRINT_FORMAT = 1


def model_fingerprint(loaded: LoadedModel) -> str:
    """What makes two sets of vectors comparable: the weights (bytes), the data transform and
    the dimension. `embed` records it; `search` and `serve` refuse a model whose vectors
    would live in another space than the table's."""
    h = hashlib.sha256()
    for name, tensor in sorted(loaded.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({"data": loaded.data_cfg.to_dict(), "dim": loaded.embed_dim, "format": FINGERPRINT_FORMAT},
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


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
    # the data plane's settings, as an export holds them (the run's data sources are not the model's)
    return LoadedModel(model.eval().to(device), cfg.model, cfg.data.without_sources(),
                       _run_tokenizer(run_dir, storage_options),
                       f"{run_dir} (checkpoint {os.path.basename(checkpoint)})", device)


def _run_tokenizer(run_dir: str, storage_options: dict | None) -> Tokenizer:
    """The run's tokenizer/ folder, local or in a bucket (copied to a temporary folder: the
    tokenizer reads files, and keeps nothing open once loaded)."""
    from pipelines.storage import filesystem, is_local, join

    fs, path = filesystem(join(run_dir, "tokenizer"), storage_options)
    if not fs.exists(join(path, "tokenizer.json")):
        raise UserError(f"--model {run_dir}: no tokenizer/ beside the checkpoints")
    if is_local(fs):
        return load_tokenizer(path)
    with tempfile.TemporaryDirectory(prefix="mmtrain-tokenizer-") as tmp:
        for name in fs.ls(path, detail=False):
            fs.get(name, os.path.join(tmp, os.path.basename(name.rstrip("/"))))
        return load_tokenizer(tmp)


def _from_exported(path: str, device: torch.device, storage_options: dict | None) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    from pipelines.storage import filesystem

    fs, inner = filesystem(path, storage_options)
    if not fs.isfile(inner):
        raise UserError(f"--model {path}: no such file")
    try:
        with fs.open(inner, "rb") as f:  # local disk or a bucket alike: the file is read once
            data = f.read()
        meta = _safetensors_metadata(data)
        model_cfg = ModelConfig.from_dict(json.loads(meta["model_config"]))
        data_cfg = DataConfig.from_dict(json.loads(meta.get("data_config") or "{}"))
        tokenizer = tokenizer_from_dict(json.loads(meta.get("tokenizer") or "{}"), meta.get("tokenizer_bpe"))
        weights = load_bytes(data)
    except (KeyError, ValueError, OSError, SafetensorError) as e:  # not a safetensors file, or not our export
        raise UserError(f"--model {path}: not a model exported by `ray_job.py export` ({type(e).__name__}: {e})")
    model = build_model(model_cfg)
    model.load_state_dict(weights, strict=True)
    return LoadedModel(model.eval().to(device), model_cfg, data_cfg, tokenizer, path, device)


def _safetensors_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file's JSON header (its first 8 bytes give the
    header's length), checked for size before anything is parsed."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, 100 << 20):
        raise ValueError(f"its header claims {n} bytes")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


__all__ = ["LoadedModel", "load_model", "BPETokenizer"]
