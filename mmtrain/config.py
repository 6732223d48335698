"""The run config: one typed object that flows from the CLI to every training worker.

    RunConfig
      data   : pipelines.config.DataConfig   how samples are decoded/transformed
      model  : mmtrain.model.ModelConfig     the network (preset + overrides)
      train  : TrainConfig                   optimization, precision, ZeRO, schedule
      scale  : ScaleConfig                   Ray Train workers and their resources
      ...    : paths, tokenizer, seed

A JSON file (configs/*.json) gives any subset; the CLI overrides a few fields; every
unknown key and every impossible value is refused with one line before Ray starts.
The resolved config is saved as RUN/run_config.json and into every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import fsspec

from pipelines.config import DataConfig

from .credentials import looks_like_secret, without_secrets
from .model import PRESETS, ModelConfig

PRECISIONS = ("fp32", "bf16", "fp16")
TOKENIZERS = ("byte", "bpe")


class ConfigError(ValueError):
    """A run config that cannot work; the message is one line saying what to change."""


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32                # per worker, per micro step
    grad_accum: int = 1
    max_steps: int | None = None        # stop after this many optimizer steps ...
    epochs: int = 20                    # ... or after this many passes over the data
    lr: float = 1e-3
    min_lr_ratio: float = 0.05          # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    precision: str = "fp32"             # fp32 | bf16 | fp16
    zero_stage: int = 2
    offload_optimizer: bool = False     # ZeRO optimizer states to CPU memory
    offload_params: bool = False        # ZeRO-3 parameters to CPU memory
    activation_checkpointing: bool = False
    log_every: int = 10
    checkpoint_every: int = 100         # optimizer steps; a final checkpoint is always written
    keep_checkpoints: int = 3
    shuffle_buffer: int = 256           # local shuffle buffer per worker (rows)
    prefetch_batches: int = 4
    epochs_per_pass: int = 0            # epochs per Ray Data execution; 0: as many as fit in 200k samples
    deterministic: bool = False
    audit_samples: bool = False
    max_failures: int = 3               # automatic restarts after a worker or node dies

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be at least 1, got {self.grad_accum}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be at least 1, got {self.max_steps}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}"),
            (not self.offload_params or self.zero_stage == 3, "offload_params needs zero_stage 3"),
            (not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer needs zero_stage 1, 2 or 3"),
            (self.log_every >= 1, f"log_every must be at least 1, got {self.log_every}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be at least 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}"),
            (self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}"),
            (self.epochs_per_pass >= 0, f"epochs_per_pass must be >= 0 (0: automatic), got {self.epochs_per_pass}"),
            (self.max_failures >= -1, f"max_failures must be >= -1 (-1: unlimited), got {self.max_failures}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class ScaleConfig:
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0        # only with use_gpu
    resources_per_worker: dict = field(default_factory=dict)  # extra custom resources

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker < 0:
            raise ConfigError(f"cpus_per_worker must be >= 0, got {self.cpus_per_worker}")


@dataclass(frozen=True)
class RunConfig:
    data_paths: tuple[str, ...] = ()
    run_dir: str = ""
    preset: str = "tiny"
    tokenizer: str = "byte"             # byte | bpe (trained on the corpus, saved with the run)
    bpe_vocab_size: int = 2048
    seed: int = 0
    storage_options: dict = field(default_factory=dict)
    checkpoint_storage: str = ""        # a path or fsspec URL (s3://bucket/run); "": the run directory
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def validate(self) -> "RunConfig":
        if not self.data_paths:
            raise ConfigError("no training data: pass --data with shards or a preprocessed folder")
        if not self.run_dir:
            raise ConfigError("no run directory: pass --run-dir")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        self.train.validate()
        self.scale.validate()
        for url in (*self.data_paths, self.checkpoint_storage):
            if looks_like_secret(url):
                # paths are saved with the run, shown by Ray's dashboard and in job entrypoints
                raise ConfigError("a --data or --checkpoint-storage path carries a credential (a password, token or "
                                  "signature in the URL): pass credentials with --storage-options or the environment")
        if self.checkpoint_storage:
            try:
                fsspec.get_filesystem_class(fsspec.utils.get_protocol(self.checkpoint_storage))
            except (ValueError, ImportError) as e:
                raise ConfigError(f"checkpoint storage {self.checkpoint_storage}: {e}") from None
        if self.model.image_size < self.data.image.size:
            raise ConfigError(f"model.image_size {self.model.image_size} is smaller than data.image.size "
                              f"{self.data.image.size}")
        if self.model.n_mels != self.data.audio.n_mels:
            raise ConfigError(f"model.n_mels {self.model.n_mels} != data.audio.n_mels {self.data.audio.n_mels}")
        if self.data.audio.num_frames > self.model.max_audio_frames:
            raise ConfigError(f"{self.data.audio.num_frames} mel frames per clip exceed model.max_audio_frames "
                              f"{self.model.max_audio_frames}; shorten data.audio.seconds or raise it")
        return self

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
    def from_dict(cls, d: dict) -> "RunConfig":
        """Build from a (possibly partial) dict; `model` may hold `preset` overrides only."""
        d = dict(d or {})
        _reject_unknown(cls, d, "")
        try:
            preset = d.get("preset", cls.preset)
            if preset not in PRESETS:
                raise ConfigError(f"unknown model preset {preset!r}; choose from {', '.join(PRESETS)}")
            model = ModelConfig.from_dict({**PRESETS[preset].to_dict(), **dict(d.pop("model", {}) or {})})
            data = DataConfig.from_dict(d.pop("data", None))
            train_d = dict(d.pop("train", {}) or {})
            _reject_unknown(TrainConfig, train_d, "train.")
            if "betas" in train_d:
                train_d["betas"] = tuple(train_d["betas"])
            scale_d = dict(d.pop("scale", {}) or {})
            _reject_unknown(ScaleConfig, scale_d, "scale.")
            if "data_paths" in d:
                d["data_paths"] = tuple(d["data_paths"])
            return cls(data=data, model=model, train=TrainConfig(**train_d), scale=ScaleConfig(**scale_d), **d)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None

    def replace(self, **sections) -> "RunConfig":
        """Copy with top-level fields or whole sections replaced (`train={"lr": ...}` merges)."""
        d = self.to_dict()
        for name, value in sections.items():
            if isinstance(value, dict) and isinstance(d.get(name), dict):
                d[name] = {**d[name], **value}
            else:
                d[name] = value
        d["model"] = {k: v for k, v in d["model"].items()}
        return RunConfig.from_dict(d)


def _reject_unknown(cls, d: dict, prefix: str) -> None:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in sorted(unknown))}")


def load_run_config(path: str | None, **overrides) -> RunConfig:
    """A config file (or defaults) with `overrides` merged on top, validated."""
    base: dict = {}
    if path:
        try:
            with open(path) as f:
                base = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
    for name, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            base[name] = {**base.get(name, {}), **value}
        else:
            base[name] = value
    return RunConfig.from_dict(base).validate()
