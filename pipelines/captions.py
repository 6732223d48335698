"""Caption member bytes (UTF-8 .txt or .json) -> the normalized caption string.

Pure function shared by the raw-shard training path and the offline preprocessor. Broken input
raises `SampleError`, a configured rule raises `SampleFiltered`.
"""
from __future__ import annotations

import json
import re
import unicodedata

from pipelines.config import TextConfig
from pipelines.reasons import CAPTION_TOO_LONG, CAPTION_TOO_SHORT, TEXT_BAD_JSON, TEXT_NOT_UTF8, SampleError, SampleFiltered

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
