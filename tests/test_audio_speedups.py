"""pipelines/audio.py against the previous implementation (tests/reference_audio.py, verbatim):
the decoded waveform is the same, bit for bit, and the log-mel within a stated tolerance.

The tolerance, in log10 units (the log-mel's own unit), on speech-like signals made here:
  - bins the model sees (at or above the clip's peak - 8, where Whisper's scaling floors it):
    |new - previous| <= MODEL_RANGE_TOL = 5e-4, about float16's step at |x| in 0.5..1 (2**-11)
    and under it above (2**-10 .. 2**-7 for |x| in 1..16): the stored float16 moves by at most
    one step, and rarely;
  - every bin: |new - previous| <= ALL_BINS_TOL = 0.01: bins 80+ dB below the frame's loudest
    carry the float32 FFT's rounding (the previous one ran in float64);
  - frames whose window sees only the zero padding: exactly the -10 floor, as before.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import soxr
from scipy.signal import lfilter

from pipelines import audio
from pipelines.config import AudioConfig
from tests import reference_audio as previous

MODEL_RANGE_TOL = 5e-4
ALL_BINS_TOL = 0.01
CFG = AudioConfig()


def speech_like(rate: int, seconds: float, seed: int, level: float = 0.3) -> np.ndarray:
    """Voiced syllables (a glottal pulse train, pitch gliding between 90 and 240 Hz, through
    three formant resonators) with noisy consonants between them and a pause of digital
    silence: the spectral shape and dynamics of speech, made without a synthesizer."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    f0 = 90 + 150 * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.3, 0.8) * t + rng.uniform(0, 6)))
    pulses = np.diff(np.floor(np.cumsum(f0) / rate), prepend=0.0)  # one impulse per period
    voiced = np.zeros(n)
    for formant, bandwidth in zip(rng.uniform([300, 900, 2200], [900, 2200, 3400]), (80, 120, 200)):
        r, theta = np.exp(-np.pi * bandwidth / rate), 2 * np.pi * formant / rate
        voiced += lfilter([1.0], [1.0, -2 * r * np.cos(theta), r * r], pulses)
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t), 0, None) ** 2
    consonants = rng.standard_normal(n) * np.clip(-np.sin(2 * np.pi * 4 * t + 1.0), 0, None) ** 4 * 0.2
    x = voiced / np.abs(voiced).max() * syllables + consonants
    x[int(0.4 * n):int(0.45 * n)] = 0.0
    return (level * x / np.abs(x).max()).astype(np.float32)


def encoded(wave: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,subtype,ext", [("WAV", "PCM_16", "wav"), ("FLAC", "PCM_16", "flac"),
                                             ("WAV", "FLOAT", "wav"), ("OGG", "VORBIS", "ogg"),
                                             ("FLAC", "PCM_24", "flac")])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_decoded_waveform_is_the_same(fmt: str, subtype: str, ext: str, channels: int) -> None:
    mono = speech_like(22050, 1.5, seed=channels)
    wave = np.stack([mono * (1 - 0.2 * c) for c in range(channels)], axis=1) if channels > 1 else mono
    data = encoded(wave, 22050, fmt, subtype)
    got, got_s = audio.decode_audio(data, ext, CFG)
    want, want_s = previous.decode_audio(data, ext, CFG)
    assert got.dtype == np.float32 and got_s == want_s
    assert np.array_equal(got, want)


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_eight_channels_decode_the_same(subtype: str) -> None:
    rng = np.random.default_rng(8)
    wave = np.clip(rng.standard_normal((20_000, 8)) * 0.3, -1, 1).astype(np.float32)
    data = encoded(wave, 16000, "WAV", subtype)
    assert np.array_equal(audio.decode_audio(data, "wav", CFG)[0], previous.decode_audio(data, "wav", CFG)[0])


