"""Decoders and transforms of pipelines.images, captions and audio, on data made in code."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipelines import reasons as R
from pipelines.config import AudioConfig, ImageConfig, TextConfig
from pipelines.audio import decode_audio, fit_length, log_mel, mel_frames_for
from pipelines.captions import decode_text
from pipelines.images import decode_image, decode_jpeg_rgb, encode_jpeg

ICFG = ImageConfig()
TCFG = TextConfig()
ACFG = AudioConfig()


def _img_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _bands(w: int, h: int, colors: list[tuple[int, int, int]], horizontal: bool = True) -> Image.Image:
    """Equal-width vertical bands (or horizontal ones) of the given colours."""
    arr = np.zeros((h, w, 3), np.uint8)
    n = len(colors)
    for i, c in enumerate(colors):
        if horizontal:
            arr[:, i * w // n:(i + 1) * w // n] = c
        else:
            arr[i * h // n:(i + 1) * h // n, :] = c
    return Image.fromarray(arr)


def _reason(exc_info) -> str:
    return exc_info.value.reason


# ---------------------------------------------------------------- images

def _mode_image(mode: str, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int]]:
    """An image of `mode` and the RGB colour decode_image must produce for it."""
    w, h = size
    if mode == "RGB":
        return Image.new("RGB", size, (200, 100, 50)), (200, 100, 50)
    if mode == "L":
        return Image.new("L", size, 90), (90, 90, 90)
    if mode == "P":
        return Image.new("RGB", size, (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), (10, 200, 30)
    if mode == "RGBA":  # fully transparent black -> composited on white
        return Image.new("RGBA", size, (0, 0, 0, 0)), (255, 255, 255)
    if mode == "LA":  # half-transparent black on white -> mid grey
        return Image.new("LA", size, (0, 128)), (127, 127, 127)
    if mode == "CMYK":
        return Image.new("CMYK", size, (0, 255, 255, 0)), (255, 0, 0)
    if mode == "I;16":  # 16-bit grey 0x8000 is mid grey, not clipped white
        return Image.fromarray(np.full((h, w), 0x8000, np.uint16)), (128, 128, 128)
    raise AssertionError(mode)


@pytest.mark.parametrize("fmt,mode", [
    ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"),
    ("PNG", "RGB"), ("PNG", "L"), ("PNG", "P"), ("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "I;16"),
    ("WEBP", "RGB"), ("WEBP", "RGBA"),
])
@pytest.mark.parametrize("size", [(640, 480), (100, 60), (1500, 2000)])
def test_image_modes_and_formats(fmt: str, mode: str, size: tuple[int, int]) -> None:
    img, want = _mode_image(mode, size)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out, orig = decode_image(_img_bytes(img, fmt, **kw), fmt.lower(), ICFG)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert orig == size
    tol = 6 if fmt == "JPEG" else 2
    assert np.abs(out.reshape(-1, 3).astype(int) - want).max() <= tol, out.reshape(-1, 3).mean(0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("scale", [1, 3])  # 3: JPEG takes the DCT draft path
def test_landscape_and_portrait_keep_the_center(fmt: str, scale: int) -> None:
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    # 640x320: the centered 320x320 square is exactly the green half; red/blue are the outer quarters.
    for horizontal in (True, False):
        w, h = (640 * scale, 320 * scale) if horizontal else (320 * scale, 640 * scale)
        img = _bands(w, h, [red, green, green, blue], horizontal)
        out, orig = decode_image(_img_bytes(img, fmt, quality=95), "png", ICFG)
        assert orig == (w, h)
        inner = out[3:-3, 3:-3].reshape(-1, 3).astype(int)  # the bicubic kernel may peek past the box
        assert np.abs(inner - green).max() <= 12, inner.mean(0)
        assert out[..., 0].mean() < 4 and out[..., 2].mean() < 4  # no squash, no off-center crop


def test_downscale_is_antialiased() -> None:
    # 1-px checkerboard: a point-sampled resize yields black/white noise, a filtered one grey.
    arr = ((np.indices((1000, 1600)).sum(0) % 2) * 255).astype(np.uint8)
    out, _ = decode_image(_img_bytes(Image.fromarray(arr), "PNG"), "png", ICFG)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 4


@pytest.mark.parametrize("fmt", ["JPEG", "MPO"])  # MPO: phone cameras' multi-picture JPEG
def test_exif_orientation_is_applied(fmt: str) -> None:
    # Stored 640x320, left half red / right half blue; orientation 6 = display rotated 90 deg
    # clockwise, so stored-left becomes displayed-top.
    img = _bands(640, 320, [(255, 0, 0), (0, 0, 255)])
    exif = Image.Exif()
    exif[0x0112] = 6
    kw = {"save_all": True, "append_images": [Image.new("RGB", (640, 320))]} if fmt == "MPO" else {}
    data = _img_bytes(img, fmt, quality=95, exif=exif, **kw)
    assert Image.open(io.BytesIO(data)).format == fmt
    out, orig = decode_image(data, "jpg", ICFG)
    assert orig == (320, 640)
    top, bottom = out[:100].reshape(-1, 3).mean(0), out[-100:].reshape(-1, 3).mean(0)
    assert top[0] > 240 and top[2] < 15 and bottom[2] > 240 and bottom[0] < 15


def test_png_named_jpg_decodes() -> None:
    out, orig = decode_image(_img_bytes(Image.new("RGB", (300, 300), (1, 2, 3)), "PNG"), "jpg", ICFG)
    assert orig == (300, 300) and tuple(out[100, 100]) == (1, 2, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_image_is_an_error(fmt: str) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8))
    data = _img_bytes(img, fmt)
    with pytest.raises(R.SampleError) as e:
        decode_image(data[: len(data) // 2], fmt.lower(), ICFG)
    assert _reason(e) == R.IMAGE_DECODE_ERROR and e.value.kind == R.ERROR


@pytest.mark.parametrize("data", [
    b"", b"\xff\xd8\xff", np.random.default_rng(1).bytes(5000),
    _img_bytes(Image.new("RGB", (64, 64)), "GIF"),  # a format outside jpeg/png/webp
])
def test_undecodable_image_bytes(data: bytes) -> None:
    with pytest.raises(R.SampleError) as e:
        decode_image(data, "jpg", ICFG)
    assert _reason(e) == R.IMAGE_DECODE_ERROR and not isinstance(e.value, R.SampleFiltered)


@pytest.mark.parametrize("max_pixels", [3000, 1000])  # warning range, error range
def test_pillows_decompression_bomb_check_stays(monkeypatch: pytest.MonkeyPatch, max_pixels: int) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", max_pixels)
    with pytest.raises(R.SampleError) as e:
        decode_image(_img_bytes(Image.new("RGB", (64, 64)), "PNG"), "png", ICFG)
    assert _reason(e) == R.IMAGE_TOO_LARGE and e.value.kind == R.ERROR and "bomb" in e.value.detail


def test_too_small_image_is_filtered() -> None:
    cfg = ImageConfig(size=64, min_size=32)
    with pytest.raises(R.SampleFiltered) as e:
        decode_image(_img_bytes(Image.new("RGB", (400, 31)), "PNG"), "png", cfg)
    assert _reason(e) == R.IMAGE_TOO_SMALL and e.value.kind == R.FILTER
    out, _ = decode_image(_img_bytes(Image.new("RGB", (32, 32)), "PNG"), "png", cfg)  # boundary passes
    assert out.shape == (64, 64, 3)


def test_jpeg_roundtrip() -> None:
    rng = np.random.default_rng(2)
    smooth = np.cumsum(rng.integers(-3, 4, (224, 224, 3)), axis=1) + 128
    img = np.clip(smooth, 0, 255).astype(np.uint8)
    back = decode_jpeg_rgb(encode_jpeg(img, 95))
    assert back.shape == img.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - img).mean() < 3
    with pytest.raises(R.SampleError):
        decode_jpeg_rgb(b"not a jpeg")
    with pytest.raises(ValueError):
        encode_jpeg(img.astype(np.float32), 95)


# ---------------------------------------------------------------- text

def test_txt_utf8_and_bom() -> None:
    assert decode_text("a caption".encode(), "txt", TCFG) == "a caption"
    assert decode_text(b"\xef\xbb\xbfwith bom", "txt", TCFG) == "with bom"
    for bad in ("café".encode("latin-1"), b"\xff\xfe\x00a\x00b\x00c"):
        with pytest.raises(R.SampleError) as e:
            decode_text(bad, "txt", TCFG)
        assert _reason(e) == R.TEXT_NOT_UTF8


@pytest.mark.parametrize("payload,want", [
    ({"caption": "the caption", "text": "the text"}, "the caption"),
    ({"text": "only text", "url": "x"}, "only text"),
    ({"caption": None, "text": "fallback text"}, "fallback text"),
])
def test_json_fields(payload: dict, want: str) -> None:
    assert decode_text(json.dumps(payload).encode(), "json", TCFG) == want


@pytest.mark.parametrize("data", [
    b"{not json", b'["caption"]', b'"a string"', b'{"caption": 5}', b'{"title": "no caption"}',
    b'{"caption": "lone \\ud800 surrogate"}',
])
def test_bad_json(data: bytes) -> None:
    with pytest.raises(R.SampleError) as e:
        decode_text(data, "json", TCFG)
    assert _reason(e) == R.TEXT_BAD_JSON


def test_json_not_utf8() -> None:
    with pytest.raises(R.SampleError) as e:
        decode_text('{"caption": "café"}'.encode("latin-1"), "json", TCFG)
    assert _reason(e) == R.TEXT_NOT_UTF8


def test_normalization() -> None:
    raw = "  a\t\tdog\n\r\non  the\u3000mat\u00a0 "
    assert decode_text(raw.encode(), "txt", TCFG) == "a dog on the mat"
    assert decode_text("cafe\u0301 au lait".encode(), "txt", TCFG) == "caf\u00e9 au lait"  # NFC


def test_chinese_preserved() -> None:
    zh = "一只橘猫躺在阳光下的窗台上，旁边有一杯咖啡。"
    assert decode_text(zh.encode(), "txt", TCFG) == zh
    for ensure_ascii in (True, False):
        data = json.dumps({"caption": zh}, ensure_ascii=ensure_ascii).encode()
        assert decode_text(data, "json", TCFG) == zh


def test_length_filters() -> None:
    cfg = TextConfig(min_chars=3, max_chars=5)
    assert decode_text(b"a    b", "txt", cfg) == "a b"  # measured after collapsing
    assert decode_text(b"abcde", "txt", cfg) == "abcde"
    with pytest.raises(R.SampleFiltered) as e:
        decode_text(b"  ab  ", "txt", cfg)
    assert _reason(e) == R.CAPTION_TOO_SHORT
    with pytest.raises(R.SampleFiltered) as e:
        decode_text(b"abcdef", "txt", cfg)
    assert _reason(e) == R.CAPTION_TOO_LONG


# ---------------------------------------------------------------- audio

_SUBTYPE = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}


def _audio_bytes(wave: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype or _SUBTYPE[fmt])
    return buf.getvalue()


def _tone(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def _peak_hz(wave: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave)), n=4 * sr))  # 0.25 Hz bins
    return float(np.argmax(spec)) * sr / (4 * sr)


@pytest.mark.parametrize("fmt,sr,channels", [
    ("WAV", 8000, 1), ("WAV", 16000, 2), ("FLAC", 22050, 2), ("FLAC", 48000, 1),
    ("OGG", 44100, 1), ("OGG", 8000, 2), ("MP3", 48000, 2), ("MP3", 22050, 1), ("MP3", 44100, 1),
])
def test_decode_resamples_and_keeps_pitch(fmt: str, sr: int, channels: int) -> None:
    tone = _tone(440.0, sr, 1.0)
    wave_in = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    wave, seconds = decode_audio(_audio_bytes(wave_in, sr, fmt), fmt.lower(), ACFG)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(seconds - 1.0) < 0.08  # MP3 may add encoder padding
    assert abs(len(wave) - seconds * ACFG.sample_rate) <= 2
    assert abs(_peak_hz(wave, ACFG.sample_rate) - 440.0) < 3.0
    assert 0.4 < np.abs(wave).max() < 0.6


def test_stereo_is_averaged_to_mono() -> None:
    left = _tone(440.0, 16000, 0.5, amp=0.6)
    data = _audio_bytes(np.stack([left, np.zeros_like(left)], axis=1), 16000, "WAV", "FLOAT")
    wave, _ = decode_audio(data, "wav", ACFG)
    np.testing.assert_allclose(wave, left / 2, atol=1e-6)


def test_empty_wav() -> None:
    with pytest.raises(R.SampleError) as e:
        decode_audio(_audio_bytes(np.zeros((0, 1), np.float32), 16000, "WAV"), "wav", ACFG)
    assert _reason(e) == R.AUDIO_EMPTY


@pytest.mark.parametrize("data", [b"", b"RIFF\x00\x00", np.random.default_rng(3).bytes(4000)])
def test_garbage_audio(data: bytes) -> None:
    with pytest.raises(R.SampleError) as e:
        decode_audio(data, "wav", ACFG)
    assert _reason(e) == R.AUDIO_DECODE_ERROR


def test_non_finite_audio() -> None:
    bad = _tone(440.0, 16000, 0.2)
    bad[100] = np.nan
    with pytest.raises(R.SampleError) as e:
        decode_audio(_audio_bytes(bad, 16000, "WAV", "FLOAT"), "wav", ACFG)
    assert _reason(e) == R.AUDIO_DECODE_ERROR


def test_too_long_is_filtered_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _audio_bytes(np.zeros(70 * 8000, np.float32), 8000, "WAV")

    def no_read(*a, **k):
        raise AssertionError("samples decoded for an over-long file")

    monkeypatch.setattr(sf.SoundFile, "read", no_read)
    with pytest.raises(R.SampleFiltered) as e:
        decode_audio(data, "wav", AudioConfig(max_source_seconds=60.0))
    assert _reason(e) == R.AUDIO_TOO_LONG and e.value.kind == R.FILTER


def test_fit_length() -> None:
    cfg = AudioConfig(seconds=1.0)
    short = np.arange(10_000, dtype=np.float32)
    out, valid = fit_length(short, cfg)
    assert out.shape == (16_000,) and out.dtype == np.float32 and valid == 10_000
    assert np.array_equal(out[:10_000], short) and not out[10_000:].any()
    out, valid = fit_length(np.arange(20_000, dtype=np.float32), cfg)
    assert valid == 16_000 and out[-1] == 15_999


def test_log_mel_shape_and_silence() -> None:
    mel = log_mel(np.zeros(ACFG.num_samples, np.float32), ACFG)
    assert mel.shape == (80, ACFG.num_frames) == (80, 1001) and mel.dtype == np.float32
    assert np.allclose(mel, -10.0)  # log10 of the 1e-10 floor
    assert log_mel(np.ones(1000, np.float32), ACFG).shape == (80, 1 + 1000 // ACFG.hop_length)


def _slaney_mel(hz: float) -> float:
    return hz / (200 / 3) if hz < 1000 else 15 + math.log(hz / 1000) * 27 / math.log(6.4)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 2500.0, 6000.0])
def test_log_mel_tone_lands_in_its_bin(freq: float) -> None:
    cfg = AudioConfig(seconds=1.0)
    mel = log_mel(_tone(freq, cfg.sample_rate, 1.0), cfg)
    # Slaney bins are equally spaced in mel between 0 and sr/2; filter i peaks at center i + 1.
    step = _slaney_mel(cfg.sample_rate / 2) / (cfg.n_mels + 1)
    expected = _slaney_mel(freq) / step - 1
    got = np.argmax(mel[:, 10:-10].mean(axis=1))
    assert abs(got - expected) <= 1, (got, expected)


def test_mel_frames_for_matches_the_padding() -> None:
    cfg = AudioConfig(seconds=1.0)
    assert mel_frames_for(cfg.num_samples, cfg) == cfg.num_frames
    assert mel_frames_for(10**9, cfg) == cfg.num_frames and mel_frames_for(0, cfg) == 0
    noise = np.random.default_rng(4).standard_normal(8_000).astype(np.float32) * 0.1
    wave, valid = fit_length(noise, cfg)
    k = mel_frames_for(valid, cfg)
    assert k == 51
    silent = np.isclose(log_mel(wave, cfg), -10.0).all(axis=0)
    # every counted frame has audio; past k, only frames whose window reaches back into the
    # audio (half a window = cfg.win_length // 2 samples) are non-silent
    spill = -(-cfg.win_length // 2 // cfg.hop_length)
    assert not silent[:k].any() and silent[k + spill:].all()

