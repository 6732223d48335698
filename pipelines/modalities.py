"""Raw member bytes -> model-ready numpy arrays, one modality at a time.

Pure functions (numpy in, numpy out; no torch, no Ray) shared by the raw-shard
training path and the offline preprocessor, so both apply identical transforms.
Broken input raises `SampleError`, a configured rule raises `SampleFiltered`;
nothing here ever fails the job.
"""
from __future__ import annotations

import functools
import io
import json
import math
import re
import unicodedata
import warnings

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageFile
# The plugins of the formats we accept, registered up front: `Image.open(formats=...)` calls
# `Image.init()`, which imports every one of Pillow's ~45 plugins, as soon as a requested
# format is not registered yet, and WEBP is not among the few `Image.preinit()` loads: every
# fresh Ray worker would import plugins `decode_image` never uses.
from PIL import JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401  (registration)

from pipelines.config import AudioConfig, ImageConfig, TextConfig
from pipelines.reasons import (
    AUDIO_DECODE_ERROR, AUDIO_EMPTY, AUDIO_TOO_LONG, AUDIO_UNSUPPORTED, CAPTION_TOO_LONG, CAPTION_TOO_SHORT,
    IMAGE_DECODE_ERROR, IMAGE_TOO_LARGE, IMAGE_TOO_SMALL, TEXT_BAD_JSON, TEXT_NOT_UTF8, SampleError,
    SampleFiltered,
)

# CLIP's normalization constants (RGB, for [0, 1] inputs), applied later on the model side.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# ---------------------------------------------------------------- images

# Pillow's default, but it is a process-wide switch that any library may flip; a
# half-decoded JPEG silently padded with grey must be an error, not a training sample.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Content decides the format, never the extension; anything else (GIF, TIFF, ...) is refused
# rather than handed to a less-exercised plugin.
_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# BICUBIC is what CLIP's torchvision transform uses; Pillow's resize is antialiased (its kernel
# widens with the scale), and reducing_gap=3 lets it box-reduce first at no visible cost.
_RESAMPLE = Image.Resampling.BICUBIC
_REDUCING_GAP = 3.0
# EXIF orientation -> the transpose that displays the image upright.
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _open_image(data: bytes) -> Image.Image:
    """Parse the header only (Pillow decodes pixels lazily on load())."""
    try:
        # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; a bomb is a bomb.
        # (catch_warnings is process-global; fine for Ray's one-task-per-worker-process model.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        # Pillow's process-wide cap (Image.MAX_IMAGE_PIXELS) is a second pixel limit beside ours
        raise SampleError(IMAGE_TOO_LARGE, f"decompression bomb: {e}") from None
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, struct.error ...
        raise SampleError(IMAGE_DECODE_ERROR, f"{type(e).__name__}: {e}") from None


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is no reason to lose the pixels
        return 1


