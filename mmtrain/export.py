"""Consolidate a run's latest checkpoint (ZeRO shards of any stage) into one safetensors
file that loads into the bare model class, without DeepSpeed or Ray:

    from mmtrain.export import load_exported
    model, model_cfg, tokenizer_info = load_exported("model.safetensors")
"""
from __future__ import annotations

import json
import os

import torch

from .checkpoint import DS_TAG, CheckpointDamaged, CheckpointStore, local_problem, say_incomplete
from .checkpoint.location import run_store
from .model import ModelConfig, build_model


def consolidated_state_dict(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint of ZeRO stage 0, 1, 2 or 3."""
    with open(os.path.join(checkpoint_dir, "train_state.json")) as f:
        stage = json.load(f)["zero_stage"]
    tag_dir = os.path.join(checkpoint_dir, DS_TAG)
    if stage == 0:
        states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    # DeepSpeed's own consolidation: it knows every stage's partitioning and padding. It
    # unpickles (weights_only=False, not configurable in DeepSpeed 0.19), so load_checkpoint
    # checks every file against the sha256 our save recorded first
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)
    return {k: v.float().contiguous() for k, v in state.items()}


def load_checkpoint(store: CheckpointStore, checkpoint: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the run config it was saved with, consolidated fp32 weights) of a checkpoint of
    `store`; from remote storage, through a temporary local copy of its DeepSpeed files.
    Every file read is first checked against the done records (CheckpointDamaged if not)."""
    def wanted(name: str) -> bool:
        return "/" not in name or name.startswith(f"{DS_TAG}/")

    expected = store.all_records(checkpoint)
    with store.local_copy(checkpoint, wanted) as local:
        why = local_problem(local, expected, wanted, (DS_TAG,))
        if why is not None:
            raise CheckpointDamaged(say_incomplete(checkpoint, why))
        with open(os.path.join(local, "run_config.json")) as f:
            run = json.load(f)
        return run, consolidated_state_dict(local)


def data_plane_settings(data: dict) -> dict:
    """A run's `data` settings as an export keeps them: what decodes an input. The run's data
    sources are not the model's (and a loaded model's DataConfig has no such key)."""
    return {k: v for k, v in data.items() if k != "sources"}


def export(run_dir: str, output: str, checkpoint: str | None = None, storage_options: dict | None = None) -> dict:
    """`storage_options`: for the run's checkpoint storage (default: those it was trained with)."""
    store = run_store(run_dir, storage_options)
    checkpoint, run, state = load_latest(store, checkpoint)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to export; train first")
    tok_file = os.path.join(run_dir, "tokenizer", "tokenizer.json")
    bpe_file = os.path.join(run_dir, "tokenizer", "bpe.json")
    write_export(state, output, model=run["model"], data=run["data"],
                 tokenizer=open(tok_file).read() if os.path.exists(tok_file) else "{}",
                 # the vocabulary itself: the file is used without the run
                 tokenizer_bpe=open(bpe_file).read() if os.path.exists(bpe_file) else None,
                 checkpoint=os.path.basename(checkpoint))
    model, _, _ = load_exported(output)
    latest = store.latest_complete()
    diff = verify_probe(model, run_dir) if latest == checkpoint else None
    return {"output": output, "checkpoint": checkpoint, "tensors": len(state),
            "parameters": int(sum(v.numel() for v in state.values())), "probe_max_abs_diff": diff}


def write_export(state: dict[str, torch.Tensor], output: str, *, model: dict, data: dict, tokenizer: str,
                 tokenizer_bpe: str | None = None, checkpoint: str | None = None) -> str:
    """The one writer of an exported model: the weights, and in the metadata what `load_exported`
    and the inference commands read (model config, data settings, tokenizer)."""
    from safetensors.torch import save_file

    metadata = {"model_config": json.dumps(model), "data_config": json.dumps(data_plane_settings(data)),
                "tokenizer": tokenizer}
    if checkpoint is not None:
        metadata["checkpoint"] = checkpoint
    if tokenizer_bpe is not None:
        metadata["tokenizer_bpe"] = tokenizer_bpe
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, output, metadata=metadata)
    return output


def export_untrained(output: str, config: str | None = None) -> str:
    """A model as `export` writes it, with freshly initialized weights and the byte tokenizer
    (no vocabulary): for benchmarks and tests that need a model file, not a trained one."""
    from .config import load_run_config
    from .tokenizer import ByteTokenizer

    cfg = load_run_config(config, data_paths=["-"], run_dir="-", tokenizer="byte")
    return write_export(build_model(cfg.model).state_dict(), output, model=cfg.model.to_dict(),
                        data=cfg.data.to_dict(), tokenizer=json.dumps(ByteTokenizer().to_dict()))


def load_latest(store: CheckpointStore, checkpoint: str | None = None, log=print
                ) -> tuple[str | None, dict, dict[str, torch.Tensor]]:
    """(checkpoint, run config, weights) of `checkpoint` (in any folder, reached with the
    store's options), or of the newest complete checkpoint of `store` whose files match their
    records, falling back past damaged ones with one line each. (None, {}, {}) if there is none."""
    if checkpoint is not None:
        return (checkpoint, *load_checkpoint(CheckpointStore.containing(checkpoint, store.storage_options),
                                             checkpoint))
    before = None
    while (checkpoint := store.latest_complete(log, before=before)) is not None:
        try:
            return (checkpoint, *load_checkpoint(store, checkpoint))
        except CheckpointDamaged as e:
            log(str(e))
            before = checkpoint
    return None, {}, {}


def load_exported(path: str, device: str = "cpu"):
    """(model in eval mode, ModelConfig, metadata dict) from an exported file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    cfg = ModelConfig.from_dict(json.loads(metadata["model_config"]))
    model = build_model(cfg)
    model.load_state_dict(load_file(path, device=device), strict=True)
    model.eval()
    return model, cfg, metadata


def verify_probe(model, run_dir: str) -> float | None:
    """Largest difference between the bare model's and the training engine's embeddings on
    the probe batch the run saved at its end (None if the run has no probe)."""
    path = os.path.join(run_dir, "probe.pt")
    if not os.path.exists(path):
        return None
    probe = torch.load(path, weights_only=True)  # a dict of tensors: no pickled objects needed
    with torch.no_grad():
        out = model.encode(probe["batch"])
    return max(float((out[k].float() - v).abs().max()) for k, v in probe["encode"].items())
