"""A synthetic WebDataset corpus with learnable structure and known defects.

Every sample shows one of `subjects` things, and its caption, image and audio all
agree on which: a subject has its own shape, colour and texture, and its own pitch
and formants, so a model can learn to tie the modalities together. Everything else
(sizes, encodings, sample rates, noise, layout inside the tar) varies the way a
scraped corpus does, so the reader meets the formats it will meet in real data.

With `defects=True` one sample of each kind the reader must refuse is planted, and
`_corpus.json` says where and with which reason code, so that tests can check the
quarantine instead of guessing. Output is a pure function of the arguments: the
random state of each sample comes from (seed, stream, index) only.
"""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import fsspec
import numpy as np
import soundfile as sf
from PIL import Image

from . import reasons as R
from .errors import ConfigError

_SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "diamond", "crescent"]
_TEXTURES = ["", "striped", "dotted", "checkered"]
# Ordered so that the first 16 subjects read "a red circle", "a blue square", ...
_COLOURS = [
    ("red", (220, 30, 30), "红色"), ("grey", (128, 128, 128), "灰色"), ("cyan", (30, 210, 220), "青色"),
    ("blue", (30, 60, 220), "蓝色"), ("lime", (160, 240, 40), "黄绿色"), ("white", (245, 245, 245), "白色"),
    ("green", (30, 170, 50), "绿色"), ("navy", (20, 30, 110), "深蓝色"), ("pink", (245, 120, 180), "粉色"),
    ("yellow", (240, 220, 30), "黄色"), ("gold", (212, 175, 55), "金色"), ("brown", (130, 80, 40), "棕色"),
    ("orange", (245, 140, 20), "橙色"), ("magenta", (230, 30, 200), "品红色"), ("teal", (0, 128, 128), "蓝绿色"),
    ("purple", (140, 40, 180), "紫色"),
]
_SHAPES_ZH = ["圆", "正方形", "三角形", "星星", "圆环", "十字", "菱形", "月牙"]
_TEXTURES_ZH = {"": "", "striped": "条纹", "dotted": "圆点", "checkered": "格子"}
MAX_SUBJECTS = len(_SHAPES) * len(_TEXTURES) * len(_COLOURS)

_TEMPLATES = [
    "a photo of {n}", "{N} on a plain background", "an image showing {n}", "a close-up picture of {n}",
    "there is {n} in this picture", "a blurry snapshot of {n}", "{n}, drawn over a soft gradient",
    "a small picture with {n} in it",
]
_TEMPLATES_ZH = ["一张{x}的照片", "图里有一个{x}", "一个{x}"]
_RATES, _RATE_P = [8000, 16000, 22050, 44100, 48000], [0.2, 0.35, 0.15, 0.15, 0.15]
# Vorbis, MP3 and PNG cost 10-40x more to encode than PCM and JPEG (Vorbis and MP3 grow with rate
# and channels), so they are rarer, and lossy audio lower-rate: the generator must stay fast enough
# for tests and benchmarks (>= 150 samples/s on 2 cores).
_AUDIO_EXTS, _AUDIO_P = ["wav", "flac", "ogg", "mp3"], [0.54, 0.35, 0.07, 0.04]
_LOSSY_RATES, _LOSSY_P = [16000, 22050, 44100], [0.5, 0.35, 0.15]
_IMAGE_EXTS, _IMAGE_P = ["jpg", "JPG", "png", "webp"], [0.81, 0.04, 0.05, 0.1]
_MTIME = 1_700_000_000  # fixed, so that the same seed gives the same tar bytes
GOOD, TRUNC, DEFECT = 0, 1, 2  # random streams: a defect never shares noise with a good sample
# Sensor and room noise are cut at a random offset from fixed tables: drawing fresh noise per
# sample was a fifth of the generation time, and nothing downstream can tell the difference.
_PIXEL_NOISE = np.random.default_rng(7).integers(0, 19, (1280, 1280, 3), dtype=np.uint8)
_AUDIO_NOISE = np.random.default_rng(8).standard_normal(1 << 20, dtype=np.float32)


@dataclass(frozen=True)
class Subject:
    name: str
    name_zh: str
    shape: str
    texture: str
    rgb: tuple[int, int, int]
    f0: float                   # fundamental pitch of its "voice", Hz
    formants: tuple[float, float]


