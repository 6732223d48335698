"""The tar reader and the Ray Data datasource, on real tars: ours and other tools'."""
import dataclasses
import gzip
import io
import struct
import tracemalloc
import zlib

import pytest

import other_tools as other_tools_mod
from pipelines import reasons
from pipelines.config import DataConfig, TextConfig
from pipelines.datasource import read_webdataset
from pipelines.source import _iter_stream, iter_tar_samples
from pipelines.tarheaders import ReadLimits
from tarutil import pax_records, raw_header, raw_long_name, raw_member, raw_pax, raw_tar, tar_bytes, write_tar


def samples_of(data: bytes):
    return list(_iter_stream(io.BytesIO(data), "mem://x.tar"))


@pytest.fixture(scope="module")
def other_tools(tmp_path_factory):
    """Shards written by GNU tar, gzip and webdataset's TarWriter (tests/other_tools.py)."""
    folder = tmp_path_factory.mktemp("other_tools")
    testgz, distinct = other_tools_mod.gz_members_tar(folder)
    return {"sample.tgz": other_tools_mod.png_cls_tgz(folder), "testgz.tar": testgz, "distinct": distinct,
            "compressed.tar": other_tools_mod.folder_members_tar(folder)}


def test_gnu_tar_gzip_shard_png_and_cls(other_tools):
    got = list(iter_tar_samples(str(other_tools["sample.tgz"])))
    assert len(got) == 90 and not [s for s in got if s.error]
    assert all(set(s.members) == {"png", "cls"} for s in got)
    assert got[0].members["png"].startswith(b"\x89PNG") and got[0].members["png"] == other_tools_mod.digit_png(0)
    assert len({s.key for s in got}) == 90 and got[10].key == "10" and got[10].members["cls"] == b"0"


def test_gzip_members_are_decompressed(other_tools):
    got = list(iter_tar_samples(str(other_tools["testgz.tar"])))
    assert len(got) == 120 and not [s for s in got if s.error]
    assert all(set(s.members) == {"txt"} for s in got)
    # what the member holds after gunzip, checked against an independent decode
    import tarfile
    with tarfile.open(other_tools["testgz.tar"]) as t:
        first = t.getmembers()[0]
        expected = gzip.decompress(t.extractfile(first).read())
    assert got[0].members["txt"] == expected and len(expected) > 10
    assert len({s.members["txt"] for s in got}) == other_tools["distinct"]


def test_members_in_a_folder_with_the_folders_own_entry(other_tools):
    got = list(iter_tar_samples(str(other_tools["compressed.tar"])))
    assert [s.key for s in got] == ["compressed/0001", "compressed/0002", "compressed/0003"]
    assert not [s for s in got if s.error]
    assert [s.members["txt"] for s in got] == [f"text number {i}, in a folder".encode() for i in (1, 2, 3)]


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_long_names_in_gnu_and_pax_headers(tmp_path, fmt):
    path, keys = other_tools_mod.long_names_tar(tmp_path, fmt)
    got = list(iter_tar_samples(str(path)))
    assert [s.key for s in got] == keys and all(len(k) > 100 for k in keys)
    assert not [s for s in got if s.error]
    assert [(s.members["txt"], s.members["cls"]) for s in got] == [(b"caption 0", b"0"), (b"caption 1", b"1")]


@pytest.mark.parametrize("gz", [True, False])
def test_webdatasets_own_writer(tmp_path, gz):
    path, keys = other_tools_mod.webdataset_shard(tmp_path, gz=gz)
    got = list(iter_tar_samples(str(path)))
    assert [s.key for s in got] == keys and not [s for s in got if s.error]
    assert all(set(s.members) == {"png", "txt", "cls"} for s in got)
    assert got[1].members["txt"] == b"a caption for sample 1" and got[1].members["cls"] == b"1"
    assert got[0].members["png"] == other_tools_mod.digit_png(100)


def test_extensions_are_case_insensitive_and_grouped():
    got = samples_of(tar_bytes([("a.JPG", b"1"), ("a.Txt", b"2"), ("b.jpg", b"3"), ("b.TXT", b"4")]))
    assert [(s.key, sorted(s.members)) for s in got] == [("a", ["jpg", "txt"]), ("b", ["jpg", "txt"])]


