"""Audio member bytes (WAV/FLAC/MP3/OGG) -> a mono float32 waveform at the target rate, fitted
to length, and its log-mel spectrogram.

Pure functions (numpy in, numpy out; no torch, no Ray) shared by the raw-shard training path and
the offline preprocessor. Broken input raises `SampleError`, a configured rule raises
`SampleFiltered`; nothing here ever fails the job.
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
# 2 MB at the default 8 channels; 16-bit PCM half that) besides the mono result.
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
    if not (np.isfinite(mono.min()) and np.isfinite(mono.max())):  # NaN propagates; no mask
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

    libsndfile clamps a read to the frames the header announced, and we ask for at most one
    frame past the limit, so the loop ends either way. A mono float stream is read straight
    into the result (one call); otherwise blocks of _AUDIO_BLOCK frames go through a buffer.
    16-bit PCM is read as int16 and scaled here: libsndfile's int16 -> float conversion costs
    more than the WAV parsing around it (benchmarks/README.md), and the scaling by 2**-15 is
    exact, so the samples are the ones libsndfile's float read gives.
    """
    cap = limit + 1
    channels = f.channels
    as_int16 = f.subtype == "PCM_16"
    mono = np.empty(min(frames, limit) + 1, dtype=np.float32)
    direct = channels == 1 and not as_int16
    if not direct:
        block = np.empty((min(_AUDIO_BLOCK, cap), channels), np.int16 if as_int16 else np.float32)
    n = 0
    while n < cap:
        if n == mono.size:  # a decoder that delivers more than its header said
            mono = np.concatenate([mono, np.empty(min(cap, 2 * n) - n, np.float32)])
        if direct:
            got = len(f.read(mono.size - n, out=mono[n:]))
        else:
            want = min(mono.size - n, len(block))
            got = len(f.read(want, out=block[:want]))
            _mix_down(block[:got], mono[n:n + got])
        if got == 0:
            break
        n += got
    return mono[:n], n


_INT16_SCALE = np.float32(2.0**-15)  # libsndfile's float scale for 16-bit PCM


def _mix_down(block: np.ndarray, dest: np.ndarray) -> None:
    """dest := the mean of block's channels (columns), the bits np.mean gives on float32 samples.

    np.mean over a short row is one reduction call per frame; adding column by column is one
    vectorized pass per channel. Float samples: below 8 channels np.mean adds in channel order,
    as this does; from 8 on it sums pairwise, so it mixes those itself. 16-bit samples: their
    sums are exact in int32 and, under 2**24, in float32 whatever the order, so summing the
    integers and scaling once gives the same bits.
    """
    channels = block.shape[1]
    if block.dtype == np.int16:
        if channels == 1:
            np.multiply(block[:, 0], _INT16_SCALE, out=dest)
            return
        total = block[:, 0].astype(np.int32)
        for c in range(1, channels):
            total += block[:, c]
        np.copyto(dest, total, casting="same_kind")
        dest *= _INT16_SCALE
    elif channels >= 8:
        np.mean(block, axis=1, dtype=np.float32, out=dest)
        return
    else:
        np.copyto(dest, block[:, 0])
        for c in range(1, channels):
            dest += block[:, c]
    if channels > 1:
        dest /= np.float32(channels)


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


_BANDS_PER_MATMUL = 20


@functools.lru_cache(maxsize=16)
def _mel_bands(sample_rate: int, n_fft: int, n_mels: int) -> tuple[tuple[slice, int, int, np.ndarray], ...]:
    """The filterbank cut into groups of adjacent bands, each with the FFT bins its bands
    cover: (rows, lo, hi, weights[rows, lo:hi]). Each triangle spans a few bins, so the groups'
    matmuls skip most of the zeros a dense one multiplies (our own few lines: a sparse matrix
    type would cost an import for a banded matrix this small)."""
    weights = _mel_filterbank(sample_rate, n_fft, n_mels)
    groups = []
    for start in range(0, n_mels, _BANDS_PER_MATMUL):
        rows = slice(start, min(n_mels, start + _BANDS_PER_MATMUL))
        bins = np.flatnonzero(weights[rows].any(axis=0))
        if bins.size:  # a group without weights (too few bins for its bands) stays at the floor
            lo, hi = int(bins[0]), int(bins[-1]) + 1
            part = np.ascontiguousarray(weights[rows, lo:hi])
            part.setflags(write=False)
            groups.append((rows, lo, hi, part))
    return tuple(groups)


# Frames per FFT call: the block's buffers (~0.2 MB) stay in cache, where all 1001 frames at
# once would touch several MB of fresh pages per call (and scipy's rfft is slower on them).
_FFT_BLOCK = 64


@functools.lru_cache(maxsize=16)
def _hann(win_length: int) -> np.ndarray:
    """Periodic Hann of win_length as float32: the non-zero part of the window, which sits
    centered in the n_fft frame (as torch.stft does)."""
    hann = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)).astype(np.float32)
    hann.setflags(write=False)  # shared through the cache
    return hann


