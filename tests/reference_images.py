"""The previous image code, verbatim (pipelines/images.py as of the issue-16 base commit): the
reference that tests/test_image_speedups.py and benchmarks/image_stages.py compare the current
implementation against. Do not change it; it is what "within tolerance of the previous
implementation" means. Its own description follows.

Image member bytes -> a uint8 [size, size, 3] RGB crop, and that crop -> JPEG bytes.

Pure functions (numpy in, numpy out; no torch, no Ray) shared by the raw-shard training path and
the offline preprocessor. Broken input raises `SampleError`, a configured rule raises
`SampleFiltered`; nothing here ever fails the job.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageFile
# The plugins of the formats we accept, registered up front: `Image.open(formats=...)` calls
# `Image.init()`, which imports every one of Pillow's ~45 plugins, as soon as a requested
# format is not registered yet, and WEBP is not among the few `Image.preinit()` loads: every
# fresh Ray worker would import plugins `decode_image` never uses.
from PIL import JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401  (registration)

from pipelines.config import ImageConfig
from pipelines.reasons import IMAGE_DECODE_ERROR, IMAGE_TOO_LARGE, IMAGE_TOO_SMALL, SampleError, SampleFiltered
from pipelines.stage_clock import stage

# CLIP's normalization constants (RGB, for [0, 1] inputs), applied later on the model side.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


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
        with stage("resize"):
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