def test_multi_dot_extensions_follow_webdataset():
    got = samples_of(tar_bytes([("dir/k1.mel.npy", b"1"), ("dir/k1.json", b"2")]))
    assert got[0].key == "dir/k1" and set(got[0].members) == {"mel.npy", "json"}


@pytest.mark.parametrize("cut_fraction", [0.3, 0.5, 0.77, 0.999])
def test_truncated_tar_yields_complete_samples_then_records_damage(cut_fraction):
    import tarfile

    members = []
    for i in range(20):
        members += [(f"{i:04d}.txt", f"caption {i} ".encode() * 40), (f"{i:04d}.cls", b"%d" % i)]
    data = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        last = t.getmembers()[-1]
        data_end = last.offset_data + last.size  # beyond it lie only end blocks and padding
    cut = int(data_end * cut_fraction)
    got = samples_of(data[:cut])
    bad = [s for s in got if s.error]
    assert len(bad) == 1 and bad[0] is got[-1]
    assert bad[0].error.reason == reasons.TRUNCATED_SHARD
    good = got[:-1]
    assert [s.key for s in good] == [f"{i:04d}" for i in range(len(good))]
    assert all(s.members["txt"] == f"caption {int(s.key)} ".encode() * 40 for s in good)
    # every sample whose members all end before the cut was delivered
    assert len(good) >= int(20 * cut_fraction) - 2


def test_tar_cut_at_member_boundary_is_detected():
    data = tar_bytes([("a.txt", b"x" * 512), ("b.txt", b"y" * 512)])
    # headers of 512 + data 512 each: cut right after the first sample's data
    got = samples_of(data[:1024])
    assert got[-1].error.reason == reasons.TRUNCATED_SHARD


def test_garbage_header_mid_stream_is_damage_not_end():
    data = bytearray(tar_bytes([(f"{k}.txt", k.encode() * 100) for k in "abcd"]))
    data[2048:2048 + 512] = b"\x07" * 512  # clobber c's header
    got = samples_of(bytes(data))
    # b was still open when the damage came (more of its members could have followed),
    # so it is quarantined with the damage rather than passed on as complete
    assert [(s.key, s.error.reason if s.error else None) for s in got] == [
        ("a", None), ("b", reasons.TRUNCATED_SHARD)]


def test_unsafe_names_are_refused_and_recorded():
    got = samples_of(tar_bytes([
        ("ok.txt", b"fine"), ("../escape.txt", b"evil"), ("/abs/path.txt", b"evil"),
        ("a/../../b.txt", b"evil"), ("link.txt", None, "symlink"), ("ok2.txt", b"fine"),
    ]))
    refused = {s.key: s.error.reason for s in got if s.error}
    assert refused == {k: reasons.UNSAFE_MEMBER_NAME for k in
                       ["../escape.txt", "/abs/path.txt", "a/../../b.txt", "link.txt"]}
    assert [s.key for s in got if not s.error] == ["ok", "ok2"]
    assert all(not s.members for s in got if s.error)  # refused members are never read


def test_duplicate_keys_and_members():
    got = samples_of(tar_bytes([("a.txt", b"1"), ("b.txt", b"2"), ("a.txt", b"3"),
                                ("c.txt", b"4"), ("c.TXT", b"5")]))
    assert [(s.key, s.error.reason if s.error else None) for s in got] == [
        ("a", None), ("b", None), ("a", reasons.DUPLICATE_KEY), ("c", reasons.DUPLICATE_KEY)]
    assert got[0].members["txt"] == b"1"


def test_bad_gzip_member_and_member_without_extension():
    got = samples_of(tar_bytes([("a.txt.gz", b"not gzip"), ("README", b"hi"),
                                ("b.txt.gz", gzip.compress(b"real"))]))
    assert [(s.key, s.error.reason if s.error else None) for s in got] == [
        ("a", reasons.MEMBER_DECOMPRESS_ERROR), ("README", reasons.MEMBER_WITHOUT_EXTENSION), ("b", None)]
    assert got[2].members == {"txt": b"real"}


