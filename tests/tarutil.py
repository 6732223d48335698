"""Hand-made tar files for tests (real tar bytes, written with `tarfile`)."""
from __future__ import annotations

import io
import tarfile


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