def log_mel(wave: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """float32 [n_mels, 1 + len(wave) // hop] log10-mel power spectrogram.

    Centered frames with reflect padding (torch.stft / librosa / Whisper convention), a
    periodic Hann of win_length zero-padded to n_fft, power spectrum, Slaney mel filterbank,
    log10(max(x, 1e-10)). log10 rather than ln so that Whisper's normalization (clamp to
    max - 8, then (x + 4) / 4) applies as-is if wanted.

    Frames whose window covers only zeros (the padding of `fit_length`, a silent tail) have a
    zero spectrum: they get the floor without an FFT, exactly what the FFT would give. The
    others go through a float32 FFT (`_power_spectrum`).
    """
    n_fft, hop, win = cfg.n_fft, cfg.hop_length, cfg.win_length
    if win > n_fft:
        raise ValueError(f"win_length {win} > n_fft {n_fft}")
    x = np.asarray(wave, dtype=np.float32).reshape(-1)
    pad = n_fft // 2
    # reflect needs at least 2 samples; a (degenerate) shorter clip is silence-padded.
    x = np.pad(x, pad, mode="reflect" if x.size > 1 else "constant")
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]  # a view, no copy
    left = (n_fft - win) // 2
    sounding = frames[:_frames_with_sound(x, left, win, hop, len(frames)), left:left + win]
    mel = np.empty((cfg.n_mels, len(frames)), dtype=np.float32)
    mel[:, len(sounding):] = _FLOOR
    computed = mel[:, :len(sounding)]
    computed[:] = 0.0  # bands no FFT bin reaches
    if len(sounding):
        power = _power_spectrum(sounding, n_fft)
        for rows, lo, hi, weights in _mel_bands(cfg.sample_rate, n_fft, cfg.n_mels):
            np.matmul(weights, power[:, lo:hi].T, out=computed[rows])
    np.maximum(computed, 1e-10, out=computed)
    np.log10(computed, out=computed)
    return mel


_FLOOR = np.log10(np.maximum(np.float32(0.0), np.float32(1e-10)))  # log10 of a silent bin


def _power_spectrum(frames: np.ndarray, n_fft: int) -> np.ndarray:
    """float32 [frames, n_fft // 2 + 1]: |rfft|^2 of each frame times the Hann window, the
    frame centered in n_fft zeros.

    scipy.fft rather than numpy.fft: scipy's pocketfft transforms float32 as float32 and
    vectorizes across rows, which beats numpy's float64 rfft (numpy's float32 one is slower
    still); the float32 rounding stays within the tolerance tests/test_audio_speedups.py
    states. Imported here, on the first audio sample: the import costs a worker CPU time and
    memory that only workers that see audio need to pay (benchmarks/README.md).
    """
    from scipy import fft

    n, win = frames.shape
    left = (n_fft - win) // 2
    hann = _hann(win)
    power = np.empty((n, n_fft // 2 + 1), dtype=np.float32)
    windowed = np.zeros((min(n, _FFT_BLOCK), n_fft), dtype=np.float32)  # outside the window: 0
    for i in range(0, n, _FFT_BLOCK):
        b = min(_FFT_BLOCK, n - i)
        np.multiply(frames[i:i + b], hann, out=windowed[:b, left:left + win])
        parts = fft.rfft(windowed[:b], axis=-1, workers=1).view(np.float32)  # re, im, re, im, ...
        np.square(parts, out=parts)
        np.add(parts[:, 0::2], parts[:, 1::2], out=power[i:i + b])
    return power


def _frames_with_sound(x: np.ndarray, left: int, win: int, hop: int, n_frames: int) -> int:
    """How many leading frames of the padded signal x reach a non-zero sample with their
    window (samples [t * hop + left, t * hop + left + win) of frame t); the frames after them
    see only zeros."""
    last = _last_nonzero(x)
    if last < left or win == 0:
        return 0
    return min(n_frames, (last - left) // hop + 1)


def _last_nonzero(x: np.ndarray, step: int = 1 << 14) -> int:
    """Index of the last non-zero element of x (-1 if none), scanning back in steps."""
    end = x.size
    while end > 0:
        start = max(0, end - step)
        if x[start:end].any():
            return start + int(np.flatnonzero(x[start:end])[-1])
        end = start
    return -1


def mel_frames_for(valid_samples: int, cfg: AudioConfig) -> int:
    """Frames of `log_mel(fit_length(...))` that carry real audio.

    Frame t is centered on sample t * hop; it counts when that center is within the real
    audio (t * hop <= valid), so a full clip gives exactly cfg.num_frames.
    """
    if valid_samples <= 0:
        return 0
    return min(cfg.num_frames, 1 + min(valid_samples, cfg.num_samples) // cfg.hop_length)
