"""The tar reader and the Ray Data datasource, on real tars: ours and other tools'."""
import gzip
import io

import pytest

from conftest import REALDATA
from pipelines import reasons
from pipelines.datasource import read_webdataset
from pipelines.source import _iter_stream, iter_tar_samples
from tarutil import tar_bytes, write_tar


def samples_of(data: bytes):
    return list(_iter_stream(io.BytesIO(data), "mem://x.tar", 1 << 30))


def test_realdata_gzip_shard_png_and_cls():
    got = list(iter_tar_samples(str(REALDATA / "sample.tgz")))
    assert len(got) == 90 and not [s for s in got if s.error]
    assert all(set(s.members) == {"png", "cls"} for s in got)
    assert got[0].members["png"].startswith(b"\x89PNG")
    assert len({s.key for s in got}) == 90


def test_realdata_gzip_members_are_decompressed():
    got = list(iter_tar_samples(str(REALDATA / "testgz.tar")))
    assert len(got) == 1000 and not [s for s in got if s.error]
    assert all(set(s.members) == {"txt"} for s in got)
    # what the member holds after gunzip, checked against an independent decode
    import tarfile
    with tarfile.open(REALDATA / "testgz.tar") as t:
        first = t.getmembers()[0]
        expected = gzip.decompress(t.extractfile(first).read())
    assert got[0].members["txt"] == expected and len(expected) > 10


def test_realdata_members_in_a_folder():
    got = list(iter_tar_samples(str(REALDATA / "compressed.tar")))
    assert [s.key for s in got] == ["compressed/0001", "compressed/0002", "compressed/0003"]
    assert not [s for s in got if s.error]
    assert all(s.members["txt"] for s in got)


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
    got = list(_iter_stream(io.BytesIO(tar_bytes([("a.bin", b"x" * 5000), ("b.txt", b"ok")])), "x", 1000))
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


def test_ray_datasource_reads_realdata(ray_cluster):
    ds = read_webdataset([str(REALDATA / "sample.tgz"), str(REALDATA / "compressed.tar")])
    rows = ds.take_all()
    assert len(rows) == 93 and not [r for r in rows if r["error"]]
    assert sum(r["image_ext"] == "png" for r in rows) == 90
