"""Typed settings of the data plane.

One `DataConfig` describes how raw members become model-ready arrays and which
samples are rejected. It is embedded in the training run config (mmtrain/config.py)
and recorded in every preprocessed output, so that training on raw shards and
training on preprocessed shards apply the very same transforms.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .settings import Settings, at_least

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
class ImageConfig(Settings):
    size: int = 224                 # output is size x size RGB, shorter side resized then center-cropped
    min_size: int = 32              # filter: shorter side of the *original* image below this
    jpeg_quality: int = 95          # quality of the re-encoded JPEG in preprocessed shards
    max_pixels: int = 50_000_000    # error image_too_large: width x height above this, refused from the header

    def checks(self):
        yield from at_least(self, 1, "size", "max_pixels", "jpeg_quality")
        yield from at_least(self, 0, "min_size")
        yield self.jpeg_quality <= 100, f"jpeg_quality must be at most 100, got {self.jpeg_quality}"


@dataclass(frozen=True)
class TextConfig(Settings):
    min_chars: int = 3              # filter: caption shorter than this (after normalization)
    max_chars: int = 1000           # filter: caption longer than this (after normalization)
    max_bytes: int = 64 * 1024      # filter caption_too_long: member bytes above this, before any decoding

    def checks(self):
        yield from at_least(self, 0, "min_chars", "max_chars", "max_bytes")


@dataclass(frozen=True)
class AudioConfig(Settings):
    sample_rate: int = 16_000
    seconds: float = 10.0           # clip length after trim/pad
    max_source_seconds: float = 60.0  # filter: original audio longer than this
    max_channels: int = 8           # error audio_unsupported: more channels than this (from the header)
    max_source_rate: int = 192_000  # error audio_unsupported: sample rate above this (from the header)
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 512                # >= window; 512 keeps the FFT a power of two

    def checks(self):
        # Bounds that leave the transform something to do. A rate or window it cannot use is
        # the transform's to meet, as a sample error on its own (tests/test_decoder_limits.py
        # and test_hostile_decode.py build such configs); a DataConfig refuses them up front.
        yield from at_least(self, 1, "max_channels", "max_source_rate", "n_mels", "n_fft")
        yield from at_least(self, 0, "seconds", "max_source_seconds", "win_ms")

    def usable(self):
        yield from at_least(self, 1, "sample_rate")
        yield self.hop_length >= 1, f"hop_ms {self.hop_ms} is under one sample at {self.sample_rate} Hz"

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
class DataConfig(Settings):
    LABEL = "data config"

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

    def checks(self):
        yield from at_least(self, 1, "max_member_bytes", "max_sample_bytes", "max_sample_members",
                            "max_name_bytes", "max_header_bytes")
        yield from at_least(self, 0, "max_header_chain")
        yield from self.audio.usable()