def test_member_too_large_is_refused_unread():
    limits = dataclasses.replace(ReadLimits.from_config(), member_bytes=1000)
    got = list(_iter_stream(io.BytesIO(tar_bytes([("a.bin", b"x" * 5000), ("b.txt", b"ok")])), "x", limits))
    assert got[0].error.reason == reasons.MEMBER_TOO_LARGE and not got[0].members
    assert got[1].members == {"txt": b"ok"}


def test_missing_shard_is_a_record_not_a_crash(tmp_path):
    got = list(iter_tar_samples(str(tmp_path / "gone.tar")))
    assert len(got) == 1 and got[0].error.reason == reasons.SHARD_UNREADABLE


def test_ray_datasource_rows(ray_cluster, tmp_path):
    write_tar(tmp_path / "a.tar", [("k1.JPG", b"img1"), ("k1.txt", b"cap1"), ("k1.cls", b"7"),
                                   ("k2.wav", b"aud2"), ("k2.json", b"{}"), ("../bad.txt", b"x")])
    write_tar(tmp_path / "b.tar.gz", [("k3.png", b"img3")], gz=True)
    ds = read_webdataset([str(tmp_path)])
    rows = sorted(ds.take_all(), key=lambda r: (r["source"], r["position"]))
    assert ds.schema().names[:5] == ["key", "source", "position", "image", "image_ext"]
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == {"k1", "k2", "k3", "../bad.txt"}
    assert by_key["k1"]["image"] == b"img1" and by_key["k1"]["image_ext"] == "jpg"
    assert by_key["k1"]["text"] == b"cap1" and by_key["k1"]["audio"] is None
    assert by_key["k1"]["extras"] == [{"ext": "cls", "data": b"7"}]
    assert by_key["k2"]["audio_ext"] == "wav" and by_key["k2"]["text_ext"] == "json"
    assert by_key["k3"]["source"].endswith("b.tar.gz")
    assert by_key["../bad.txt"]["error"] == reasons.UNSAFE_MEMBER_NAME
    clean = read_webdataset([str(tmp_path)], include_errors=False).take_all()
    assert {r["key"] for r in clean} == {"k1", "k2", "k3"}


def test_ray_datasource_reads_other_tools_shards(ray_cluster, other_tools):
    ds = read_webdataset([str(other_tools["sample.tgz"]), str(other_tools["compressed.tar"])])
    rows = ds.take_all()
    assert len(rows) == 93 and not [r for r in rows if r["error"]]
    assert sum(r["image_ext"] == "png" for r in rows) == 90


# ------------------------------------------------------------------ limits (README "Hostile input")

def limited(**kw) -> ReadLimits:
    return dataclasses.replace(ReadLimits.from_config(), **kw)


def read(data: bytes, **kw):
    return [(s.key, s.error.reason if s.error else None) for s in
            _iter_stream(io.BytesIO(data), "mem://x.tar", limited(**kw))]


def good(key: str) -> bytes:
    return raw_member(f"{key}.txt".encode(), f"a photo of {key}".encode())


def test_limits_come_from_the_data_config():
    cfg = DataConfig(max_member_bytes=5, max_sample_bytes=6, max_sample_members=7, max_name_bytes=8,
                     max_header_bytes=9, max_header_chain=10, text=TextConfig(max_bytes=11))
    assert ReadLimits.from_config(cfg) == ReadLimits(5, 6, 7, 8, 9, 10, 11)
    assert ReadLimits.from_config() == ReadLimits.from_config(DataConfig())


def test_sample_member_count_cap_keeps_few_names():
    members = [raw_member(f"m.{i}".encode(), b"x") for i in range(50)]
    got = list(_iter_stream(io.BytesIO(raw_tar(good("a"), *members, good("b"))), "x", limited(sample_members=10)))
    assert [(s.key, s.error.reason if s.error else None) for s in got] == [
        ("a", None), ("m", reasons.SAMPLE_TOO_LARGE), ("b", None)]
    assert len(got[1].names) == 11 and "data.max_sample_members" in got[1].error.detail
    assert read(raw_tar(*members[:10]), sample_members=10) == [("m", None)]


