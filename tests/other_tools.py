"""Shards written by other tools, made at test time: GNU tar and gzip (Debian's `tar` and
`gzip` packages) and webdataset's own `TarWriter`. Our reader must take what they write, not
only what our own writer writes: gzip-compressed shards, gzip-compressed members, members in
folders with the folder's own entry, long names in GNU (`././@LongLink`) and pax headers.

They stand in for the webdataset library's test shards (which only sit beside our own
checkouts), with the same shapes: a .tgz of PNG + .cls samples, a tar of `KEY.txt.gz`
members with hex-hash keys, a tar whose members sit in a folder.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

# the Debian package each tool comes from, for the skip reason
TOOLS = {"tar": "tar", "gzip": "gzip"}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"`{tool}` is not installed: these shards are made by it (apt-get install {TOOLS[tool]})")
    return path


def run(*args: str, cwd: Path) -> None:
    subprocess.run(list(args), cwd=cwd, check=True, capture_output=True, env={**os.environ, "LC_ALL": "C"})


def gnu_tar(out: Path, src: Path, names: list[str], *, fmt: str = "gnu", gzip: bool = False) -> Path:
    """GNU tar over `names` (files or folders under `src`), in that order (a sample's members
    must be neighbours), with fixed owner and time so that the bytes do not vary."""
    need("tar")
    if gzip:
        need("gzip")
    # --sort=name: a folder's files in name order, not the file system's
    flags = ["-czf" if gzip else "-cf", str(out), f"--format={fmt}", "--owner=0", "--group=0", "--numeric-owner",
             "--mtime=2020-01-01 00:00:00", "--sort=name"]
    run("tar", *flags, "-C", str(src), *names, cwd=src)
    return out


def digit_png(i: int) -> bytes:
    """A 28x28 grayscale PNG, a different pattern per i."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    pixels = (rng.random((28, 28)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def png_cls_tgz(folder: Path, n: int = 90) -> Path:
    """`sample.tgz`'s shape: n samples `I.png` + `I.cls`, the whole shard gzip-compressed (tar -z)."""
    src = folder / "png_cls"
    src.mkdir(parents=True)
    names = []
    for i in range(n):
        (src / f"{i}.png").write_bytes(digit_png(i))
        (src / f"{i}.cls").write_text(str(i % 10))
        names += [f"{i}.png", f"{i}.cls"]
    return gnu_tar(folder / "sample.tgz", src, names, gzip=True)


def gz_members_tar(folder: Path, n: int = 120, duplicates: int = 3) -> tuple[Path, int]:
    """`testgz.tar`'s shape: n samples of one `KEY.txt.gz` member each (gzip -n of a text,
    keys hex hashes), `duplicates` of them with a text another sample has too; pax headers.
    Returns the shard and the number of distinct texts."""
    gz = need("gzip")
    src = folder / "gz_members"
    src.mkdir(parents=True)
    names = []
    for i in range(n):
        j = i % (n - duplicates)  # the last `duplicates` samples repeat the first ones' texts
        text = f"sample {j}: " + "a web text of some length. " * (5 + j % 7)
        key = hashlib.sha1(f"key {i}".encode()).hexdigest()
        (src / f"{key}.txt").write_text(text)
        run(gz, "-n", "-9", f"{key}.txt", cwd=src)  # -> KEY.txt.gz, the original removed
        names.append(f"{key}.txt.gz")
    return gnu_tar(folder / "testgz.tar", src, names, fmt="pax"), n - duplicates


def folder_members_tar(folder: Path, n: int = 3) -> Path:
    """`compressed.tar`'s shape: the folder's own entry, then `compressed/000I.txt.gz`."""
    gz = need("gzip")
    src = folder / "folder_members"
    (src / "compressed").mkdir(parents=True)
    for i in range(1, n + 1):
        (src / "compressed" / f"{i:04d}.txt").write_text(f"text number {i}, in a folder")
        run(gz, "-n", f"compressed/{i:04d}.txt", cwd=src)
    return gnu_tar(folder / "compressed.tar", src, ["compressed"])


def long_names_tar(folder: Path, fmt: str) -> tuple[Path, list[str]]:
    """Two samples whose keys are longer than the 100 bytes of a ustar name: GNU tar writes a
    `././@LongLink` member before each (fmt "gnu"), or a pax extended header (fmt "pax")."""
    src = folder / f"long_{fmt}"
    deep = "/".join(["a-rather-long-folder-name"] * 5)
    (src / deep).mkdir(parents=True)
    keys, names = [], []
    for i in range(2):
        key = f"{deep}/sample-{i:03d}-" + "x" * 40
        (src / f"{key}.txt").write_text(f"caption {i}")
        (src / f"{key}.cls").write_text(str(i))
        keys.append(key)
        names += [f"{key}.txt", f"{key}.cls"]
    return gnu_tar(folder / f"long-{fmt}.tar", src, names, fmt=fmt), keys


def webdataset_shard(folder: Path, n: int = 8, *, gz: bool = True) -> tuple[Path, list[str]]:
    """A shard from webdataset's own `TarWriter` (gzip-compressed when `gz`): a PNG, a caption
    and a class per sample, encoded by webdataset's default encoders."""
    import webdataset as wds

    path = folder / ("wds.tar.gz" if gz else "wds.tar")
    keys = [f"wds{i:04d}" for i in range(n)]
    with open(path, "wb") as f, wds.TarWriter(f, compress=gz, mtime=0) as w:
        for i, key in enumerate(keys):
            w.write({"__key__": key, "png": digit_png(100 + i), "txt": f"a caption for sample {i}", "cls": i % 3})
    return path, keys
