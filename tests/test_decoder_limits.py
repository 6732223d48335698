"""Decoders check before they allocate: pixel, channel, sample-rate, frame and caption-byte
limits decided from headers and sizes, and decoding paths whose memory stays near the output
(16-bit images without wide temporaries, large images reduced in strips, audio mixed down to
mono block by block). Data made in code; fast."""
from __future__ import annotations

import io
import re
import tracemalloc
import types
import unicodedata

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipelines import audio as A
from pipelines import captions
from pipelines import reasons as R
from pipelines.audio import decode_audio
from pipelines.captions import _NFC_MAX_SHRINK, decode_text
from pipelines.config import AudioConfig, ImageConfig, TextConfig
from pipelines.images import _REDUCING_GAP, _center_square, _to_rgb_or_rgba, decode_image
from mediautil import png_by_hand, wav_edited
from test_modalities import ACFG, ICFG, TCFG, _audio_bytes, _img_bytes, _reason, _tone


def test_pixel_cap_is_checked_from_the_header() -> None:
    # 8000 x 8000 announced, no pixel data: decoding would fail, so the header alone decided
    with pytest.raises(R.SampleError) as e:
        decode_image(png_by_hand(8000, 8000, 2, 8), "png", ICFG)
    assert _reason(e) == R.IMAGE_TOO_LARGE and e.value.kind == R.ERROR and "64000000" in e.value.detail
    small = _img_bytes(Image.new("RGB", (640, 480)), "PNG")
    with pytest.raises(R.SampleError) as e:
        decode_image(small, "png", ImageConfig(max_pixels=640 * 480 - 1))
    assert _reason(e) == R.IMAGE_TOO_LARGE
    assert decode_image(small, "png", ImageConfig(max_pixels=640 * 480))[0].shape == (224, 224, 3)