def subject(s: int) -> Subject:
    """Subject s: unique (shape, texture, colour) and (pitch, formant) up to MAX_SUBJECTS / 256."""
    if not 0 <= s < MAX_SUBJECTS:
        raise ValueError(f"subject index must be in [0, {MAX_SUBJECTS})")
    shape, texture = s % 8, (s // 8) % 4
    # For a fixed (shape, texture) the colour steps by one every 32 subjects, so triples never repeat.
    colour = (3 * shape + 8 * texture + s // 32) % 16
    cname, rgb, czh = _COLOURS[colour]
    words = " ".join(w for w in (_TEXTURES[texture], cname, _SHAPES[shape]) if w)
    name = ("an " if words[0] in "aeiou" else "a ") + words
    zh = f"{_TEXTURES_ZH[_TEXTURES[texture]]}{czh}的{_SHAPES_ZH[shape]}"
    # Pitches 12% apart (above the 2% per-sample jitter); formant pair index is 5s mod 16 so
    # neighbours in pitch sound different too.
    p = (5 * s + s // 16) % 16
    f1, f2 = (300.0, 450.0, 600.0, 750.0)[p % 4], (1000.0, 1400.0, 1900.0, 2500.0)[p // 4]
    return Subject(name, zh, _SHAPES[shape], _TEXTURES[texture], rgb, 95.0 * 2 ** ((s % 16) / 6), (f1, f2))


def subject_names(subjects: int) -> list[str]:
    return [subject(s).name for s in range(subjects)]


# ---------------------------------------------------------------- images

# Shapes as inside-tests in the subject's own frame (unit radius, v up). The diamond is a rhombus:
# with rotation limited to +-20 degrees it never looks like the square.
_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.8,
    "triangle": lambda u, v: (v >= -0.5) & (abs(u) * 1.732 <= 1 - v),
    "star": lambda u, v: np.hypot(u, v) <= 0.42 + 0.58 * ((1 + np.cos(5 * np.arctan2(v, u))) / 2) ** 2,
    "ring": lambda u, v: abs(u * u + v * v - 0.65) <= 0.35,
    "cross": lambda u, v: ((abs(u) <= 0.28) & (abs(v) <= 0.95)) | ((abs(v) <= 0.28) & (abs(u) <= 0.95)),
    "diamond": lambda u, v: abs(u) / 0.65 + abs(v) <= 1,
    "crescent": lambda u, v: (u * u + v * v <= 1) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 >= 0.64),
}
_PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "striped": lambda u, v: np.sin(u * 12.0) > 0,
    "dotted": lambda u, v: (u * 3.5 % 1 - 0.5) ** 2 + (v * 3.5 % 1 - 0.5) ** 2 < 0.09,
    "checkered": lambda u, v: (np.floor(u * 3) + np.floor(v * 3)) % 2 == 0,
}


def render_image(rng: np.random.Generator, subj: Subject, h: int, w: int) -> np.ndarray:
    """A photo-like RGB uint8 array: tinted gradient, vignette, sensor noise, the subject on top."""
    # The background is a colour gradient along x plus a brightness gradient along y, with a
    # vignette split the same way: one uint8 add of a row (w*3) and a column (h, 1), whose inner loop
    # runs over whole rows. Full-size work is three passes in all (a float pipeline was 5x slower).
    # Values stay in [10, 219] and noise adds <= 18, so uint8 never wraps.
    xs, ys = np.linspace(0, 1, w), np.linspace(0, 1, h)
    c0, c1 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    dark, tilt = rng.uniform(0, 80), rng.uniform(-20, 20)
    row = c0 + np.outer(xs, c1 - c0) - dark * ((xs - 0.5) ** 2)[:, None]
    col = tilt * (ys if tilt > 0 else ys - 1) - dark * (ys - 0.5) ** 2
    row, col = row + col.min(), col - col.min()
    img = (np.rint(row).astype(np.uint8).reshape(1, -1) + np.rint(col).astype(np.uint8)[:, None]).reshape(h, w, 3)

    # The subject is rasterised only inside its bounding box: most pixels never see the shape maths.
    r = rng.uniform(0.18, 0.38) * min(h, w)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    y0, y1, x0, x1 = int(max(cy - r, 0)), int(min(cy + r + 1, h)), int(max(cx - r, 0)), int(min(cx + r + 1, w))
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / r
    xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / r
    t = np.deg2rad(rng.uniform(-20, 20))
    u, v = xx * np.cos(t) + yy * np.sin(t), -(yy * np.cos(t) - xx * np.sin(t))  # v points up
    mask = _MASKS[subj.shape](u, v)
    base = np.clip(np.array(subj.rgb, np.float32) + rng.normal(0, 10, 3), 0, 211).astype(np.float32)
    second = base + (255 - base) * 0.6 if base.mean() < 90 else base * 0.45
    pat = _PATTERNS[subj.texture](u, v) if subj.texture else None
    shade = 1 + 0.12 * v  # light from above, so the shape is not a flat sticker
    box = img[y0:y1, x0:x1]
    for c in range(3):  # per channel: whole-row inner loops instead of 3-wide ones
        val = base[c] * shade if pat is None else (base[c] + (second[c] - base[c]) * pat) * shade
        np.copyto(box[..., c], np.minimum(val, 237), where=mask, casting="unsafe")
    n = len(_PIXEL_NOISE)
    oy, ox, strength = int(rng.integers(0, n - h + 1)), int(rng.integers(0, n - w + 1)), int(rng.integers(0, 3))
    img += _PIXEL_NOISE[oy:oy + h, ox:ox + w] >> strength
    return img


def encode_image(rng: np.random.Generator, arr: np.ndarray, ext: str) -> bytes:
    buf, im = io.BytesIO(), Image.fromarray(arr)
    fmt = ext.lower()
    if fmt in ("jpg", "jpeg"):
        im.save(buf, "JPEG", quality=int(rng.integers(70, 96)))
    elif fmt == "png":
        if rng.random() < 0.3:  # some PNGs carry an (opaque) alpha channel, as exported screenshots do
            im = im.convert("RGBA")
        im.save(buf, "PNG", compress_level=1)
    else:
        im.save(buf, "WEBP", quality=int(rng.integers(60, 90)), method=0)
    return buf.getvalue()


# ---------------------------------------------------------------- audio

def render_audio(rng: np.random.Generator, subj: Subject, sr: int, seconds: float, channels: int) -> np.ndarray:
    """Speech-like float32 audio, shape (n,) or (n, 2): a voiced tone shaped into syllables."""
    n = max(int(seconds * sr), 1)
    f0 = subj.f0 * float(np.exp(rng.normal(0, 0.02)))
    f1, f2 = (f * float(np.exp(rng.normal(0, 0.05))) for f in subj.formants)
    # One period of the voice as a wavetable: harmonics under a two-formant envelope, band-limited
    # below Nyquist; indexing it by phase is O(n) however many harmonics there are.
    hs = np.arange(1, max(int(min(0.4 * sr, 5000) / (f0 * 1.1)), 1) + 1, dtype=np.float32)
    amp = hs ** -0.7 * (np.exp(-((hs * f0 - f1) / 150) ** 2) + 0.6 * np.exp(-((hs * f0 - f2) / 250) ** 2) + 0.05)
    grid = np.arange(2048, dtype=np.float32) / 2048
    table = (amp[:, None] * np.sin(2 * np.pi * hs[:, None] * grid[None, :])).sum(0).astype(np.float32)
    # Pitch and loudness are drawn at a control rate of 100 Hz and interpolated: the per-sample work
    # is two interpolations and a table lookup, whatever the duration or rate.
    tc = np.arange(int(seconds * 100) + 2, dtype=np.float64) / 100
    # Falling intonation plus vibrato, so the pitch is alive but stays near the subject's f0.
    fc = f0 * (1 + 0.06 * (0.5 - tc / seconds)) * (1 + 0.015 * np.sin(2 * np.pi * 5.5 * tc))
    phase_c = np.concatenate([[0.0], np.cumsum(fc[:-1]) * (2048 / 100)])
    # Syllables: Hann-shaped bursts of 120-350 ms with short gaps and the odd pause.
    ctl = np.zeros(len(tc), np.float32)
    pos = int(rng.integers(0, 15))
    while pos < len(ctl) - 2:
        d = int(rng.integers(12, 35))
        ctl[pos:pos + d] = (np.hanning(d + 2)[1:-1] ** 0.7 * rng.uniform(0.4, 1.0))[: len(ctl) - pos]
        pos += d + int(rng.integers(2, 15 if rng.random() > 0.15 else 40))
    x = np.arange(n, dtype=np.float64) * (100 / sr)
    voice = table[np.interp(x, tc * 100, phase_c).astype(np.int64) & 2047]
    y = voice * np.interp(x, tc * 100, ctl).astype(np.float32)
    o = int(rng.integers(0, len(_AUDIO_NOISE)))
    noise = _AUDIO_NOISE[o:o + n] if o + n <= len(_AUDIO_NOISE) else np.resize(_AUDIO_NOISE[o:], n)
    y += noise * np.float32(rng.uniform(0.005, 0.03))
    y *= np.float32(rng.uniform(0.05, 0.9) / max(float(np.abs(y).max()), 1e-6))
    if channels == 2:
        y = np.stack([y, np.roll(y, int(rng.integers(1, 40))) * np.float32(rng.uniform(0.6, 1.0))], axis=1)
    return y


_REV = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _ogg_crc(page: bytes) -> int:
    # Ogg's CRC is the MSB-first CRC-32 with init 0 and no final xor. zlib computes the bit-reflected
    # one with init/xorout 0xffffffff: reflect the bytes in and the word out, and xor-ing with the CRC
    # of as many zero bytes cancels init and xorout. C speed without a table loop in Python.
    raw = zlib.crc32(page.translate(_REV)) ^ zlib.crc32(bytes(len(page)))
    return int(f"{raw:032b}"[::-1], 2)


def _fix_ogg_serial(data: bytes, serial: int) -> bytes:
    """libsndfile draws the Ogg stream serial from the clock; pin it so equal seeds give equal bytes."""
    out, i = bytearray(data), 0
    while i + 27 <= len(out) and out[i:i + 4] == b"OggS":
        nseg = out[i + 26]
        end = i + 27 + nseg + sum(out[i + 27:i + 27 + nseg])
        out[i + 14:i + 18] = serial.to_bytes(4, "little")
        out[i + 22:i + 26] = b"\0\0\0\0"
        out[i + 22:i + 26] = _ogg_crc(bytes(out[i:end])).to_bytes(4, "little")
        i = end
    return bytes(out)


def encode_audio(rng: np.random.Generator, y: np.ndarray, sr: int, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "wav":  # never FLOAT: libsndfile stamps the wall clock into its PEAK chunk
        subtype = "PCM_U8" if sr == 8000 and rng.random() < 0.3 else ("PCM_24" if rng.random() < 0.1 else "PCM_16")
        sf.write(buf, y, sr, format="WAV", subtype=subtype)
    elif ext == "flac":
        sf.write(buf, y, sr, format="FLAC", subtype="PCM_24" if rng.random() < 0.15 else "PCM_16")
    elif ext == "ogg":
        sf.write(buf, y, sr, format="OGG", subtype="VORBIS")
        return _fix_ogg_serial(buf.getvalue(), int(rng.integers(1, 2**31)))
    else:
        sf.write(buf, y, sr, format="MP3", subtype="MPEG_LAYER_III")
    return buf.getvalue()


# ---------------------------------------------------------------- samples

Member = tuple  # (name, data bytes, linkname or None)


@dataclass
class Plan:
    """The cheap random choices of one sample; `render` then spends the rest of `rng` on pixels/audio."""
    key: str
    subject: int
    rng: np.random.Generator = field(repr=False)
    image: tuple[str, int, int] | None = None          # (ext, height, width)
    text: tuple[str, str, dict] | None = None          # (ext, caption, extra json fields)
    audio: tuple[str, int, float, int] | None = None   # (ext, rate, seconds, channels)

    @property
    def plain(self) -> bool:
        """All three modalities, no folder, no gzip: a safe original for the duplicate defects."""
        return "/" not in self.key and None not in (self.image, self.text, self.audio) \
            and self.text[0] != "txt.gz" and self.image[0].islower()


def plan(seed: int, stream: int, index: int, subjects: int) -> Plan:
    rng = np.random.default_rng([seed, stream, index])
    subj = subject(index % subjects)
    key = f"{'t' if stream == TRUNC else 's'}{index:07d}"
    if rng.random() < 0.05:
        key = f"sub/{key}"  # members inside a folder: the folder is part of the WebDataset key
    short = int(160 + 480 * rng.random() ** 4)  # mostly small images, a tail up to 640
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2))))
    h, w = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
    if rng.random() < 0.05:
        cap = rng.choice(_TEMPLATES_ZH).format(x=subj.name_zh)
    else:
        cap = rng.choice(_TEMPLATES).format(n=subj.name, N=subj.name[0].upper() + subj.name[1:])
    text_ext = "json" if rng.random() < 0.4 else ("txt.gz" if rng.random() < 0.07 else "txt")
    extra = {"source": "synthetic", "lang": "zh" if cap[0] > "~" else "en", "width": w, "height": h} \
        if text_ext == "json" and rng.random() < 0.5 else {}
    audio_ext = str(rng.choice(_AUDIO_EXTS, p=_AUDIO_P))
    lossy = audio_ext in ("ogg", "mp3")
    rate = int(rng.choice(_LOSSY_RATES, p=_LOSSY_P) if lossy else rng.choice(_RATES, p=_RATE_P))
    seconds = 1 + 5 * float(rng.random()) ** 2  # 1-6 s, mostly short like spoken captions
    p = Plan(key, index % subjects, rng,
             (str(rng.choice(_IMAGE_EXTS, p=_IMAGE_P)), h, w), (text_ext, cap, extra),
             (audio_ext, rate, seconds, 1 + int(rng.random() < (0.1 if lossy else 0.25))))
    if rng.random() < 0.05:  # a sample missing exactly one modality is still a valid sample
        setattr(p, ("image", "text", "audio")[int(rng.integers(3))], None)
    return p


