"""An adversarial corpus of container-level hostile input, through the real preprocess job.

Each kind is one real tar (or .tar.gz) shard with good samples beside the hostile part: two
before it, one after. Every kind must end quarantined (or, for code-carrying extras, left
out of the output and counted) with its reason; the good samples come out, except where
the damage makes the rest of the stream unreadable (then the samples before it come out,
the one still open at the damage carries the damage's reason, and the record says after
how many records the shard broke); the job returns normally; nothing is written outside
the output folder; no pickle-like member reaches the output.
"""
import bz2
import gzip
import io
import json
import os
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import reasons as R
from pipelines.config import DataConfig
from pipelines.preprocess import format_summary, preprocess
from pipelines.source import base_plus_ext
from tarutil import pax_records, raw_header, raw_long_name, raw_member, raw_pax, raw_tar

MIB = 1 << 20
CFG = DataConfig(max_member_bytes=MIB, max_sample_bytes=2 * MIB)  # small caps: cheap bombs
PICKLE_LIKE = ("pyd", "pickle", "pkl", "pth", "pt", "npy", "npz")

_ZEROS_GZ = gzip.compress(b"\0" * (64 * MIB), compresslevel=9)  # ~64 KB inflating to 64 MiB


def _npy_object() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"__reduce__": "os.system"}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _pickle_extra(ext: str):
    payload = _npy_object() if ext == "npy" else b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR."
    return lambda: [raw_member(b"x.txt", f"a caption with a .{ext} extra".encode()),
                    raw_member(f"x.{ext}".encode(), payload),
                    raw_member(b"x.json", b'{"source": "user metadata"}'), raw_member(b"x.cls", b"7")]


