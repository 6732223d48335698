"""Why a sample did not make it into the output.

Every sample the reader sees ends in exactly one place: written, or a row of
`_quarantine.parquet` whose `kind` says whether it was an error in the input, a
filter rule, or a duplicate. The reason codes here are the vocabulary of that
file, of `_stats.json` and of the tests, so they are plain strings, not an enum
that a downstream reader would have to import.
"""
from __future__ import annotations

# kind: the input is broken (the sample is unreadable as given)
ERROR = "error"
# kind: the sample is readable but a configured rule rejects it
FILTER = "filter"
# kind: the same content was already kept under another id
DUPLICATE = "duplicate"

# --- container level (tar stream) ---
SHARD_UNREADABLE = "shard_unreadable"            # cannot open / list the shard at all
TRUNCATED_SHARD = "truncated_shard"              # the tar stream ends or breaks mid-way
UNSAFE_MEMBER_NAME = "unsafe_member_name"        # absolute, '..', not a regular file, not UTF-8, control chars, too long
TAR_HEADER_TOO_LARGE = "tar_header_too_large"    # a GNU long name/link or pax header over its cap, or too long a chain
MEMBER_WITHOUT_EXTENSION = "member_without_extension"
MEMBER_TOO_LARGE = "member_too_large"            # stored size, or inflated size of KEY.ext.gz, over the cap
SAMPLE_TOO_LARGE = "sample_too_large"            # too many members or too many bytes in one sample
MEMBER_DECOMPRESS_ERROR = "member_decompress_error"  # KEY.ext.gz that is not gzip
DUPLICATE_KEY = "duplicate_key"                  # key seen earlier in the same shard

# --- decoding ---
IMAGE_DECODE_ERROR = "image_decode_error"
TEXT_NOT_UTF8 = "text_not_utf8"
TEXT_BAD_JSON = "text_bad_json"                  # not JSON, or no "caption"/"text" string
AUDIO_DECODE_ERROR = "audio_decode_error"
AUDIO_EMPTY = "audio_empty"
NO_USABLE_MODALITY = "no_usable_modality"
IMAGE_TOO_LARGE = "image_too_large"              # more pixels than data.image.max_pixels (checked from the header)
AUDIO_UNSUPPORTED = "audio_unsupported"          # channels or sample rate outside data.audio's limits (from the header)

# --- the job's own failures, contained to one sample or one shard ---
INTERNAL_ERROR = "internal_error"                # an unexpected exception on one sample (a bug; logged with its traceback)
SHARD_CRASHED = "shard_crashed"                  # the shard's task died (OOM kill, native crash) on every retry

# --- filter rules ---
IMAGE_TOO_SMALL = "image_too_small"
AUDIO_TOO_LONG = "audio_too_long"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"

# --- dedup ---
DUPLICATE_CONTENT = "duplicate_content"


class SampleError(Exception):
    """A problem that disqualifies one sample (never the job).

    `reason` is one of the codes above; `detail` is a human-readable line.
    """

    def __init__(self, reason: str, detail: str = "", kind: str = ERROR):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.kind = kind


class SampleFiltered(SampleError):
    """A sample rejected by a configured rule rather than by broken input."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail, kind=FILTER)
