"""The run config: one typed object that flows from the CLI to every training worker.

    RunConfig
      data   : pipelines.config.DataConfig   how samples are decoded/transformed
      model  : mmtrain.model.ModelConfig     the network (preset + overrides)
      train  : TrainConfig                   optimization, precision, ZeRO, schedule
      scale  : ScaleConfig                   Ray Train workers and their resources
      ...    : paths, tokenizer, seed

A JSON file (configs/*.json) gives any subset; `train`'s flags (generated from the
TrainConfig and ScaleConfig fields marked flag=True) and `--set SECTION.KEY=VALUE` override
any field; every unknown key, wrongly typed or impossible value is refused with one line
before Ray starts (pipelines/settings.py).
The resolved config is saved as RUN/run_config.json and into every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import fsspec

from pipelines.errors import ConfigError
from pipelines.settings import Settings, at_least, build, read_config_file, setting

from .credentials import looks_like_secret, without_secrets
from .data_sources import TrainDataConfig
from .elastic import elastic_checks, split_worker_range
from .model import PRESETS, ModelConfig
from .train_config import PRECISIONS, ScaleConfig, TrainConfig

__all__ = ["PRECISIONS", "ConfigError", "RunConfig", "ScaleConfig", "TrainConfig", "load_run_config"]

TOKENIZERS = ("byte", "bpe")


@dataclass(frozen=True)
class RunConfig(Settings):
    data_paths: tuple[str, ...] = setting((), help="preprocessed output or raw shards")
    run_dir: str = setting("", help="checkpoints, metrics and logs go here; re-run to resume")
    preset: str = setting("tiny", help="model size preset: " + ", ".join(PRESETS))
    tokenizer: str = setting("byte", choices=TOKENIZERS, help="byte | bpe (trained on the corpus, saved with the run)")
    bpe_vocab_size: int = setting(2048, help="vocabulary of the BPE tokenizer")
    seed: int = setting(0, help="seed of the model init, data order and RNGs")
    storage_options: dict = setting(factory=dict, help="fsspec storage options")
    checkpoint_storage: str = setting("", help="a path or fsspec URL (s3://bucket/run); empty: the run directory")
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def checks(self):
        yield from at_least(self, 1, "bpe_vocab_size")
        yield bool(self.data_paths), "no training data: pass --data with shards or a preprocessed folder"
        yield bool(self.run_dir), "no run directory: pass --run-dir"
        yield (self.train.samples_per_epoch is None or bool(self.data.sources),
               "train.samples_per_epoch sizes the epochs of a mixture: name the sources (--data NAME=PATH[:WEIGHT])")
        # paths are saved with the run, shown by Ray's dashboard and in job entrypoints
        yield (not any(looks_like_secret(url) for url in (*self.data_paths, self.checkpoint_storage)),
               "a --data or --checkpoint-storage path carries a credential (a password, token or signature in "
               "the URL): pass credentials with --storage-options or the environment")
        if self.checkpoint_storage:
            try:
                fsspec.get_filesystem_class(fsspec.utils.get_protocol(self.checkpoint_storage))
            except (ValueError, ImportError) as e:
                yield False, f"checkpoint storage {self.checkpoint_storage}: {e}"
        yield from elastic_checks(self.train, self.scale)
        yield (self.model.image_size >= self.data.image.size,
               f"model.image_size {self.model.image_size} is smaller than data.image.size {self.data.image.size}")
        yield (self.model.n_mels == self.data.audio.n_mels,
               f"model.n_mels {self.model.n_mels} != data.audio.n_mels {self.data.audio.n_mels}")
        yield (self.data.audio.num_frames <= self.model.max_audio_frames,
               f"{self.data.audio.num_frames} mel frames per clip exceed model.max_audio_frames "
               f"{self.model.max_audio_frames}; shorten data.audio.seconds or raise it")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["data_paths"] = list(self.data_paths)
        return d

    def to_public_dict(self) -> dict:
        """to_dict() without credentials in the storage options: what may be stored or shown."""
        d = self.to_dict()
        d["storage_options"] = without_secrets(d["storage_options"])
        return d

    def to_json(self) -> str:
        """The config as saved with the run and in every checkpoint (which may sit in a bucket):
        credentials in the storage options are left out; pass them again, or through the
        environment, to commands that read the run's storage."""
        return json.dumps(self.to_public_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict | None) -> "RunConfig":
        """Build from a (possibly partial) dict; `model` holds overrides of the preset's settings."""
        d = dict(d or {})
        model = d.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError(f"model must be a JSON object, got {model!r}")
        if isinstance(d.get("scale"), dict):  # "workers": "MIN-MAX" (elastic.py)
            d["scale"] = split_worker_range(d["scale"])
        # the model first: the run's own checks compare it with the data settings
        d["model"] = ModelConfig.preset(d.get("preset", cls.preset), **model)
        sources = d["data"].get("sources") if isinstance(d.get("data"), dict) else None
        if sources and not d.get("data_paths") and all(isinstance(s, dict) for s in sources):
            # sources from a config file: data_paths are the paths they name
            d["data_paths"] = [p for s in sources for p in (s.get("paths") or [])]
        cfg = build(cls, d, cls.LABEL)
        if cfg.data.sources and cfg.data_paths != tuple(p for s in cfg.data.sources for p in s.paths):
            raise ConfigError("data_paths and data.sources name different paths: give one of them")
        return cfg

    def replace(self, **sections) -> "RunConfig":
        """Copy with top-level fields or whole sections replaced (`train={"lr": ...}` merges)."""
        return RunConfig.from_dict(merged(self.to_dict(), sections))


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` on top, section by section at every depth (a dict merges into a
    dict; anything else replaces)."""
    out = dict(base)
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            value = merged(out[name], value)
        out[name] = value
    return out


def load_run_config(path: str | None, **overrides) -> RunConfig:
    """A config file (or defaults) with `overrides` merged on top, validated."""
    base = read_config_file(path) if path else {}
    return RunConfig.from_dict(merged(base, {k: v for k, v in overrides.items() if v is not None}))
