"""Today's audio code, verbatim (pipelines/audio.py as of the issue-16 base commit): the
reference that tests/test_audio_speedups.py and benchmarks/audio_stages.py compare the current
implementation against. Do not change it; it is what "within tolerance of the previous
implementation" means.
"""
from __future__ import annotations

import functools
import io

import numpy as np
import soundfile as sf
import soxr

from pipelines.config import AudioConfig
from pipelines.reasons import AUDIO_DECODE_ERROR, AUDIO_EMPTY, AUDIO_TOO_LONG, AUDIO_UNSUPPORTED, SampleError, SampleFiltered
from pipelines.stage_clock import stage

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
            with stage("resample"):
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