def test_mp3_decodes_the_same() -> None:
    data = encoded(np.stack([speech_like(16000, 1.0, 5)] * 2, axis=1), 16000, "MP3", "MPEG_LAYER_III")
    assert np.array_equal(audio.decode_audio(data, "mp3", CFG)[0], previous.decode_audio(data, "mp3", CFG)[0])


def _compare(wave: np.ndarray, cfg: AudioConfig = CFG) -> tuple[np.ndarray, np.ndarray, int]:
    fitted, valid = audio.fit_length(wave, cfg)
    return audio.log_mel(fitted, cfg), previous.log_mel(fitted, cfg), audio.mel_frames_for(valid, cfg)


@pytest.mark.parametrize("rate,seconds,level", [(16000, 3.0, 0.3), (8000, 6.0, 0.5), (44100, 10.5, 0.3),
                                                (48000, 1.2, 0.003), (22050, 4.0, 1.0)])
def test_log_mel_is_within_tolerance_on_speech(rate: int, seconds: float, level: float) -> None:
    wave = speech_like(rate, seconds, seed=rate, level=level)
    if rate != CFG.sample_rate:
        wave = soxr.resample(wave, rate, CFG.sample_rate, quality="HQ")
    new, old, real = _compare(wave)
    assert new.shape == old.shape and new.dtype == old.dtype == np.float32
    diff = np.abs(new.astype(np.float64) - old)[:, :real]
    seen = old[:, :real] >= old[:, :real].max() - 8.0
    assert diff[seen].max() <= MODEL_RANGE_TOL, diff[seen].max()
    assert diff.max() <= ALL_BINS_TOL, diff.max()
    # what is stored: float16, at most one step apart where the model looks
    steps = np.abs(new.astype(np.float16).view(np.int16).astype(int) - old.astype(np.float16).view(np.int16))
    assert steps[:, :real][seen].max() <= 1
    # past the audio and half a window, the frames see only padding: the floor, exactly
    spill = -(-CFG.win_length // 2 // CFG.hop_length)
    if real + spill < new.shape[1]:
        assert np.array_equal(new[:, real + spill:], old[:, real + spill:])
        assert (new[:, real + spill:] == np.float32(np.log10(np.float32(1e-10)))).all()


@pytest.mark.parametrize("wave", [np.zeros(0, np.float32), np.zeros(1, np.float32), np.ones(3, np.float32),
                                  np.zeros(CFG.num_samples, np.float32),
                                  np.r_[np.zeros(20000), np.ones(1), np.zeros(30000)].astype(np.float32)],
                         ids=["empty", "one-zero", "three-ones", "silence", "one-click"])
def test_log_mel_edge_cases_match(wave: np.ndarray) -> None:
    new, old = audio.log_mel(wave, CFG), previous.log_mel(wave, CFG)
    diff = np.abs(new.astype(np.float64) - old)
    assert new.shape == old.shape and diff.max() <= ALL_BINS_TOL
    assert diff[old >= old.max() - 8.0].max() <= MODEL_RANGE_TOL


@pytest.mark.parametrize("cfg", [AudioConfig(n_fft=1024, win_ms=64.0), AudioConfig(win_ms=0.0),
                                 AudioConfig(sample_rate=8000, n_mels=40), AudioConfig(n_fft=64, win_ms=2.0)],
                         ids=["n_fft-1024", "no-window", "8k-40-mels", "bands-without-bins"])
def test_log_mel_other_settings_match(cfg: AudioConfig) -> None:
    wave = soxr.resample(speech_like(16000, 2.0, seed=9), 16000, cfg.sample_rate) if cfg.sample_rate != 16000 \
        else speech_like(16000, 2.0, seed=9)
    new, old, real = _compare(wave, cfg)
    seen = old[:, :real] >= old[:, :real].max() - 8.0
    assert new.shape == old.shape
    assert np.abs(new.astype(np.float64) - old)[:, :real][seen].max() <= MODEL_RANGE_TOL