def test_sample_bytes_cap_counts_every_member_stored_or_inflated():
    parts = [raw_member(b"s.a", b"x" * 400), raw_member(b"s.b", b"y" * 400),
             raw_member(b"s.c.gz", gzip.compress(b"z" * 400))]
    assert read(raw_tar(*parts[:2], good("t")), sample_bytes=800) == [("s", None), ("t", None)]
    assert read(raw_tar(*parts, good("t")), sample_bytes=1000) == [("s", reasons.SAMPLE_TOO_LARGE), ("t", None)]
    assert read(raw_tar(*parts[1:], parts[0]), sample_bytes=799) == [("s", reasons.SAMPLE_TOO_LARGE)]


def test_member_cap_holds_for_inflated_members():
    bomb = gzip.compress(b"\0" * 100_000)
    got = read(raw_tar(raw_member(b"b.jpg.gz", bomb), good("c")), member_bytes=50_000)
    assert got == [("b", reasons.MEMBER_TOO_LARGE), ("c", None)]
    assert read(raw_tar(raw_member(b"b.jpg.gz", bomb)), member_bytes=100_000) == [("b", None)]


def test_text_cap_filters_stored_and_inflated_captions():
    for member in (raw_member(b"t.txt", b"w" * 2000), raw_member(b"t.json.gz", gzip.compress(b"w" * 2000))):
        got = list(_iter_stream(io.BytesIO(raw_tar(member, good("u"))), "x", limited(text_bytes=1000)))
        assert got[0].error.reason == reasons.CAPTION_TOO_LONG and got[0].error.kind == reasons.FILTER
        assert "data.text.max_bytes" in got[0].error.detail and got[1].error is None
    assert read(raw_tar(raw_member(b"t.txt", b"w" * 1000)), text_bytes=1000) == [("t", None)]


