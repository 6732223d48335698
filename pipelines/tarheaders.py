"""Tar headers read with limits: `tarfile`'s own parser, with its unbounded steps capped.

We keep `tarfile` for the header format (checksums, number fields, GNU and ustar names,
base-256 sizes, pax records applied by `_apply_pax_info`) and intercept it where its
`TarInfo` is meant to be extended: `fromtarfile` and the `_proc_*` methods that
`_proc_member` dispatches to ("can be overridden in a subclass", tarfile.py). What
`tarfile` itself does not bound, and a shard's bytes therefore could drive:

- GNU long name/link (`L`/`K`) and pax (`x`/`g`/`X`) headers read their whole `size` into
  memory before looking at it: a size field of 10 GB is a 10 GB read. Capped at
  `header_bytes` before anything is read.
- Each such header fetches the next one by recursion (`_proc_gnulong` -> `fromtarfile` ->
  `_proc_member` -> ...): a chain of ~330 of them is a `RecursionError`. Capped at
  `header_chain` headers in a row.
- Python 3.11's pax parser scans records with a regex that accepts records whose length
  field points anywhere and stores every keyword it matched: a 64 KiB header of `2 2 2 ...=`
  records holds ~1 GB of keywords. CPython 3.13's parser is strict; ours (`_proc_pax`)
  applies the same framing rules on every Python version.
- Global pax headers (`g`) accumulate on the TarFile and are copied into every later member:
  their total is capped at `header_bytes`.
- Sparse members: the old GNU format (`S`) reads extension blocks for as long as they say
  "more follow", the 1.0 format reads a map of any length. We refuse sparse members anyway
  (never a regular file in a WebDataset shard), so extension blocks are only counted
  (capped) and the 1.0 map is never read.

Violations raise `ShardDamage`, which is not a `tarfile.HeaderError`, so `tarfile` neither
swallows it nor turns it into "end of archive". What a parsed header may name is
`unsafe_reason`'s business: a member refused by name or type is a record, not damage.
"""
from __future__ import annotations

import posixpath
import re
import tarfile
from dataclasses import dataclass

from . import reasons
from .config import DataConfig

BLOCK = tarfile.BLOCKSIZE
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
             tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
# a pax record: "LENGTH KEYWORD=VALUE\n"; 20 digits bound int() and any real length
_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")
# characters that break the line a name is printed on (C0, DEL, C1, line/paragraph separators)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True)
class ReadLimits:
    """What one shard may make the reader hold or do (README "Hostile input"); the names of
    the `DataConfig` settings they come from are in the messages that cite them."""

    member_bytes: int      # data.max_member_bytes: one member, stored or inflated
    sample_bytes: int      # data.max_sample_bytes: all members of one sample
    sample_members: int    # data.max_sample_members
    name_bytes: int        # data.max_name_bytes: a member name in UTF-8
    header_bytes: int      # data.max_header_bytes: one long name/link or pax header
    header_chain: int      # data.max_header_chain: extended headers in a row
    text_bytes: int        # data.text.max_bytes: a caption member, stored or inflated

    @classmethod
    def from_config(cls, cfg: DataConfig | None = None) -> "ReadLimits":
        cfg = cfg or DataConfig()
        return cls(cfg.max_member_bytes, cfg.max_sample_bytes, cfg.max_sample_members, cfg.max_name_bytes,
                   cfg.max_header_bytes, cfg.max_header_chain, cfg.text.max_bytes)


