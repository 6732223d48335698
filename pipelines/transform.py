"""One raw sample in, one model-ready sample out (or a SampleError saying why not).

Shared by the preprocess job (which stores the result as WebDataset members) and by the
training ingest on raw shards, so both apply exactly the same decode and transform.

Audio features: the log-mel spectrogram is computed HERE, once, and stored (float16) in
preprocessed shards, rather than at training ingest. Training nodes are GPU nodes whose
few CPUs are the usual bottleneck; a feature computed once at preprocessing costs
nothing per epoch, and float16 80x1001 (160 KB) is about the size of the 16 kHz int16
waveform it replaces. The features' parameters are recorded with the output (see
`dataset.py`), and training refuses shards made with other ones.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from . import audio, captions, images
from . import reasons
from .config import DataConfig
from .dataset import OUT_IMAGE, OUT_MEL, OUT_META, OUT_TEXT, OUTPUT_EXTS
from .reasons import SampleError
from .source import RAW_MODALITIES, RawSample, split_modalities
from .stage_clock import stage


@dataclass
class Processed:
    """Decoded arrays plus what the manifest says about the sample."""

    key: str
    source: str
    position: int
    image: np.ndarray | None = None        # uint8 [S, S, 3]
    text: str | None = None
    mel: np.ndarray | None = None          # float32 [n_mels, T]
    mel_frames: int = 0                    # frames that carry real audio
    image_size: tuple[int, int] | None = None  # original (width, height)
    audio_seconds: float | None = None     # original duration
    content_hash: str = ""
    extras: list[tuple[str, bytes]] = field(default_factory=list)  # other members, in data.extra_exts
    dropped: list[str] = field(default_factory=list)  # extensions of the other members left out

    @property
    def modalities(self) -> list[str]:
        return [m for m, v in (("image", self.image), ("text", self.text), ("audio", self.mel)) if v is not None]


def content_hash(chosen: dict[str, tuple[str, bytes]]) -> str:
    """Hash of the raw bytes of the modality members: equal iff exact duplicate content."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(chosen):
        _, data = chosen[name]
        h.update(name.encode())
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def transform_sample(raw: RawSample, cfg: DataConfig) -> Processed:
    """Decode and transform every modality present; raise SampleError on the first problem.

    Any present modality that fails disqualifies the sample (DESIGN: an unreadable member is
    an error for that sample); a missing modality is fine; no usable modality is an error.
    """
    if raw.error is not None:
        raise raw.error
    chosen, extras = split_modalities(raw.members, RAW_MODALITIES)
    # Clean output carries only plain-data extras: .pyd/.pickle/.pth and friends are unpickled
    # by webdataset's default `.decode()`, so a member outside the allow-list would be code run
    # by whoever reads our output. It is left out and counted; the sample itself is kept.
    allowed = set(cfg.extra_exts)
    out = Processed(raw.key, raw.source, raw.position, extras=[(e, d) for e, d in extras if e in allowed],
                    dropped=[e for e, _ in extras if e not in allowed])
    if not chosen:
        have = ", ".join(sorted(raw.members)) or "nothing"
        raise SampleError(reasons.NO_USABLE_MODALITY, f"no image, text or audio member (found: {have})")
    transform_modalities(out, chosen, cfg)
    out.content_hash = content_hash(chosen)
    return out


def transform_modalities(out: Processed, chosen: dict[str, tuple[str, bytes]], cfg: DataConfig) -> Processed:
    """Decode and transform each chosen modality member, (extension, bytes), into `out`: the
    image cropped to size, the caption normalized, the audio fitted to length and turned into
    its log-mel. The first problem raises SampleError. Preprocessing and the training ingest
    both call this, so training on raw shards sees the arrays preprocessing would store."""
    if "image" in chosen:
        ext, data = chosen["image"]
        with stage("image_decode"):  # images.py charges its resize to "resize"
            out.image, out.image_size = images.decode_image(data, ext, cfg.image)
    if "text" in chosen:
        ext, data = chosen["text"]
        with stage("text"):
            out.text = captions.decode_text(data, ext, cfg.text)
    if "audio" in chosen:
        ext, data = chosen["audio"]
        with stage("audio_decode"):  # audio.py charges its resampling to "resample"
            wave, out.audio_seconds = audio.decode_audio(data, ext, cfg.audio)
        with stage("log_mel"):  # fitting the clip to length included
            wave, valid = audio.fit_length(wave, cfg.audio)
            out.mel = audio.log_mel(wave, cfg.audio)
        out.mel_frames = audio.mel_frames_for(valid, cfg.audio)
    return out


DROPPED = "dropped_member:"  # stats counts key prefix: extras left out of the output, by extension
_DROPPED_KINDS = 32           # distinct extensions counted per shard; the rest count as "(other)"


def count_dropped_members(counts: Counter, exts: list[str]) -> None:
    """Count the extras left out of a written sample, by extension: a shard cannot grow the
    stats without bound by naming its members in ever new ways."""
    for ext in exts:
        key = DROPPED + ext
        if key not in counts and sum(k.startswith(DROPPED) for k in counts) >= _DROPPED_KINDS:
            key = DROPPED + "(other)"
        counts[key] += 1


def manifest_fields(p: Processed) -> dict:
    return {
        "key": p.key,
        "source": p.source,
        "position": p.position,
        "modalities": ",".join(p.modalities),
        "image_width": p.image_size[0] if p.image_size else None,
        "image_height": p.image_size[1] if p.image_size else None,
        "audio_seconds": p.audio_seconds,
        "text_chars": len(p.text) if p.text is not None else None,
        "content_hash": p.content_hash,
    }


def encode_members(p: Processed, cfg: DataConfig) -> dict[str, bytes]:
    """The WebDataset members of a preprocessed sample (extension -> bytes)."""
    members: dict[str, bytes] = {}
    if p.image is not None:
        with stage("encode"):
            members[OUT_IMAGE] = images.encode_jpeg(p.image, cfg.image.jpeg_quality)
    if p.text is not None:
        members[OUT_TEXT] = p.text.encode("utf-8")
    if p.mel is not None:
        with stage("encode"):  # the stored features: the JPEG above and the float16 log-mel
            buf = io.BytesIO()
            np.save(buf, p.mel.astype(np.float16), allow_pickle=False)
            members[OUT_MEL] = buf.getvalue()
    meta = {k: v for k, v in manifest_fields(p).items() if v is not None}
    meta["mel_frames"] = p.mel_frames
    members[OUT_META] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    for ext, data in p.extras:
        # the user's other members (those in data.extra_exts) travel along; a name that
        # clashes with ours is kept under an `orig.` prefix rather than overwritten
        members[f"orig.{ext}" if ext in members or ext in OUTPUT_EXTS else ext] = data
    return members