def render(p: Plan) -> list[Member]:
    subj, rng, out = subject(p.subject), p.rng, []
    if p.image:
        ext, h, w = p.image
        out.append((f"{p.key}.{ext}", encode_image(rng, render_image(rng, subj, h, w), ext), None))
    if p.text:
        ext, cap, extra = p.text
        if ext == "json":
            data = json.dumps({"caption": cap, **extra}, ensure_ascii=rng.random() < 0.3).encode()
        else:
            data = (cap + ("\n" if rng.random() < 0.3 else "")).encode("utf-8")
            data = gzip.compress(data, mtime=0) if ext == "txt.gz" else data
        out.append((f"{p.key}.{ext}", data, None))
    if p.audio:
        ext, sr, secs, ch = p.audio
        out.append((f"{p.key}.{ext}", encode_audio(rng, render_audio(rng, subj, sr, secs, ch), sr, ext), None))
    return out


# ---------------------------------------------------------------- defects

def _defects(seed: int, subjects: int) -> dict[str, tuple[str, str, str, Callable[[], list[Member]]]]:
    """defect -> (reason, kind, flawed member name, builder). One flaw in an otherwise valid sample."""
    def flaw(j: int, name: str, ext: str, new_ext: str, make: Callable[[np.random.Generator, bytes], bytes],
             audio_ext: str = "wav") -> Callable[[], list[Member]]:
        def build() -> list[Member]:
            p = plan(seed, DEFECT, j, subjects)
            # No folder and all modalities, so that only the planted flaw can disqualify it.
            p.key, p.image, p.audio = f"bad-{name}", ("jpg", 200, 260), (audio_ext, 16000, 1.5, 1)
            p.text = ("txt", f"a photo of {subject(p.subject).name}", {})
            ms = render(p)
            i = next(i for i, m in enumerate(ms) if m[0].endswith("." + ext))
            ms[i] = (f"{p.key}.{new_ext}", make(p.rng, ms[i][1]), None)
            return ms
        return build

    empty = io.BytesIO()
    sf.write(empty, np.zeros(0, np.float32), 16000, format="WAV", subtype="PCM_16")  # header, 0 frames
    long_cap = ("a red circle on a plain background " * 40)[:1199] + "."
    E, F = R.ERROR, R.FILTER
    table = [  # (defect, reason, kind, flawed member's modality ext, new ext, bytes, audio ext)
        ("corrupt_jpeg", R.IMAGE_DECODE_ERROR, E, "jpg", "jpg", lambda r, b: b[: len(b) // 2], "wav"),
        ("random_png", R.IMAGE_DECODE_ERROR, E, "jpg", "png", lambda r, b: r.bytes(4000), "wav"),
        ("empty_wav", R.AUDIO_EMPTY, E, "wav", "wav", lambda r, b: empty.getvalue(), "wav"),
        # bytes below 0x80 hold no MPEG frame sync, so libsndfile cannot mistake them for an MP3
        ("garbage_flac", R.AUDIO_DECODE_ERROR, E, "flac", "flac",
         lambda r, b: b"\0garbage" + r.integers(0, 128, 3000, dtype=np.uint8).tobytes(), "flac"),
        ("text_not_utf8", R.TEXT_NOT_UTF8, E, "txt", "txt", lambda r, b: b"\xff\xfe caption", "wav"),
        ("bad_json", R.TEXT_BAD_JSON, E, "txt", "json", lambda r, b: b'{"caption": "a red circ', "wav"),
        ("image_too_small", R.IMAGE_TOO_SMALL, F, "jpg", "jpg",
         lambda r, b: encode_image(r, render_image(r, subject(0), 16, 16), "jpg"), "wav"),
        ("audio_too_long", R.AUDIO_TOO_LONG, F, "wav", "wav",
         lambda r, b: encode_audio(r, render_audio(r, subject(0), 8000, 70.0, 1), 8000, "wav"), "wav"),
        ("caption_too_short", R.CAPTION_TOO_SHORT, F, "txt", "txt", lambda r, b: b"a", "wav"),
        ("caption_too_long", R.CAPTION_TOO_LONG, F, "txt", "txt", lambda r, b: long_cap.encode(), "wav"),
        ("bad_gzip", R.MEMBER_DECOMPRESS_ERROR, E, "txt", "txt.gz", lambda r, b: b"not gzip", "wav"),
    ]
    out = {d: (reason, kind, f"bad-{d}.{new}", flaw(j, d, ext, new, make, aext))
           for j, (d, reason, kind, ext, new, make, aext) in enumerate(table)}
    # These stand alone: the member itself is the flaw, there is no sample around it.
    alone = [("only_cls", R.NO_USABLE_MODALITY, "bad-only_cls.cls", b"7", None),
             ("parent_escape", R.UNSAFE_MEMBER_NAME, "../escape.txt", b"a red circle", None),
             ("absolute_name", R.UNSAFE_MEMBER_NAME, "/tmp/abs.txt", b"a red circle", None),
             ("symlink", R.UNSAFE_MEMBER_NAME, "bad-symlink.txt", b"", "README"),
             ("no_extension", R.MEMBER_WITHOUT_EXTENSION, "README", b"synthetic corpus\n", None)]
    for d, reason, name, data, link in alone:
        out[d] = (reason, E, name, lambda m=(name, data, link): [m])
    return out


# ---------------------------------------------------------------- writing

def _add(tar: tarfile.TarFile, members: list[Member]) -> None:
    for name, data, link in members:
        info = tarfile.TarInfo()
        info.name, info.mtime, info.mode = name, _MTIME, 0o644  # set directly: names are not sanitised
        if link is not None:
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _interleave(goods: list, bad: list) -> list:
    """Defects spaced evenly between the good samples, so no reader can special-case the ends."""
    out, d = [], 0
    for g, item in enumerate(goods):
        while d < len(bad) and (d + 1) * len(goods) // (len(bad) + 1) <= g:
            out.append(bad[d])
            d += 1
        out.append(item)
    return out + bad[d:]


def _truncated_shard(seed: int, subjects: int) -> tuple[bytes, list[str], str, str]:
    """10 good samples, then one cut in the middle of its last member, then two never reached."""
    plans = [plan(seed, TRUNC, i, subjects) for i in range(13)]
    cut = plans[10]  # made whole and folder-free, so that the cut lands mid-sample in a big member
    cut.key, cut.image = cut.key.split("/")[-1], cut.image or ("jpg", 200, 260)
    cut.text, cut.audio = cut.text or ("txt", subject(cut.subject).name, {}), cut.audio or ("wav", 16000, 2.0, 1)
    buf, rendered = io.BytesIO(), [render(p) for p in plans]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for members in rendered:
            _add(tar, members)
    name = rendered[10][-1][0]
    info = tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getmember(name)
    return buf.getvalue()[: info.offset_data + info.size // 2], [p.key for p in plans[:10]], cut.key, name


def make_corpus(out: str, samples: int, shards: int = 1, *, seed: int = 0, subjects: int = 16,
                defects: bool = False, storage_options: dict | None = None, progress: bool = False) -> dict:
    """Write `samples` good samples over `shards` tar shards under `out` (local path or fsspec URL).

    With `defects`, one sample per known defect is added (plus `shard-trunc.tar`), each recorded in
    `_corpus.json` with the reason code the reader must give it. Returns what `_corpus.json` holds.
    """
    if samples < 0 or shards < 1 or not 1 <= subjects <= MAX_SUBJECTS:
        raise ConfigError(f"need samples >= 0, shards >= 1 and 1 <= subjects <= {MAX_SUBJECTS}")
    if defects and samples < 1:
        raise ConfigError("defects=True needs at least one good sample to duplicate")
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    names = [f"shard-{i:06d}.tar" for i in range(shards)]
    ranges = [range(i * samples // shards, (i + 1) * samples // shards) for i in range(shards)]
    items: list[list[Callable[[], list[Member]]]] = [
        [lambda i=i: render(plan(seed, GOOD, i, subjects)) for i in r] for r in ranges]
    records: list[dict] = []

    def record(shard: str, key: str, member: str | None, defect: str, reason: str, kind: str, **kw) -> None:
        records.append({"shard": shard, "key": key, "member": member, "defect": defect, "reason": reason,
                        "kind": kind, **kw})

    if defects:
        bad: list[list[Callable[[], list[Member]]]] = [[] for _ in names]
        for j, (name, (reason, kind, member, build)) in enumerate(_defects(seed, subjects).items()):
            bad[j % shards].append(build)
            # a flawed sample is keyed like any sample; a flawed name is recorded as written
            key = member.split(".")[0] if member.startswith("bad-") and name != "symlink" else member
            record(names[j % shards], key, member, name, reason, kind)
        items = [_interleave(g, b) for g, b in zip(items, bad)]
        # The duplicates close the last shard (never empty when samples >= 1), the copy first, so
        # the repeated key is never adjacent to its first occurrence. Originals are plain samples.
        c = shards - 1
        cands = [plan(seed, GOOD, i, subjects) for i in list(ranges[c])[:64]]
        plain = [p for p in cands if p.plain] or cands
        orig_k, orig_c = plain[0], plain[-1]
        copy = "bad-duplicate_content"
        items[c].append(lambda: [(copy + n[len(orig_c.key):], d, None) for n, d, _ in
                                 render(plan(seed, GOOD, int(orig_c.key[-7:]), subjects))])
        record(names[c], copy, None, "duplicate_content", R.DUPLICATE_CONTENT, R.DUPLICATE, original=orig_c.key)

        def dup_key() -> list[Member]:
            p = plan(seed, DEFECT, 100, subjects)
            p.key = orig_k.key  # new content under a key this shard already used
            return render(p)
        items[c].append(dup_key)
        record(names[c], orig_k.key, None, "duplicate_key", R.DUPLICATE_KEY, R.ERROR)

    every = max(1, shards // 10)
    with ThreadPoolExecutor(max_workers=2) as pool:  # encoders and numpy release the GIL
        for s, name in enumerate(names):
            with fs.open(f"{root}/{name}", "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
                for lo in range(0, len(items[s]), 32):  # bounded look-ahead keeps memory flat
                    for members in pool.map(lambda build: build(), items[s][lo:lo + 32]):
                        _add(tar, members)
            if progress and ((s + 1) % every == 0 or s + 1 == shards):
                print(f"[corpus] {s + 1}/{shards} shards written", flush=True)

    meta: dict = {"samples": samples, "shards": names, "seed": seed, "subjects": subjects,
                  "subject_names": subject_names(subjects), "defects": records,
                  "good_keys_in_truncated_shard": [], "shard_samples": {n: len(r) for n, r in zip(names, ranges)}}
    if defects:
        data, good, cut_key, cut_member = _truncated_shard(seed, subjects)
        with fs.open(f"{root}/shard-trunc.tar", "wb") as f:
            f.write(data)
        names.append("shard-trunc.tar")
        meta["shard_samples"]["shard-trunc.tar"], meta["good_keys_in_truncated_shard"] = len(good), good
        record("shard-trunc.tar", cut_key, cut_member, "truncated_shard", R.TRUNCATED_SHARD, R.ERROR)
    meta["good_total"] = samples + len(meta["good_keys_in_truncated_shard"])
    with fs.open(f"{root}/_corpus.json", "wb") as f:
        f.write(json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))
    return meta
