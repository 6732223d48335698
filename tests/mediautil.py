"""Media files written or edited by hand for tests: what no encoder writes (a 16-bit RGB PNG,
a PNG header that lies about its size, a WAV header with an impossible sample rate or a data
size that does not match the data)."""
from __future__ import annotations

import struct
import zlib

import numpy as np


def png_by_hand(w: int, h: int, color_type: int, bit_depth: int, pixels: np.ndarray | None = None,
                rows: int | None = None) -> bytes:
    """A PNG written by hand: Pillow writes no 16-bit RGB/RGBA/LA and never lies about its size.
    `pixels`: h x w x channels (big-endian for 16 bits); `rows`: only that many rows of zeros
    (RGB), in a zlib stream that breaks off (a complete stream of fewer rows, Pillow fills up
    with black); neither: a header and no image data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    idat = b""
    if pixels is not None:
        raw = np.hstack([np.zeros((h, 1), np.uint8), pixels.reshape(h, -1).view(np.uint8)]).tobytes()
        idat = zlib.compress(raw, 1)  # filter byte 0 before each row
    elif rows is not None:
        z = zlib.compressobj(1)
        idat = z.compress(bytes((1 + w * 3 * bit_depth // 8) * rows)) + z.flush(zlib.Z_SYNC_FLUSH)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def wav_edited(data: bytes, *, rate: int | None = None, data_size: int | None = None) -> bytes:
    """A WAV whose header fields are edited: the fmt sample rate, the data chunk's size."""
    b = bytearray(data)
    if rate is not None:
        i = b.find(b"fmt ")
        b[i + 12:i + 16] = struct.pack("<I", rate)
    if data_size is not None:
        j = b.find(b"data")
        b[j + 4:j + 8] = struct.pack("<I", data_size)
    return bytes(b)
