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
# Members besides the modalities that travel into clean output: plain data only (labels, ids,
# JSON, text, and other images or audio, e.g. a .png beside the .jpg that was used). Everything
# else (notably .pyd/.pickle/.pkl/.pth/.pt/.npy/.npz, which webdataset's default `.decode()`
# unpickles or loads) is left out of the output and counted in `_stats.json`.
EXTRA_EXTS = ("cls", "cls2", "class", "label", "id", "index", "count", "url", "uid", "json", "txt",
              *IMAGE_EXTS, *AUDIO_EXTS)


@dataclass(frozen=True)
class ImageConfig:
    size: int = 224                 # output is size x size RGB, shorter side resized then center-cropped
    min_size: int = 32              # filter: shorter side of the *original* image below this
    jpeg_quality: int = 95          # quality of the re-encoded JPEG in preprocessed shards
    max_pixels: int = 50_000_000    # error image_too_large: width x height above this, refused from the header


@dataclass(frozen=True)
class TextConfig:
    min_chars: int = 3              # filter: caption shorter than this (after normalization)
    max_chars: int = 1000           # filter: caption longer than this (after normalization)
    max_bytes: int = 64 * 1024      # filter caption_too_long: member bytes above this, before any decoding


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16_000
    seconds: float = 10.0           # clip length after trim/pad
    max_source_seconds: float = 60.0  # filter: original audio longer than this
    max_channels: int = 8           # error audio_unsupported: more channels than this (from the header)
    max_source_rate: int = 192_000  # error audio_unsupported: sample rate above this (from the header)
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
    # Limits on what one shard may make a reader hold or do (hostile input; README "Hostile input")
    max_member_bytes: int = 64 * 1024 * 1024   # a member above this (stored, or inflated from .gz) is refused
    max_sample_bytes: int = 128 * 1024 * 1024  # all members of one sample together
    max_sample_members: int = 64               # members of one sample
    max_name_bytes: int = 1024                 # a member name, in UTF-8 bytes
    max_header_bytes: int = 64 * 1024          # one GNU long name/link or pax extended header
    max_header_chain: int = 8                  # extended headers in a row before one member
    dedup: bool = True              # drop samples whose raw content was already kept
    extra_exts: tuple[str, ...] = EXTRA_EXTS  # other members copied to the output (an allow-list)

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
            elif name == "extra_exts":
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)
