"""Typed settings of the data plane.

One `DataConfig` describes how raw members become model-ready arrays and which
samples are rejected. It is embedded in the training run config (mmtrain/config.py)
and recorded in every preprocessed output, so that training on raw shards and
training on preprocessed shards apply the very same transforms.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .settings import Settings, setting

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
    size: int = setting(224, at_least=1, help="output is size x size RGB, shorter side resized then center-cropped")
    min_size: int = setting(32, at_least=0, help="filter: shorter side of the *original* image below this")
    jpeg_quality: int = setting(95, at_least=1, help="quality of the re-encoded JPEG in preprocessed shards")
    max_pixels: int = setting(50_000_000, at_least=1,
                              help="error image_too_large: width x height above this, refused from the header")

    def checks(self):
        return [(self.jpeg_quality <= 100, f"jpeg_quality must be at most 100, got {self.jpeg_quality}")]


@dataclass(frozen=True)
class TextConfig(Settings):
    min_chars: int = setting(3, at_least=0, help="filter: caption shorter than this (after normalization)")
    max_chars: int = setting(1000, at_least=1, help="filter: caption longer than this (after normalization)")
    max_bytes: int = setting(64 * 1024, at_least=1,
                             help="filter caption_too_long: member bytes above this, before any decoding")


@dataclass(frozen=True)
class AudioConfig(Settings):
    # Only bounds here: whether the window fits the FFT is the transform's to check when it
    # runs (a worker's error, as tests/test_hostile_decode.py exercises with n_fft=256).
    sample_rate: int = setting(16_000, at_least=1, help="the rate every clip is resampled to")
    seconds: float = setting(10.0, at_least=0, help="clip length after trim/pad")
    max_source_seconds: float = setting(60.0, at_least=0, help="filter: original audio longer than this")
    max_channels: int = setting(8, at_least=1, help="error audio_unsupported: more channels than this (from the header)")
    max_source_rate: int = setting(192_000, at_least=1,
                                   help="error audio_unsupported: sample rate above this (from the header)")
    n_mels: int = setting(80, at_least=1, help="mel bands of the log-mel spectrogram")
    win_ms: float = setting(25.0, at_least=0, help="analysis window length")
    hop_ms: float = setting(10.0, at_least=0, help="hop between windows")
    n_fft: int = setting(512, at_least=1, help=">= window; 512 keeps the FFT a power of two")

    def checks(self):
        return [(self.hop_length >= 1, f"hop_ms {self.hop_ms} is under one sample at {self.sample_rate} Hz")]

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
    max_member_bytes: int = setting(64 * 1024 * 1024, at_least=1,
                                    help="a member above this (stored, or inflated from .gz) is refused")
    max_sample_bytes: int = setting(128 * 1024 * 1024, at_least=1, help="all members of one sample together")
    max_sample_members: int = setting(64, at_least=1, help="members of one sample")
    max_name_bytes: int = setting(1024, at_least=1, help="a member name, in UTF-8 bytes")
    max_header_bytes: int = setting(64 * 1024, at_least=1, help="one GNU long name/link or pax extended header")
    max_header_chain: int = setting(8, at_least=0, help="extended headers in a row before one member")
    dedup: bool = setting(True, help="drop samples whose raw content was already kept")
    extra_exts: tuple[str, ...] = setting(EXTRA_EXTS, help="other members copied to the output (an allow-list)")