def decode_image(data: bytes, ext: str, cfg: ImageConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode, resize the shorter side to cfg.size, center-crop: uint8 [size, size, 3] RGB.

    Also returns the original (width, height) as displayed, i.e. after EXIF orientation.
    `ext` is unused: the format is sniffed from the bytes. The pixel count is checked from the
    header, before any pixel is decoded.
    """
    img = _open_image(data)
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise SampleError(IMAGE_TOO_LARGE, f"{w}x{h} = {w * h} pixels > {cfg.max_pixels}")
    is_jpeg = img.format in ("JPEG", "MPO")  # MPO: multi-picture JPEG from phone cameras
    orientation = _exif_orientation(img) if is_jpeg else 1
    shown = (h, w) if orientation >= 5 else (w, h)  # 5..8 swap the axes
    if min(w, h) < cfg.min_size:
        raise SampleFiltered(IMAGE_TOO_SMALL, f"{shown[0]}x{shown[1]} < {cfg.min_size}")
    size = cfg.size
    try:
        short = min(w, h)
        if is_jpeg:
            # libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain while decoding; Pillow picks the
            # strongest reduction that keeps both sides >= the request, hence shorter side >= size.
            img.draft("RGB", (max(size, round(w * size / short)), max(size, round(h * size / short))))
        img.load()
        img = _center_square(img, size)
        if img.mode == "RGBA":
            # Composite on white rather than dropping alpha: the RGB under transparent pixels is
            # arbitrary (often black), which would turn a dark logo on a transparent background
            # into a black square; white is how such images are shown on the web. Resizing RGBA
            # in Pillow premultiplies alpha, so compositing after the (cheaper) resize is exact.
            bg = Image.new("RGB", img.size, (255, 255, 255))
            bg.paste(img, mask=img.getchannel("A"))
            img = bg
        # The crop is centered and square, so orienting it afterwards equals orienting first.
        if orientation in _ORIENT:
            img = img.transpose(_ORIENT[orientation])
        out = np.asarray(img, dtype=np.uint8)
    except MemoryError:
        raise  # under the pixel cap this is the machine's state, not the sample's: the job's catch-all
    except Exception as e:  # truncated data ("image file is truncated"), corrupt stream, ...
        raise SampleError(IMAGE_DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    if out.shape != (size, size, 3):
        raise SampleError(IMAGE_DECODE_ERROR, f"unexpected decoded shape {out.shape}")
    return out, shown


# Pixels converted per step while a decoded image is brought down to the working size: a few MB
# of temporaries, however large the image.
_STRIP_PIXELS = 1 << 18


def _center_square(img: Image.Image, size: int) -> Image.Image:
    """The centered square of a loaded image resized to size x size: RGB, or RGBA with alpha.

    What `_to_rgb_or_rgba(img).resize((size, size), box=square, reducing_gap=3)` computes (up to
    rounding: Pillow orders its two passes by the image's shape), without the full-size copy that
    converting the whole image first makes. Only the region the filter reads (Pillow's "safe box")
    is converted and box-reduced, strip by strip, whole multiples of the factor high, so the one
    full-size buffer is the decoded image and every reduced pixel averages the same source pixels.
    """
    dw, dh = img.size
    side = min(dw, dh)
    left, top = (dw - side) / 2, (dh - side) / 2
    box = (left, top, left + side, top + side)
    factor = int(side / size / _REDUCING_GAP) or 1  # as Image.resize(reducing_gap=...) picks it
    if factor == 1 and dw * dh <= 16 * _STRIP_PIXELS:
        # a small image: its full-size conversion is a few MB, not worth a crop and a paste
        return _to_rgb_or_rgba(img).resize((size, size), _RESAMPLE, box=box)
    support = (_BICUBIC_SUPPORT - 0.5) * side / size  # Image._get_safe_box
    safe = (max(0, int(box[0] - support)), max(0, int(box[1] - support)),
            min(dw, math.ceil(box[2] + support)), min(dh, math.ceil(box[3] + support)))
    small = _reduce_in_strips(img, factor, safe)
    box = tuple((b - o) / factor for b, o in zip(box, safe[:2] * 2))
    out = small.resize((size, size), _RESAMPLE, box=box)
    return out.convert("RGBA") if out.mode == "RGBa" else out


_BICUBIC_SUPPORT = 2.0  # the kernel's half-width in source pixels at scale 1 (Pillow's _filters_support)


def _reduce_in_strips(img: Image.Image, factor: int, box: tuple[int, int, int, int]) -> Image.Image:
    """`box` of img as RGB or premultiplied RGBa, box-reduced by `factor` (1: just converted)."""
    left, top, right, bottom = box
    rows = max(1, _STRIP_PIXELS // max(1, right - left) // factor) * factor
    out = None
    for y in range(top, bottom, rows):
        strip = _to_rgb_or_rgba(img.crop((left, y, right, min(bottom, y + rows))))
        if strip.mode == "RGBA":
            strip = strip.convert("RGBa")  # what resize and reduce do to RGBA first
        if factor > 1:
            strip = strip.reduce(factor)
        if out is None:
            out = Image.new(strip.mode, (-(-(right - left) // factor), -(-(bottom - top) // factor)))
        out.paste(strip, (0, (y - top) // factor))
    return out


def _to_rgb_or_rgba(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("RGB", "RGBA"):
        return img
    if mode.startswith("I"):
        # 16-bit grey (PNG: I;16, big- or little-endian variants; I from older Pillows):
        # convert("RGB") would clip at 255 and turn it white; keep the top byte. Called on
        # strips, so the integer temporaries stay small.
        arr = np.asarray(img)
        return Image.fromarray(np.clip(arr >> 8, 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in img.info):
        return img.convert("RGBA")
    return img.convert("RGB")  # L, P, 1, CMYK (Pillow inverts Adobe CMYK), YCbCr, ...


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """uint8 HxWx3 RGB -> JPEG bytes for preprocessed shards.

    4:4:4 (no chroma subsampling): at 224 px, 4:2:0 visibly smears colour edges, and the
    point of a high quality setting is that the stored crop is close to what was computed.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "JPEG", quality=int(quality), subsampling=0)
    return buf.getvalue()


def decode_jpeg_rgb(data: bytes) -> np.ndarray:
    """Decode a JPEG written by `encode_jpeg` (already cropped): HxWx3 uint8 RGB."""
    try:
        img = Image.open(io.BytesIO(data), formats=("JPEG",))
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)
    except Exception as e:
        raise SampleError(IMAGE_DECODE_ERROR, f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------- text

_WS = re.compile(r"\s+")  # str patterns are Unicode-aware: NBSP, U+3000 ideographic space, ...
_BOM = b"\xef\xbb\xbf"


# NFC maps at most this many code points to one (U+1F82 is the longest canonical composition;
# Hangul LVT syllables take 3), so a text longer than this many times max_chars before NFC is
# still too long after it.
_NFC_MAX_SHRINK = 4


def decode_text(data: bytes, ext: str, cfg: TextConfig) -> str:
    """UTF-8 .txt or .json ({"caption": ...} preferred, else {"text": ...}) -> normalized caption.

    Length limits count code points after NFC + whitespace collapsing. The member's size is
    checked first (cfg.max_bytes), and the code points before NFC: CPython's NFC puts a run of
    combining marks in canonical order by insertion, quadratic in the run's length, so only a
    text that can pass goes through it.
    """
    if len(data) > cfg.max_bytes:
        raise SampleFiltered(CAPTION_TOO_LONG, f"{len(data)} bytes > {cfg.max_bytes}")
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        text = data.decode("utf-8")  # strict: mojibake never reaches the tokenizer
    except UnicodeDecodeError as e:
        raise SampleError(TEXT_NOT_UTF8, f"byte {e.start}: {e.reason}") from None
    if ext == "json":
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise SampleError(TEXT_BAD_JSON, f"not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise SampleError(TEXT_BAD_JSON, f"JSON {type(obj).__name__}, not an object")
        text = next((obj[k] for k in ("caption", "text") if isinstance(obj.get(k), str)), None)
        if text is None:
            raise SampleError(TEXT_BAD_JSON, 'no string "caption" or "text" field')
    # Collapsing whitespace before NFC gives the same text as after it (no whitespace character
    # composes with anything, and the two with canonical decompositions, U+2000 and U+2001,
    # map to whitespace), and the length check below then sees the shorter text.
    text = _WS.sub(" ", text).strip()
    if len(text) > _NFC_MAX_SHRINK * cfg.max_chars:
        raise SampleFiltered(CAPTION_TOO_LONG, f"{len(text)} > {cfg.max_chars} chars even after NFC")
    text = unicodedata.normalize("NFC", text)
    try:
        text.encode("utf-8")  # JSON "\ud800" escapes yield lone surrogates that no writer accepts
    except UnicodeEncodeError:
        raise SampleError(TEXT_BAD_JSON if ext == "json" else TEXT_NOT_UTF8, "lone surrogate") from None
    if len(text) < cfg.min_chars:
        raise SampleFiltered(CAPTION_TOO_SHORT, f"{len(text)} < {cfg.min_chars} chars")
    if len(text) > cfg.max_chars:
        raise SampleFiltered(CAPTION_TOO_LONG, f"{len(text)} > {cfg.max_chars} chars")
    return text


# ---------------------------------------------------------------- audio

# soxr "HQ": it costs little more than the lower qualities and a small fraction of the FLAC
# decode itself (benchmarks/README.md), so the better passband/stopband is nearly free.
_SOXR_QUALITY = "HQ"


# Frames read per step: memory while reading is this many frames x channels float32 (at most
# 2 MB at the default 8 channels) besides the mono result.
_AUDIO_BLOCK = 1 << 16
_UNKNOWN_FRAMES = 2**62  # libsndfile reports SF_COUNT_MAX when a stream doesn't say its length


def decode_audio(data: bytes, ext: str, cfg: AudioConfig) -> tuple[np.ndarray, float]:
    """wav/flac/mp3/ogg bytes -> (float32 mono waveform at cfg.sample_rate, source seconds).

    Channels, sample rate and frame count are checked from the header before any sample is
    decoded. The audio is then read in blocks and mixed down to mono block by block, so memory
    is about the mono waveform whatever the channel count, and the read stops at the frame
    limit whatever the header said.
    """
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
            if channels > cfg.max_channels:
                raise SampleError(AUDIO_UNSUPPORTED, f"{channels} channels > {cfg.max_channels}")
            if not 0 < sr <= cfg.max_source_rate:
                raise SampleError(AUDIO_UNSUPPORTED, f"sample rate {sr} Hz outside 1..{cfg.max_source_rate}")
            if frames >= _UNKNOWN_FRAMES:
                raise SampleError(AUDIO_UNSUPPORTED, "the stream does not say its length")
            limit = int(np.floor(cfg.max_source_seconds * sr))
            if frames > limit:
                raise SampleFiltered(AUDIO_TOO_LONG, f"{frames / sr:.1f} s > {cfg.max_source_seconds} s")
            mono, n = _read_mono(f, frames, limit)
    except SampleError:
        raise
    except MemoryError:
        raise  # not this sample's fault: left to the job's catch-all
    except Exception as e:  # LibsndfileError ("Format not recognised"), truncated streams, ...
        raise SampleError(AUDIO_DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    if n > limit:
        raise SampleFiltered(AUDIO_TOO_LONG, f"> {cfg.max_source_seconds} s (header said {frames / sr:.1f} s)")
    if n == 0:
        raise SampleError(AUDIO_EMPTY, "0 frames")
    if not np.isfinite(mono).all():
        raise SampleError(AUDIO_DECODE_ERROR, "NaN or inf samples")
    if sr != cfg.sample_rate:
        try:
            mono = soxr.resample(mono, sr, cfg.sample_rate, quality=_SOXR_QUALITY)
        except MemoryError:
            raise
        except Exception as e:
            raise SampleError(AUDIO_DECODE_ERROR, f"resampling {sr} Hz: {type(e).__name__}: {e}") from None
    return np.ascontiguousarray(mono, dtype=np.float32), n / sr


def _read_mono(f: sf.SoundFile, frames: int, limit: int) -> tuple[np.ndarray, int]:
    """Up to limit + 1 frames of f mixed down to mono (the mean of the channels), and how many.

    soundfile clamps a read to the frames the header announced, and we ask for at most one
    frame past the limit, so the loop ends either way.
    """
    mono = np.empty(min(frames, limit) + 1, dtype=np.float32)
    n = 0
    while n <= limit:
        block = f.read(min(_AUDIO_BLOCK, limit + 1 - n), dtype="float32", always_2d=True)
        got = block.shape[0]
        if got == 0:
            break
        if n + got > mono.size:  # a decoder that delivers more than its header said
            mono = np.concatenate([mono[:n], np.empty(min(limit + 1, 2 * (n + got)) - n, np.float32)])
        dest = mono[n:n + got]
        if block.shape[1] == 1:
            dest[:] = block[:, 0]
        else:
            np.mean(block, axis=1, dtype=np.float32, out=dest)
        n += got
    return mono[:n], n


def fit_length(wave: np.ndarray, cfg: AudioConfig) -> tuple[np.ndarray, int]:
    """Trim or zero-pad to cfg.num_samples; also return how many samples are real audio."""
    n = cfg.num_samples
    valid = min(len(wave), n)
    out = np.zeros(n, dtype=np.float32)
    out[:valid] = wave[:valid]
    return out, valid


@functools.lru_cache(maxsize=16)
def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney mel scale with Slaney area normalization over 0..sr/2: [n_mels, n_fft//2 + 1].

    Same as librosa.filters.mel's defaults (and therefore Whisper's filterbank).
    """
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, dtype=np.float64)
        lin = f / (200.0 / 3)
        return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27), lin)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        lin = m * (200.0 / 3)
        return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27) * (m - 15.0)), lin)

    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    weights = weights.astype(np.float32)
    weights.setflags(write=False)  # shared through the cache
    return weights


_FFT_BLOCK = 64


@functools.lru_cache(maxsize=16)
def _window(win_length: int, n_fft: int) -> np.ndarray:
    """Periodic Hann of win_length, zero-padded to n_fft and centered (as torch.stft does)."""
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)
    w = np.zeros(n_fft, dtype=np.float64)
    left = (n_fft - win_length) // 2
    w[left:left + win_length] = hann
    w.setflags(write=False)
    return w


def log_mel(wave: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """float32 [n_mels, 1 + len(wave) // hop] log10-mel power spectrogram.

    Centered frames with reflect padding (torch.stft / librosa / Whisper convention), power
    spectrum, Slaney mel filterbank, log10(max(x, 1e-10)). log10 rather than ln so that
    Whisper's normalization (clamp to max - 8, then (x + 4) / 4) applies as-is if wanted.
    """
    n_fft, hop = cfg.n_fft, cfg.hop_length
    if cfg.win_length > n_fft:
        raise ValueError(f"win_length {cfg.win_length} > n_fft {n_fft}")
    x = np.asarray(wave, dtype=np.float32).reshape(-1)
    pad = n_fft // 2
    # reflect needs at least 2 samples; a (degenerate) shorter clip is silence-padded.
    x = np.pad(x, pad, mode="reflect" if x.size > 1 else "constant")
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]  # a view, no copy
    window = _window(cfg.win_length, n_fft)
    power = np.empty((frames.shape[0], n_fft // 2 + 1), dtype=np.float32)
    # Blocks of frames keep the temporaries (~256 KB) in cache; all 1001 frames at once would
    # touch ~10 MB of fresh pages per call. The FFT runs in float64 because numpy's float32
    # rfft is slower than its float64 one (benchmarks/README.md).
    for i in range(0, len(frames), _FFT_BLOCK):
        spec = np.fft.rfft(frames[i:i + _FFT_BLOCK] * window, axis=-1)
        np.add(np.square(spec.real), np.square(spec.imag), out=power[i:i + _FFT_BLOCK], casting="same_kind")
    mel = _mel_filterbank(cfg.sample_rate, n_fft, cfg.n_mels) @ power.T
    return np.log10(np.maximum(mel, 1e-10))


def mel_frames_for(valid_samples: int, cfg: AudioConfig) -> int:
    """Frames of `log_mel(fit_length(...))` that carry real audio.

    Frame t is centered on sample t * hop; it counts when that center is within the real
    audio (t * hop <= valid), so a full clip gives exactly cfg.num_frames.
    """
    if valid_samples <= 0:
        return 0
    return min(cfg.num_frames, 1 + min(valid_samples, cfg.num_samples) // cfg.hop_length)
