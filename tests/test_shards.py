import pytest

from pipelines.shards import ShardListError, expand_shards
from tarutil import write_tar


@pytest.fixture()
def shard_dir(tmp_path):
    for i in range(4):
        write_tar(tmp_path / f"shard-{i:06d}.tar", [(f"{i}.txt", b"hello")])
    write_tar(tmp_path / "extra.tar.gz", [("x.txt", b"hi")], gz=True)
    write_tar(tmp_path / "old.TGZ", [("y.txt", b"hi")], gz=True)
    (tmp_path / "_manifest.parquet").write_bytes(b"not a shard")
    (tmp_path / "notes.txt").write_text("not a shard")
    (tmp_path / "sub").mkdir()
    write_tar(tmp_path / "sub" / "deep.tar", [("z.txt", b"hi")])
    return tmp_path


def test_folder_lists_every_shard_recursively_and_nothing_else(shard_dir):
    got = expand_shards([str(shard_dir)])
    names = [p.rsplit("/", 1)[-1] for p in got]
    assert names == sorted(names, key=lambda n: got[names.index(n)])
    assert set(names) == {f"shard-{i:06d}.tar" for i in range(4)} | {"extra.tar.gz", "old.TGZ", "deep.tar"}


def test_brace_pattern_glob_and_file(shard_dir):
    braces = expand_shards([f"{shard_dir}/shard-{{000001..000003}}.tar"])
    assert [p.rsplit("/", 1)[-1] for p in braces] == ["shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    glob = expand_shards([f"{shard_dir}/shard-*.tar", f"{shard_dir}/extra.tar.gz"])
    assert len(glob) == 5
    # repeats collapse, order is sorted
    assert expand_shards([str(shard_dir / "extra.tar.gz")] * 2) == [str(shard_dir / "extra.tar.gz")]


def test_file_url_gives_same_ids_as_paths(shard_dir):
    assert expand_shards([f"file://{shard_dir}/shard-000000.tar"]) == [str(shard_dir / "shard-000000.tar")]


@pytest.mark.parametrize("bad, words", [
    ("/nonexistent/shard.tar", "no such shard"),
    ("{root}/shard-{{000007..000008}}.tar", "no such shard"),
    ("{root}/zzz-*.tar", "matches no shard"),
    ("{root}/notes.txt", "is not a shard"),
    ("", "empty string"),
])
def test_bad_inputs_say_what_is_wrong(shard_dir, bad, words):
    with pytest.raises(ShardListError, match=words):
        expand_shards([bad.format(root=shard_dir)])


def test_empty_folder(tmp_path):
    with pytest.raises(ShardListError, match="holds no shard"):
        expand_shards([str(tmp_path)])


def test_http_urls_pass_through_unlisted():
    urls = expand_shards(["https://example.invalid/data/shard-{0..2}.tar"])
    assert urls == [f"https://example.invalid/data/shard-{i}.tar" for i in range(3)]


def test_s3_listing(s3_bucket, s3_server, tmp_path):
    bucket, fs = s3_bucket
    for i in range(3):
        local = write_tar(tmp_path / f"s{i}.tar", [(f"{i}.txt", b"x")])
        fs.put_file(local, f"{bucket}/corpus/shard-{i:06d}.tar")
    fs.pipe_file(f"{bucket}/corpus/_stats.json", b"{}")
    opts = s3_server["storage_options"]
    got = expand_shards([f"s3://{bucket}/corpus"], opts)
    assert got == [f"s3://{bucket}/corpus/shard-{i:06d}.tar" for i in range(3)]
    assert expand_shards([f"s3://{bucket}/corpus/shard-{{000000..000001}}.tar"], opts) == got[:2]
    assert expand_shards([f"s3://{bucket}/corpus/*.tar"], opts) == got