class ShardDamage(Exception):
    """The shard cannot be read on from here; `reason` is a code of `reasons.py`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class GuardedTarInfo(tarfile.TarInfo):
    """`tarfile.TarInfo` that enforces `limits` while headers are parsed and remembers, on
    the TarFile, why `tarfile` stopped.

    Use `GuardedTarInfo.with_limits(limits)` as `tarfile.open(..., tarinfo=...)`: the
    limits are a class attribute because `TarFile.__init__` parses the first header before
    the caller could hand the TarFile anything. Per-shard state (the chain length, the
    global pax bytes, the stop reason) lives on the TarFile.
    """

    limits: ReadLimits = ReadLimits.from_config()

    @classmethod
    def with_limits(cls, limits: ReadLimits) -> type["GuardedTarInfo"]:
        return type(cls.__name__, (cls,), {"limits": limits})

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        # `TarFile.next()` swallows a bad checksum, a short header and a missing end-of-archive
        # block (`EmptyHeaderError`: no bytes at all) and just ends the iteration; only an
        # all-zero block (`EOFHeaderError`) is a normal end. Keep the reason for the reader.
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            if getattr(tf, "stop_reason", None) is None:
                tf.stop_reason = f"{type(e).__name__}: {e}"  # type: ignore[attr-defined]
            raise

    def _proc_member(self, tf: tarfile.TarFile):
        limits = self.limits
        if self.type not in _EXTENDED:
            tf.header_chain = 0  # type: ignore[attr-defined]
            return super()._proc_member(tf)
        chain = getattr(tf, "header_chain", 0) + 1
        tf.header_chain = chain  # type: ignore[attr-defined]
        if chain > limits.header_chain:
            raise ShardDamage(reasons.TAR_HEADER_TOO_LARGE,
                              f"more than {limits.header_chain} extended headers in a row at byte "
                              f"{self.offset} (data.max_header_chain)")
        if not 0 <= self.size <= limits.header_bytes:
            raise ShardDamage(reasons.TAR_HEADER_TOO_LARGE,
                              f"extended header (type {self.type!r}) of {self.size} bytes at byte {self.offset}"
                              f" > {limits.header_bytes} (data.max_header_bytes)")
        if self.type == tarfile.XGLTYPE:
            total = getattr(tf, "global_pax_bytes", 0) + self.size
            tf.global_pax_bytes = total  # type: ignore[attr-defined]
            if total > limits.header_bytes:
                raise ShardDamage(reasons.TAR_HEADER_TOO_LARGE,
                                  f"global pax headers total {total} bytes at byte {self.offset}"
                                  f" > {limits.header_bytes} (data.max_header_bytes)")
        return super()._proc_member(tf)

    def _proc_sparse(self, tf: tarfile.TarFile):
        structs, extended, real_size = self._sparse_structs
        blocks = 0
        while extended:  # count the extension blocks, keep none of their entries
            buf = tf.fileobj.read(BLOCK)
            if len(buf) != BLOCK:
                raise tarfile.ReadError("unexpected end of data in a sparse header")
            blocks += 1
            if blocks * BLOCK > self.limits.header_bytes:
                raise ShardDamage(reasons.TAR_HEADER_TOO_LARGE,
                                  f"sparse header at byte {self.offset} has over {blocks} extension blocks")
            extended = bool(buf[504])
        self._sparse_structs = (structs, False, real_size)
        return super()._proc_sparse(tf)

    def _proc_pax(self, tf: tarfile.TarFile):
        """CPython's `_proc_pax` (3.11-3.13), with strict record framing and without sparse
        maps (a member with GNU.sparse.* records is marked sparse, then refused)."""
        buf = tf.fileobj.read(self._block(self.size))[: self.size]
        if len(buf) != self.size:
            raise tarfile.ReadError("unexpected end of data in a pax header")
        pax_headers = tf.pax_headers if self.type == tarfile.XGLTYPE else tf.pax_headers.copy()
        for keyword, value in _pax_records(buf, self.offset):
            # tarfile decodes pax records as UTF-8, names falling back to the TarFile's encoding
            # (hdrcharset=BINARY selects that one directly); the reader opens shards with
            # encoding utf-8, errors surrogateescape, so both ways give this. A name that is not
            # UTF-8 is then refused by name, instead of losing the shard here.
            pax_headers[keyword.decode("utf-8", tf.errors)] = value.decode("utf-8", tf.errors)
        try:
            following = self.fromtarfile(tf)
        except tarfile.HeaderError as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None
        if any(k.startswith("GNU.sparse.") for k in pax_headers):
            following.sparse = []  # refused by the reader, never read: its map stays unparsed
        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            following._apply_pax_info(pax_headers, tf.encoding, tf.errors)
            following.offset = self.offset
            if "size" in pax_headers:  # the member's data ends elsewhere than its header said
                end = following.offset_data
                if following.isreg() or following.type not in tarfile.SUPPORTED_TYPES:
                    end += following._block(max(following.size, 0))
                tf.offset = end
        return following


def printable(name: str, limit: int = 200) -> str:
    """`name` on one printable line: bytes that are not UTF-8 (surrogate-escaped by tarfile)
    as \\xNN, control and other unprintable characters escaped, cut after `limit` characters."""
    try:
        text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeError:
        text = ascii(name)[1:-1]
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def quoted(name: str) -> str:
    return f"'{printable(name)}'"


def unsafe_reason(info: tarfile.TarInfo, limits: ReadLimits) -> str | None:
    """Why a member must not be used, or None. Anything that could point outside the
    sample (links, devices, absolute or parent paths) is refused, never resolved; so is a
    name that is not UTF-8, holds control characters (it would break every line it is
    printed on) or is over `limits.name_bytes`."""
    name, shown = info.name, quoted(info.name)
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return f"member name {shown} is not valid UTF-8"
    if size > limits.name_bytes:
        return f"member name of {size} bytes > {limits.name_bytes} (data.max_name_bytes): {shown}"
    if _CONTROL.search(name):
        return f"member name {shown} holds control characters"
    if info.sparse is not None or info.type == tarfile.GNUTYPE_SPARSE:
        return f"{shown} is a sparse file"
    if not info.isreg():
        return f"{shown} is not a regular file (type {info.type!r})"
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return f"{shown} is an absolute or non-POSIX path"
    parts = name.split("/")
    if ".." in parts or any(p == "" for p in parts[:-1]):
        return f"{shown} climbs out of the shard or has an empty path part"
    if posixpath.normpath(name) != name:
        return f"{shown} is not a normalized path"
    return None


def _pax_records(buf: bytes, offset: int) -> list[tuple[bytes, bytes]]:
    """(keyword, value) of each "LENGTH KEYWORD=VALUE\\n" record; the framing rules are
    CPython 3.13's: LENGTH counts the whole record, which ends in a newline; NUL padding
    may follow the last record."""
    records, pos = [], 0
    while pos < len(buf) and buf[pos] != 0:
        match = _PAX_LENGTH.match(buf, pos)
        length = int(match.group(1)) if match else 0
        end = pos + length
        body = buf[match.end(): end - 1] if match else b""
        keyword, eq, value = body.partition(b"=")
        if length < 5 or end > len(buf) or buf[end - 1] != 0x0A or not keyword or not eq:
            raise ShardDamage(reasons.TRUNCATED_SHARD,
                              f"malformed pax record at byte {pos} of the header at byte {offset}")
        records.append((keyword, value))
        pos = end
    return records