def _gzip_named(tar: bytes, name: bytes) -> bytes:
    """A .tar.gz whose gzip header carries a file name (tarfile reads it a byte per call)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflate.compress(tar) + deflate.flush()
    return b"\x1f\x8b\x08\x08\0\0\0\0\x00\x03" + name + b"\0" + body + struct.pack("<II", zlib.crc32(tar), len(tar))


def _one(*parts: bytes):
    return lambda: list(parts)


# kind -> (builder of the hostile parts, reason, goods written (of g0 g1 g2), shard suffix)
#   reason None: the sample is kept, its pickle-like member left out and counted
#   a builder returning bytes (not a list) is the whole file
SAMPLE, BEFORE, NONE = ("g0", "g1", "g2"), ("g0",), ()
KINDS = {
    "name_not_utf8": (_one(raw_member(b"k\xff.jpg", b"x")), R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar"),
    "name_control_chars": (_one(raw_member(b"k\x1b[2J.txt", b"x")), R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar"),
    "name_too_long": (_one(raw_long_name(b"n" * 2000 + b".txt"), raw_member(b"n.txt", b"x")),
                      R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar"),
    "name_parent": (_one(raw_member(b"../escape.txt", b"x")), R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar"),
    "name_absolute": (_one(raw_member(b"/tmp/abs.txt", b"x")), R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar"),
    "pax_name_not_utf8": (_one(raw_pax(pax_records({b"path": b"p\xfe.txt"})), raw_member(b"p.txt", b"x")),
                          R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar"),
    "hard_link": (_one(raw_header(b"h.txt", 0, b"1", linkname=b"g0.txt")), R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar"),
    "symlink": (_one(raw_header(b"s.txt", 0, b"2", linkname=b"/etc/passwd")), R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar"),
    "char_device": (_one(raw_header(b"c.txt", 0, b"3")), R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar"),
    "fifo": (_one(raw_header(b"f.txt", 0, b"6")), R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar"),
    "sparse_file": (_one(raw_header(b"s.txt", 0, b"S")), R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar"),
    "unknown_type": (_one(raw_header(b"u.txt", 3, b"Z") + b"abc".ljust(512, b"\0")), R.UNSAFE_MEMBER_NAME,
                     SAMPLE, ".tar"),
    "no_extension": (_one(raw_member(b"README", b"x")), R.MEMBER_WITHOUT_EXTENSION, SAMPLE, ".tar"),
    "gzip_bomb_member": (_one(raw_member(b"b.jpg.gz", _ZEROS_GZ)), R.MEMBER_TOO_LARGE, SAMPLE, ".tar"),
    "gzip_bomb_caption": (_one(raw_member(b"b.txt.gz", _ZEROS_GZ)), R.CAPTION_TOO_LONG, SAMPLE, ".tar"),
    "truncated_gzip_member": (_one(raw_member(b"t.txt.gz", gzip.compress(b"a caption" * 50)[:-9])),
                              R.MEMBER_DECOMPRESS_ERROR, SAMPLE, ".tar"),
    "member_over_cap": (_one(raw_member(b"m.bin", b"m" * (MIB + 1))), R.MEMBER_TOO_LARGE, SAMPLE, ".tar"),
    "caption_over_cap": (_one(raw_member(b"c.txt", b"c" * (CFG.text.max_bytes + 1))), R.CAPTION_TOO_LONG,
                         SAMPLE, ".tar"),
    "members_2000": (lambda: [raw_member(b"m.%d" % i, b"") for i in range(2000)], R.SAMPLE_TOO_LARGE,
                     SAMPLE, ".tar"),
    "sample_bytes_over_cap": (lambda: [raw_member(b"s.%s" % e, b"s" * (900 << 10)) for e in (b"a", b"b", b"c")],
                              R.SAMPLE_TOO_LARGE, SAMPLE, ".tar"),
    **{f"extra_{ext}": (_pickle_extra(ext), None, SAMPLE, ".tar") for ext in PICKLE_LIKE},
    "long_name_chain_400": (lambda: [raw_long_name(b"x" * 200 + b".txt") for _ in range(400)],
                            R.TAR_HEADER_TOO_LARGE, BEFORE, ".tar"),
    "long_name_size_10gb": (_one(raw_long_name(b"x.txt", size=10 ** 10)), R.TAR_HEADER_TOO_LARGE, BEFORE, ".tar"),
    "pax_header_bomb": (_one(raw_pax(b"2 " * 30_000 + b"=\n"), raw_member(b"p.txt", b"x")),
                        R.TRUNCATED_SHARD, BEFORE, ".tar"),
    "pax_bad_record": (_one(raw_pax(b"99 path=a.txt\n"), raw_member(b"p.txt", b"x")), R.TRUNCATED_SHARD,
                       BEFORE, ".tar"),
    "pax_globals_pile_up": (lambda: [raw_pax(pax_records({b"c%d" % i: b"g" * 9000}), b"g") for i in range(9)],
                            R.TAR_HEADER_TOO_LARGE, BEFORE, ".tar"),
    "bad_checksum": (_one(raw_member(b"c.txt", b"abc", checksum=b"0000000\0")), R.TRUNCATED_SHARD, BEFORE, ".tar"),
    "negative_size": (_one(raw_header(b"n.txt", size_field=b"\xff" * 12)), R.TRUNCATED_SHARD, BEFORE, ".tar"),
    "garbage_size": (_one(raw_header(b"n.txt", size_field=b"zzzzzzzzzzz\0")), R.TRUNCATED_SHARD, BEFORE, ".tar"),
    "size_2_pow_88": (_one(raw_header(b"n.txt", size_field=b"\x80" + b"\xff" * 11)), R.TRUNCATED_SHARD,
                      ("g0", "g1"), ".tar"),
    "zero_filled_middle": (_one(b"\0" * 4096), R.TRUNCATED_SHARD, BEFORE, ".tar"),
    "bzip2_shard": (lambda: bz2.compress(raw_tar(raw_member(b"z.txt", b"a bzip2 caption"))), R.SHARD_UNREADABLE,
                    NONE, ".tar"),
    "empty_file": (lambda: b"", R.TRUNCATED_SHARD, NONE, ".tar"),
    "tars_concatenated": (_one(b"\0" * 1024 + raw_member(b"h.txt", b"a hidden caption")), R.TRUNCATED_SHARD, BEFORE,
                          ".tar"),
    "gz_header_file_name_8mb": (lambda: _gzip_named(raw_tar(raw_member(b"z.txt", b"a caption")), b"n" * (8 * MIB)),
                                R.TAR_HEADER_TOO_LARGE, NONE, ".tar.gz"),
    "gz_shard_gzip_bomb_member": (_one(raw_member(b"b.jpg.gz", _ZEROS_GZ)), R.MEMBER_TOO_LARGE, SAMPLE, ".tar.gz"),
    "gz_shard_name_not_utf8": (_one(raw_member(b"k\xff.jpg", b"x")), R.UNSAFE_MEMBER_NAME, SAMPLE, ".tar.gz"),
    "gz_shard_long_name_5gb": (_one(raw_long_name(b"x.txt", size=5 << 30)), R.TAR_HEADER_TOO_LARGE, BEFORE,
                               ".tar.gz"),
    "gz_shard_long_name_chain": (lambda: [raw_long_name(b"y" * 300 + b".txt") for _ in range(400)],
                                 R.TAR_HEADER_TOO_LARGE, BEFORE, ".tar.gz"),
}


def _good(kind: str, j: int) -> bytes:
    return raw_member(f"g{j}.txt".encode(), f"a photo of good sample {j} beside {kind}".encode())


@pytest.fixture(scope="module")
def hostile_run(ray_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    corpus, out = base / "corpus", base / "out"
    corpus.mkdir()
    for i, (kind, (build, _, _, suffix)) in enumerate(KINDS.items()):
        hostile = build()
        if not isinstance(hostile, bytes):  # parts of a tar, between good samples; else the whole file
            hostile = raw_tar(_good(kind, 0), _good(kind, 1), *hostile, _good(kind, 2))
            hostile = gzip.compress(hostile) if suffix == ".tar.gz" else hostile
        (corpus / f"{i:02d}-{kind}{suffix}").write_bytes(hostile)
    before = _listing(base)
    stats = preprocess([str(corpus)], str(out), cfg=CFG, progress=False)
    return base, out, stats, before


def _listing(base) -> dict:
    """Every path under `base` but the output folder, with its size and mtime."""
    found = {}
    for dirpath, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if os.path.join(dirpath, d) != str(base / "out")]
        for n in names + dirs:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            found[os.path.relpath(p, base)] = (st.st_size, st.st_mtime_ns)
    return found


def _by_kind(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        name = r["source"].rsplit("/", 1)[-1]
        out.setdefault(name.split("-", 1)[1].split(".tar")[0], []).append(r)
    return out


def test_the_corpus_is_at_least_25_kinds():
    assert len(KINDS) >= 25


def test_every_kind_ends_with_its_reason_and_the_good_samples_come_out(hostile_run):
    _, out, stats, _ = hostile_run
    quarantine = _by_kind(pq.read_table(out / "_quarantine.parquet").to_pylist())
    written = _by_kind(pq.read_table(out / "_manifest.parquet").to_pylist())
    for kind, (_, reason, goods, _) in KINDS.items():
        keys = {r["key"] for r in written.get(kind, [])}
        rows = quarantine.get(kind, [])
        if reason is None:  # kept, minus the member
            assert not rows and keys == {*goods, "x"}, kind
            continue
        assert [r["reason"] for r in rows] == [reason], (kind, rows)
        assert keys == set(goods), (kind, keys)
        row = rows[0]
        assert row["kind"] == (R.FILTER if reason == R.CAPTION_TOO_LONG else R.ERROR), kind
        assert row["detail"] and row["detail"].isprintable() and row["key"].isprintable(), (kind, row)
        if goods == BEFORE:  # the damage ends the shard; the sample still open carries it
            assert row["key"] == "g1" and "damaged after" in row["detail"], (kind, row)
    # every sample read is written or quarantined, exactly once
    q_rows = sum(len(v) for v in quarantine.values())
    assert stats["read"] == stats["written"] + q_rows


def test_nothing_is_written_outside_the_output(hostile_run):
    base, out, _, before = hostile_run
    assert _listing(base) == before
    for dirpath, _, names in os.walk(out):
        assert not {"escape.txt", "abs.txt", "pwned"} & set(names)


def test_no_pickle_like_member_reaches_the_output_and_the_drops_are_counted(hostile_run):
    import tarfile

    import webdataset as wds

    _, out, stats, _ = hostile_run
    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    exts = set()
    for s in shards:
        with tarfile.open(s) as t:
            for m in t.getmembers():
                exts.add(base_plus_ext(m.name)[1])
                assert m.isreg() and base_plus_ext(m.name)[1].split(".")[-1] not in PICKLE_LIKE, (s, m.name)
    assert exts <= {"txt", "json", "orig.json", "cls"}
    assert stats["dropped_members"] == {ext: 1 for ext in PICKLE_LIKE}
    on_disk = json.loads((out / "_stats.json").read_text())
    assert on_disk["dropped_members"] == stats["dropped_members"]
    assert "dropped     7 extra member(s) not in data.extra_exts" in format_summary(stats, str(out))
    # webdataset's default decoders (which would unpickle .pyd/.pth) read all of it
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode())
    assert len(samples) == stats["written"]
    kept = [s for s in samples if s["__key__"] == "x"]
    assert len(kept) == len(PICKLE_LIKE)
    for s in kept:  # the allowed extras travel along; ours keeps its name, the user's gets orig.
        assert s["cls"] == 7 and s["orig.json"] == {"source": "user metadata"}
        assert s["json"]["key"] == "x" and s["txt"].startswith("a caption with a .")


def test_extras_outside_the_allow_list_are_left_out_and_ours_keep_their_names():
    from collections import Counter

    from pipelines.source import RawSample
    from pipelines.transform import count_dropped_members, encode_members, transform_sample

    members = {"txt": b"a caption of the sample", "json": b'{"user": 1}', "cls": b"3", "pyd": b"\x80\x04.",
               "mel.npy": _npy_object(), "orig.json": b"{}", "pth": b"\x80\x04."}
    sample = transform_sample(RawSample("k", "s.tar", 0, members=members), DataConfig())
    out = encode_members(sample, DataConfig())
    assert set(out) == {"txt", "json", "orig.json", "cls"}
    assert out["orig.json"] == b'{"user": 1}' and json.loads(out["json"])["key"] == "k" and out["cls"] == b"3"
    assert sorted(sample.dropped) == ["mel.npy", "orig.json", "pth", "pyd"]
    counts = Counter()
    count_dropped_members(counts, sample.dropped)
    assert counts == {f"dropped_member:{e}": 1 for e in sample.dropped}
    # an allow-list of the user's own
    cfg = DataConfig(extra_exts=("pyd",))
    assert set(encode_members(transform_sample(RawSample("k", "s.tar", 0, members=members), cfg), cfg)) == {
        "txt", "json", "pyd"}


def test_dropped_member_counts_stay_bounded_per_shard():
    from collections import Counter

    from pipelines.transform import count_dropped_members

    counts = Counter({"read": 5})
    count_dropped_members(counts, [f"x{i}" for i in range(100)])
    dropped = {k: n for k, n in counts.items() if k.startswith("dropped_member:")}
    assert len(dropped) == 33 and dropped["dropped_member:(other)"] == 68 and sum(dropped.values()) == 100
