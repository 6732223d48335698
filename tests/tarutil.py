"""Hand-made tar files for tests (real tar bytes).

`tar_bytes`/`write_tar` write well-formed tars with `tarfile`. The `raw_*` helpers write
the bytes of headers that no tar writer would produce (a size field of 2**80, a bad
checksum, a chain of 400 long-name headers, pax records that lie about their length) by
hand, after the ustar layout (POSIX.1-1988 header, 512-byte blocks).
"""
from __future__ import annotations

import io
import tarfile

BLOCK = 512
END = b"\0" * (2 * BLOCK)  # the end-of-archive marker


def tar_bytes(members: list, gz: bool = False) -> bytes:
    """members: (name, bytes) pairs, or (name, None, "symlink") for a link member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as t:
        for m in members:
            name, data = m[0], m[1]
            info = tarfile.TarInfo(name)
            if len(m) > 2 and m[2] == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                t.addfile(info)
                continue
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path, members: list, gz: bool = False) -> str:
    data = tar_bytes(members, gz)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def raw_header(name: bytes, size: int = 0, typeflag: bytes = b"0", *, size_field: bytes | None = None,
               linkname: bytes = b"", checksum: bytes | None = None) -> bytes:
    """One ustar header block. `size_field` replaces the 12-byte size field as given (base-256,
    garbage...); `checksum` replaces the computed checksum field."""
    h = bytearray(BLOCK)
    h[0:len(name[:100])] = name[:100]
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[157:157 + len(linkname[:100])] = linkname[:100]
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = checksum if checksum is not None else b"%06o\0 " % sum(h)
    return bytes(h)


def raw_member(name: bytes, data: bytes, typeflag: bytes = b"0", **kw) -> bytes:
    """Header + data + padding; `kw` as for `raw_header`."""
    return raw_header(name, len(data), typeflag, **kw) + padded(data)


def raw_long_name(name: bytes, size: int | None = None) -> bytes:
    """A GNU long-name (`L`) header that names the member after it; `size` lies if given."""
    data = name + b"\0"
    return raw_header(b"././@LongLink", len(data) if size is None else size, b"L") + padded(data)


def pax_records(fields: dict[bytes, bytes]) -> bytes:
    """Correctly framed pax records: "LENGTH KEYWORD=VALUE\\n", LENGTH counting itself."""
    out = b""
    for k, v in fields.items():
        body = b" " + k + b"=" + v + b"\n"
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n += 1
        out += str(n).encode() + body
    return out


def raw_pax(records: bytes, typeflag: bytes = b"x", size: int | None = None) -> bytes:
    """A pax extended (`x`) or global (`g`) header holding `records` as given."""
    return raw_header(b"./PaxHeaders/x", len(records) if size is None else size, typeflag) + padded(records)


def raw_tar(*parts: bytes, end: bool = True) -> bytes:
    """Parts in a row, then the end-of-archive marker (unless `end` is False)."""
    return b"".join(parts) + (END if end else b"")