@pytest.mark.parametrize("color_type,channels", [(0, 1), (2, 3), (4, 2), (6, 4)])  # grey, RGB, grey+alpha, RGBA
def test_16bit_png_decodes_like_its_8bit_version(color_type: int, channels: int) -> None:
    h, w = 500, 800
    ramp = np.add.outer(np.arange(h) * 200 // h, np.arange(w) * 55 // w).astype(np.uint8)
    eight = np.stack([ramp, 255 - ramp, ramp // 2, 128 + ramp // 2][:channels], axis=-1)
    low = np.random.default_rng(5).integers(0, 256, eight.shape, dtype=np.uint16)  # the low byte is noise
    sixteen = ((eight.astype(np.uint16) << 8) | low).astype(">u2")
    out16, size = decode_image(png_by_hand(w, h, color_type, 16, sixteen), "png", ICFG)
    out8, _ = decode_image(png_by_hand(w, h, color_type, 8, eight), "png", ICFG)
    assert size == (w, h) and np.abs(out16.astype(int) - out8).max() <= 1


def test_large_16bit_png_makes_no_wide_temporaries() -> None:
    h, w = 3000, 4000
    grey = np.broadcast_to((np.arange(w) * 65535 // w).astype(np.uint16), (h, w))
    data = _img_bytes(Image.fromarray(np.ascontiguousarray(grey)), "PNG", compress_level=1)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    # tracemalloc sees numpy's and Python's allocations, not Pillow's own image buffer (2 bytes a
    # pixel here): what it bounds is the temporaries. The int64 path peaked at 17 bytes a pixel.
    tracemalloc.start()
    try:
        out, _ = decode_image(data, "png", ICFG)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < w * h // 4, peak
    assert abs(int(out[:, 112].mean()) - 128) <= 2 and out[:, 0].max() < 50 and out[:, -1].min() > 200


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
@pytest.mark.parametrize("size", [(300, 200), (3000, 2000)])  # converted whole / in strips
def test_16bit_grey_modes_keep_the_top_byte(mode: str, size: tuple[int, int]) -> None:
    img = Image.new(mode, size, 0x8000)
    out = _center_square(img, 224)
    assert out.mode == "RGB" and np.abs(np.asarray(out).astype(int) - 128).max() == 0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "CMYK", "1"])
@pytest.mark.parametrize("size", [(2000, 1400), (1400, 2000)])  # reduced by 2 before the resize
def test_reducing_in_strips_matches_pillows_one_step_resize(mode: str, size: tuple[int, int]) -> None:
    w, h = size
    rgba = np.random.default_rng(6).integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(rgba).convert(mode)
    if mode == "P":
        img.info["transparency"] = 3
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    want = _to_rgb_or_rgba(img).resize((224, 224), Image.Resampling.BICUBIC, box=box, reducing_gap=_REDUCING_GAP)
    got = _center_square(img, 224)
    assert got.mode == want.mode
    # Pillow orders its two resampling passes by the image's shape, so rounding may differ by a level
    assert np.abs(np.asarray(got).astype(int) - np.asarray(want)).max() <= 3


def test_caption_bytes_are_capped_before_decoding() -> None:
    cfg = TextConfig(max_bytes=100)
    with pytest.raises(R.SampleFiltered) as e:
        decode_text(b"\xff" * 101, "txt", cfg)  # not UTF-8 either, but the size decides first
    assert _reason(e) == R.CAPTION_TOO_LONG and e.value.kind == R.FILTER and "bytes" in e.value.detail
    assert decode_text(b"x" * 100, "txt", cfg) == "x" * 100
    with pytest.raises(R.SampleFiltered) as e:  # 2 MB of combining marks, default limits
        decode_text(("a" + "\u0301" * (1 << 20)).encode(), "txt", TCFG)
    assert _reason(e) == R.CAPTION_TOO_LONG


def test_only_text_that_can_pass_is_normalized(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TextConfig(max_chars=5)
    composed = "\u1f82" * 5  # its NFD is 4 code points each: the bound is tight
    decomposed = unicodedata.normalize("NFD", composed)
    assert len(decomposed) == 20 and decode_text(decomposed.encode(), "txt", cfg) == composed

    def no_nfc(*a):
        raise AssertionError("NFC ran on a text that cannot pass")

    monkeypatch.setattr(captions, "unicodedata", types.SimpleNamespace(normalize=no_nfc))
    # 64 KiB of marks in descending combining classes: NFC's insertion sort took 3.3 s on it
    marks = sorted((c for c in map(chr, range(0x300, 0x370)) if unicodedata.combining(c)),
                   key=unicodedata.combining, reverse=True)
    for text, limits in ((decomposed + "x", cfg), ("a" + "".join(m * 700 for m in marks)[:32000], TCFG)):
        assert len(text.encode()) <= limits.max_bytes
        with pytest.raises(R.SampleFiltered) as e:
            decode_text(text.encode(), "txt", limits)
        assert _reason(e) == R.CAPTION_TOO_LONG


def test_nfc_shrinks_at_most_four_code_points_to_one() -> None:
    canonical = [c for c in map(chr, range(0x110000))
                 if not 0xD800 <= ord(c) < 0xE000 and unicodedata.decomposition(c)[:1] not in ("", "<")]
    hangul = [chr(0xAC00 + 27), chr(0xD7A3)]  # LVT syllables: algorithmic, 3 code points
    worst = max(len(unicodedata.normalize("NFD", c)) for c in canonical + hangul
                if unicodedata.normalize("NFC", unicodedata.normalize("NFD", c)) == c)
    assert worst <= _NFC_MAX_SHRINK


def test_whitespace_collapsing_before_nfc_changes_nothing() -> None:
    alphabet = [" ", "\t", "\n", "\u00a0", "\u2000", "\u2001", "\u3000", "e", "A", "\u0301", "\u030a",
                "\u0345", "\u0323", "\u1100", "\u1161", "\u11a8", "\u1f00", "x"]
    rng = np.random.default_rng(7)
    cfg = TextConfig(min_chars=0, max_chars=10**6)
    for _ in range(500):
        s = "".join(rng.choice(alphabet, size=int(rng.integers(1, 12))))
        assert decode_text(s.encode(), "txt", cfg) == re.sub(r"\s+", " ", unicodedata.normalize("NFC", s)).strip()


def test_deeply_nested_json() -> None:
    with pytest.raises(R.SampleError) as e:  # within the byte cap: Python's recursion limit
        decode_text(b"[" * 30000 + b"]" * 30000, "json", TCFG)
    assert _reason(e) == R.TEXT_BAD_JSON
    with pytest.raises(R.SampleFiltered) as e:
        decode_text(b"[" * 100_000 + b"]" * 100_000, "json", TCFG)
    assert _reason(e) == R.CAPTION_TOO_LONG


def _no_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_read(*a, **k):
        raise AssertionError("samples decoded for a refused file")

    monkeypatch.setattr(sf.SoundFile, "read", no_read)


@pytest.mark.parametrize("channels,max_channels", [(255, 8), (9, 8), (3, 2)])
def test_too_many_channels_are_refused_from_the_header(monkeypatch, channels: int, max_channels: int) -> None:
    data = _audio_bytes(np.zeros((1600, channels), np.float32), 16000, "WAV")
    _no_read(monkeypatch)
    with pytest.raises(R.SampleError) as e:
        decode_audio(data, "wav", AudioConfig(max_channels=max_channels))
    assert _reason(e) == R.AUDIO_UNSUPPORTED and e.value.kind == R.ERROR and f"{channels} channels" in e.value.detail


@pytest.mark.parametrize("rate,edit", [(384_000, False), (2**31 - 1, True), (200_000, False)])
def test_sample_rate_above_the_limit_is_refused_from_the_header(monkeypatch, rate: int, edit: bool) -> None:
    data = _audio_bytes(np.zeros(1600, np.float32), 16000 if edit else rate, "WAV")
    data = wav_edited(data, rate=rate) if edit else data
    _no_read(monkeypatch)
    with pytest.raises(R.SampleError) as e:
        decode_audio(data, "wav", ACFG)
    assert _reason(e) == R.AUDIO_UNSUPPORTED and str(rate) in e.value.detail


def test_zero_sample_rate_and_unknown_length() -> None:
    with pytest.raises(R.SampleError) as e:  # libsndfile refuses it when opening
        decode_audio(wav_edited(_audio_bytes(np.zeros(1600, np.float32), 16000, "WAV"), rate=0), "wav", ACFG)
    assert _reason(e) == R.AUDIO_DECODE_ERROR
    flac = bytearray(_audio_bytes(np.zeros(16000, np.float32), 16000, "FLAC"))
    field = int.from_bytes(flac[18:26], "big") & ~((1 << 36) - 1)  # STREAMINFO total samples := 0, "unknown"
    flac[18:26] = field.to_bytes(8, "big")
    with pytest.raises(R.SampleError) as e:
        decode_audio(bytes(flac), "flac", ACFG)
    assert _reason(e) == R.AUDIO_UNSUPPORTED and "length" in e.value.detail


def test_the_header_bounds_the_read() -> None:
    tone = _tone(440.0, 16000, 2.0)
    wav = _audio_bytes(tone, 16000, "WAV", "FLOAT")
    wave, seconds = decode_audio(wav_edited(wav, data_size=1600 * 4), "wav", ACFG)  # under-reports: 0.1 s
    assert seconds == 0.1 and np.array_equal(wave, tone[:1600])
    with pytest.raises(R.SampleFiltered) as e:  # over-reports: libsndfile takes the file's length
        decode_audio(wav_edited(wav, data_size=0xFFFFFFFF), "wav", AudioConfig(max_source_seconds=1.0))
    assert _reason(e) == R.AUDIO_TOO_LONG


def test_channels_are_mixed_down_block_by_block() -> None:
    frames, channels = 1_000_000, 8  # 16 read blocks
    rng = np.random.default_rng(8)
    wave = (rng.standard_normal((frames, channels)) * 0.1).astype(np.float32)
    want = wave.mean(axis=1, dtype=np.float32)
    data = _audio_bytes(wave, 16000, "WAV", "FLOAT")
    del wave
    tracemalloc.start()
    try:
        got, _ = decode_audio(data, "wav", AudioConfig(max_source_seconds=100.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, want)
    # frames x channels float32 is 32 MB (what one read of the whole file held); the mono result
    # is 4 MB, a read block 2 MB
    assert peak < 3 * frames * 4, peak


def test_resampling_failures_are_sample_errors() -> None:
    data = _audio_bytes(_tone(440.0, 8000, 0.5), 8000, "WAV")
    with pytest.raises(R.SampleError) as e:
        decode_audio(data, "wav", AudioConfig(sample_rate=0))  # soxr: "Sample rate should be over 0"
    assert _reason(e) == R.AUDIO_DECODE_ERROR and "resampling" in e.value.detail
