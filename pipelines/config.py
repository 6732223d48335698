"""Typed settings of the data plane.

One `DataConfig` describes how raw members become model-ready arrays and which
samples are rejected. It is embedded in the training run config (mmtrain/config.py)
and recorded in every preprocessed output, so that training on raw shards and
training on preprocessed shards apply the very same transforms.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "json")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg")


@dataclass(frozen=True)
class ImageConfig:
    size: int = 224                 # output is size x size RGB, shorter side resized then center-cropped
    min_size: int = 32              # filter: shorter side of the *original* image below this
    jpeg_quality: int = 95          # quality of the re-encoded JPEG in preprocessed shards


@dataclass(frozen=True)
class TextConfig:
    min_chars: int = 3              # filter: caption shorter than this (after normalization)
    max_chars: int = 1000           # filter: caption longer than this (after normalization)


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16_000
    seconds: float = 10.0           # clip length after trim/pad
    max_source_seconds: float = 60.0  # filter: original audio longer than this
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 512                # >= window; 512 keeps the FFT a power of two

    @property
    def win_length(self) -> int:
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.seconds))

    @property
    def num_frames(self) -> int:
        return 1 + self.num_samples // self.hop_length


@dataclass(frozen=True)
class DataConfig:
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    max_member_bytes: int = 256 * 1024 * 1024  # a member above this is refused unread
    dedup: bool = True              # drop samples whose raw content was already kept

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DataConfig":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown data config key(s): {', '.join(sorted(unknown))}")
        sub = {"image": ImageConfig, "text": TextConfig, "audio": AudioConfig}
        kwargs = {}
        for name, value in d.items():
            if name in sub:
                value = dict(value or {})
                known = {f.name for f in dataclasses.fields(sub[name])}
                bad = set(value) - known
                if bad:
                    raise ValueError(f"unknown data.{name} config key(s): {', '.join(sorted(bad))}")
                value = sub[name](**value)
            kwargs[name] = value
        return cls(**kwargs)