def _gzip_of_zeros(total: int, piece: int = 64 << 20) -> bytes:
    """gzip members in a row (one content for `gzip`) inflating to `total` zero bytes, made
    without holding `total` bytes."""
    one = gzip.compress(b"\0" * piece, compresslevel=9)
    return one * (total // piece)


def test_a_gzip_bomb_is_never_inflated_past_its_cap():
    bomb = _gzip_of_zeros(1536 << 20)  # ~1.5 MB inflating to 1.5 GB
    data = raw_tar(raw_member(b"b.txt.gz", bomb), raw_member(b"c.jpg.gz", bomb), good("d"))
    tracemalloc.start()
    try:
        got = read(data, member_bytes=8 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [("b", reasons.CAPTION_TOO_LONG), ("c", reasons.MEMBER_TOO_LARGE), ("d", None)]
    assert peak < (8 << 20) + 2 * len(data) + (4 << 20), peak  # the cap, the input, and a few pieces


def test_long_names_and_pax_names_are_checked_like_any_name():
    long_ok = b"d/" + b"n" * 300 + b".txt"
    got = read(raw_tar(raw_long_name(long_ok), raw_member(long_ok[:99], b"a caption"), good("z")))
    assert got == [(long_ok[:-4].decode(), None), ("z", None)]
    too_long = b"n" * 1100 + b".txt"
    got = list(_iter_stream(io.BytesIO(raw_tar(raw_long_name(too_long), raw_member(b"x.txt", b"c"), good("z"))), "x"))
    assert got[0].error.reason == reasons.UNSAFE_MEMBER_NAME and "data.max_name_bytes" in got[0].error.detail
    assert len(got[0].key) < 300 and got[1].key == "z"
    got = list(_iter_stream(io.BytesIO(raw_tar(raw_pax(pax_records({b"path": b"k\xff\x01.txt"})),
                                               raw_member(b"p.txt", b"c"), good("z"))), "x"))
    assert got[0].error.reason == reasons.UNSAFE_MEMBER_NAME and got[0].key == "k\\xff\\x01.txt"
    assert got[0].error.detail.isprintable() and got[1].key == "z"


@pytest.mark.parametrize("name", [b"k\xff.jpg", b"k\x1b[2J.txt", b"k\nx.txt", b"k\x7f.txt", "k\u2028.txt".encode()])
def test_names_not_utf8_or_with_control_characters_are_refused_printably(name):
    got = list(_iter_stream(io.BytesIO(raw_tar(good("a"), raw_member(name, b"data"), good("b"))), "x"))
    assert [s.error.reason if s.error else None for s in got] == [None, reasons.UNSAFE_MEMBER_NAME, None]
    bad = got[1]
    assert bad.key.isprintable() and bad.error.detail.isprintable() and bad.names == [bad.key]
    bad.key.encode("utf-8")  # storable in parquet


def test_extended_headers_are_capped_in_size_before_they_are_read():
    big = 10 ** 10  # no 10 GB is read: the header is refused from its size field
    for hostile in (raw_long_name(b"x.txt", size=big), raw_pax(pax_records({b"path": b"y.txt"}), size=big),
                    raw_header(b"././@LongLink", 0, b"K", size_field=b"\x80" + b"\xff" * 11)):
        got = list(_iter_stream(io.BytesIO(raw_tar(good("a"), good("b"), hostile, good("c"))), "x"))
        assert [(s.key, s.error.reason if s.error else None) for s in got] == [
            ("a", None), ("b", reasons.TAR_HEADER_TOO_LARGE)]
        assert "data.max_header_bytes" in got[1].error.detail
    pax_2k = raw_pax(pax_records({b"comment": b"c" * 2000}))
    assert read(raw_tar(pax_2k, good("a")), header_bytes=2100) == [("a", None)]
    assert read(raw_tar(good("z"), pax_2k, good("a")), header_bytes=1000) == [("z", reasons.TAR_HEADER_TOO_LARGE)]


def test_a_chain_of_400_long_name_headers_is_damage_not_a_recursion_error():
    chain = [raw_long_name(b"x" * 200 + b".txt") for _ in range(400)]
    got = list(_iter_stream(io.BytesIO(raw_tar(good("a"), good("b"), *chain, good("c"))), "x"))
    assert [(s.key, s.error.reason if s.error else None) for s in got] == [
        ("a", None), ("b", reasons.TAR_HEADER_TOO_LARGE)]
    assert "data.max_header_chain" in got[1].error.detail
    assert read(raw_tar(*chain[:3], good("c")), header_chain=3) == [("x" * 200, None)]  # the last name wins
    assert read(raw_tar(*chain[:4], good("c")), header_chain=3)[0][1] == reasons.TAR_HEADER_TOO_LARGE


def test_global_pax_headers_are_capped_in_total():
    globals_ = [raw_pax(pax_records({b"comment%d" % i: b"g" * 500}), b"g") for i in range(8)]
    sep = [x for g in globals_ for x in (g, good(f"k{len(g)}{g[600:602].hex()}"))]
    got = read(raw_tar(*sep), header_bytes=2000)
    assert got[-1][1] == reasons.TAR_HEADER_TOO_LARGE and all(r is None for _, r in got[:-1])


def test_malformed_pax_records_are_damage():
    for records in (b"2 " * 20_000 + b"=\n",        # 3.11's regex would keep ~400 MB of keywords
                    b"99 path=a.txt\n",               # a length beyond the header
                    b"9" * 5000 + b" path=a\n",       # int() of 5000 digits raises ValueError
                    b"12 path a.txt\n"):              # no "="
        got = read(raw_tar(good("a"), good("b"), raw_pax(records), raw_member(b"p.txt", b"x"), good("c")))
        assert got == [("a", None), ("b", reasons.TRUNCATED_SHARD)], records[:20]


@pytest.mark.parametrize("header, why, complete", [
    (raw_header(b"n.txt", size_field=b"\xff" * 12), "negative size", ["a"]),
    (raw_header(b"n.txt", size_field=b"zzzzzzzzzzz\0"), "InvalidHeaderError", ["a"]),
    (raw_header(b"n.txt", 3, checksum=b"0000000\0"), "bad checksum", ["a"]),
    # 2**88 bytes: refused unread, then the skip over it finds the end of the data
    (raw_header(b"n.txt", size_field=b"\x80" + b"\xff" * 11), "unexpected end of data", ["a", "b"]),
    (raw_pax(pax_records({b"size": b"-5"})) + raw_header(b"n.txt", 0), "negative size", ["a"]),
    (b"\0" * 1024, "after the end-of-archive block", ["a"]),
])
def test_bad_header_fields_are_damage_with_a_reason(header, why, complete):
    got = list(_iter_stream(io.BytesIO(raw_tar(good("a"), good("b"), header, good("c"))), "x"))
    assert [s.key for s in got if not s.error] == complete  # the sample still open at the damage is not
    assert got[-1].error.reason == reasons.TRUNCATED_SHARD and why in got[-1].error.detail


def test_devices_fifos_hard_links_and_sparse_files_are_refused_unread():
    kinds = [raw_header(b"d.txt", 0, t, linkname=b"a.txt") for t in (b"1", b"3", b"4", b"6", b"S", b"Z")]
    got = read(raw_tar(good("a"), *kinds, good("b")))
    assert got == [("a", None)] + [("d.txt", reasons.UNSAFE_MEMBER_NAME)] * 6 + [("b", None)]


def test_gzip_shards_hold_the_same_limits():
    inner = raw_tar(good("a"), raw_member(b"b.txt.gz", _gzip_of_zeros(256 << 20)), raw_member(b"k\xff.txt", b"x"),
                    good("c"), raw_long_name(b"x.txt", size=5 << 30), good("d"))
    got = read(gzip.compress(inner))
    assert got == [("a", None), ("b", reasons.CAPTION_TOO_LONG), ("k\\xff.txt", reasons.UNSAFE_MEMBER_NAME),
                   ("c", reasons.TAR_HEADER_TOO_LARGE)]


def test_other_compressions_are_refused_not_inflated():
    import bz2
    import lzma

    for packed in (bz2.compress(raw_tar(good("a"))), lzma.compress(raw_tar(good("a")))):
        got = list(_iter_stream(io.BytesIO(packed), "x"))
        assert len(got) == 1 and got[0].error.reason == reasons.SHARD_UNREADABLE


def test_a_store_error_mid_shard_is_raised_not_recorded_as_damage():
    data = raw_tar(good("a"), good("b"), good("c"))

    class Flaky(io.RawIOBase):
        pos = 0

        def readable(self):
            return True

        def readinto(self, b):
            if self.pos >= 1024:
                raise PermissionError("403 Forbidden")
            n = min(len(b), 1024 - self.pos)
            b[:n] = data[self.pos:self.pos + n]
            self.pos += n
            return n

    with pytest.raises(PermissionError, match="403"):
        list(_iter_stream(Flaky(), "s3://b/x.tar"))


def test_unread_member_data_is_skipped_and_the_next_samples_come_out():
    got = read(raw_tar(raw_member(b"a.jpg", b"j" * 5000), raw_member(b"a.txt", b"t" * 3000), good("b")), member_bytes=4000)
    assert got == [("a", reasons.MEMBER_TOO_LARGE), ("b", None)]


def _gzip_with_name(body: bytes, name: bytes) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = deflate.compress(body) + deflate.flush()
    return b"\x1f\x8b\x08\x08\0\0\0\0\x00\x03" + name + b"\0" + data + struct.pack("<II", zlib.crc32(body), len(body))


def test_a_gzip_shard_header_with_a_megabyte_file_name_is_refused():
    # tarfile reads that name a byte per call, copying its buffer each time: minutes of CPU
    tar = raw_tar(good("a"))
    assert read(_gzip_with_name(tar, b"shard.tar")) == [("a", None)]
    got = list(_iter_stream(io.BytesIO(_gzip_with_name(tar, b"n" * (1 << 20))), "x"))
    assert [(s.key, s.error.reason) for s in got] == [("", reasons.TAR_HEADER_TOO_LARGE)]


@pytest.mark.parametrize("member", [
    gzip.compress(b"one ") + b"\0" * 600 + gzip.compress(b"two"),   # streams in a row, zero padding
    b"", _gzip_with_name(b"named", b"n" * 100_000),                   # empty; a long header name
    gzip.compress(b"x")[:-1], gzip.compress(b"x") + b"junk", b"\0" + gzip.compress(b"x"),
])
def test_gzip_members_inflate_as_gzip_decompress_does(member):
    try:
        expected = gzip.decompress(member)
    except (OSError, EOFError, zlib.error):
        expected = None
    got = list(_iter_stream(io.BytesIO(raw_tar(raw_member(b"k.txt.gz", member))), "x"))[0]
    if expected is None:
        assert got.error.reason == reasons.MEMBER_DECOMPRESS_ERROR
    else:
        assert got.error is None and got.members == {"txt": expected}
