"""Seeded fuzzing of real shards: byte flips, truncations, insertions, deletions and tar header
field edits (size, type, name, link, checksum) of shards written by `make_corpus` and by
`tarfile` (pax and GNU long names, gzip members, a .tar.gz).

Mutation i is a pure function of (FUZZ_SEED, i): a failure prints both, and
`mutated(seed, i)` rebuilds that shard alone. FUZZ_SEED (environment) picks another seed.
At least MIN_MUTATIONS run; more while under SOFT_SECONDS (no assert depends on timing).
"""
import gzip
import io
import os
import random
import tarfile
import time

import pyarrow.parquet as pq
import pytest

from pipelines.config import DataConfig
from pipelines.corpus import make_corpus
from pipelines.shard_job import part_names, process_shard
from pipelines.source import base_plus_ext, iter_tar_samples
from pipelines.storage import OutputStore
from pipelines.tarheaders import ReadLimits

SEED = int(os.environ.get("FUZZ_SEED", "1101"))
MIN_MUTATIONS, MAX_MUTATIONS, SOFT_SECONDS = 300, 2000, 25
CFG = DataConfig(max_member_bytes=1 << 20, max_sample_bytes=2 << 20)
BLOCK = 512
NASTY_NAMES = [b"../x.txt", b"/abs.txt", b"k\xff.jpg", b"a\x1b[2J.txt", b"", b"noext", b"a/../../b.txt",
               b"dir//x.txt", b"x.txt.gz", b"x.pyd", b"./x.txt", b"a" * 99 + b"."]
SIZE_FIELDS = [b"00000000000\0", b"77777777777\0", b"\x80" + b"\xff" * 11, b"\xff" * 12, b"zzzzzzzzzzz\0",
               b"\x80" + b"\0" * 7 + b"\x7f\xff\xff\xff", b"           \0"]
TYPES = b"0125673SLKxgZ\0V"


def _tar(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _handmade(fmt: int) -> bytes:
    long = "d/" + "long-key-" * 14
    return _tar([("a.txt", b"a red circle on white"), ("a.cls", b"3"),
                 ("b.json", b'{"caption": "a blue square", "n": 1}'),
                 ("c.txt.gz", gzip.compress(b"a green triangle", mtime=0)), ("c.json", b"{}"),
                 (long + ".txt", "a yellow star, 黄色".encode()), (long + ".cls", b"1"),
                 ("e/f.txt", b"a purple line")], fmt)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_bases")
    make_corpus(str(folder), 2, 1, seed=11)
    pax = _handmade(tarfile.PAX_FORMAT)
    return [("corpus.tar", (folder / "shard-000000.tar").read_bytes()), ("pax.tar", pax),
            ("gnu.tar", _handmade(tarfile.GNU_FORMAT)), ("pax.tar.gz", gzip.compress(pax, mtime=0))]


def _headers(tar: bytes) -> list[int]:
    """Offsets of the header blocks of a well-formed tar, extended headers included."""
    found = set()
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t.getmembers():
            found.update({m.offset, m.offset_data - BLOCK})
    return sorted(found)


def _checksum(h: bytearray) -> None:
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)


def _edit_header(rng: random.Random, data: bytes, headers: list[int]) -> tuple[bytes, str]:
    at = rng.choice(headers)
    h = bytearray(data[at:at + BLOCK])
    field = rng.choice(["size", "type", "name", "link", "checksum", "magic", "prefix"])
    if field == "size":
        value = rng.choice(SIZE_FIELDS + [b"%011o\0" % rng.randrange(1 << 20)])
        h[124:136] = value
    elif field == "type":
        value = bytes([rng.choice(TYPES)])
        h[156:157] = value
    elif field == "name":
        value = rng.choice(NASTY_NAMES + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))])
        h[0:100] = value[:100].ljust(100, b"\0")
    elif field == "link":
        value = rng.choice([b"../../etc/passwd", b"a.txt", b"\xff" * 20])
        h[157:257] = value.ljust(100, b"\0")
    elif field == "checksum":
        value = bytes(rng.randrange(256) for _ in range(8))
        h[148:156] = value
    elif field == "magic":
        value = rng.choice([b"ustar  \0", b"\0" * 8, b"xxxxxxxx"])
        h[257:265] = value
    else:
        value = rng.choice([b"../..", b"/", b"\xff\xfe"])
        h[345:500] = value.ljust(155, b"\0")
    if field != "checksum" and rng.random() < 0.85:  # mostly valid checksums, so the edit is parsed
        _checksum(h)
    return data[:at] + bytes(h) + data[at + BLOCK:], f"header@{at}.{field}={bytes(value)[:24]!r}"


def _mutate_once(rng: random.Random, data: bytes, headers: list[int]) -> tuple[bytes, str]:
    op = rng.choice(["flip", "flip", "truncate", "insert", "delete", "duplicate", "header", "header", "header"])
    n = len(data)
    if op == "header" and headers:
        return _edit_header(rng, data, headers)
    if op == "truncate":
        cut = rng.randrange(n)
        return data[:cut], f"truncate@{cut}"
    if op == "insert":
        at = rng.randrange(n)
        what = rng.choice([b"\0" * BLOCK, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 700))),
                           data[headers[0]:headers[0] + BLOCK] if headers else b"x"])
        return data[:at] + what + data[at:], f"insert@{at}+{len(what)}"
    if op == "delete":
        at = rng.randrange(n)
        k = rng.choice([1, 7, BLOCK, rng.randrange(1, 4096)])
        return data[:at] + data[at + k:], f"delete@{at}-{k}"
    if op == "duplicate":
        at, k = rng.randrange(n), rng.choice([BLOCK, 2 * BLOCK, rng.randrange(1, 3000)])
        return data[:at + k] + data[at:at + k] + data[at + k:], f"duplicate@{at}-{k}"
    flips = []
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(n)
        out[at] ^= rng.randrange(1, 256)
        flips.append(at)
    return bytes(out), f"flip@{flips}"


def mutated(bases, seed: int, i: int) -> tuple[str, bytes, str]:
    """(suffix, shard bytes, description) of mutation i under `seed`."""
    rng = random.Random(f"{seed}:{i}")
    name, data = rng.choice(bases)
    gz = name.endswith(".gz")
    structural = not gz or rng.random() < 0.7  # a .tar.gz: edit the tar inside, or the gzip bytes
    if gz and structural:
        data = gzip.decompress(data)
    headers = _headers(data) if structural else []
    steps = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not data:
            break
        data, what = _mutate_once(rng, data, headers)
        steps.append(what)
    if gz and structural:
        data = gzip.compress(data, mtime=0)
    return (".tar.gz" if gz else ".tar"), data, f"{name}: {' then '.join(steps)}"


def _mutations(bases, tmp_path):
    """(i, path, description) for at least MIN_MUTATIONS, more while time allows."""
    start, i = time.monotonic(), 0
    while i < MIN_MUTATIONS or (i < MAX_MUTATIONS and time.monotonic() - start < SOFT_SECONDS):
        suffix, data, what = mutated(bases, SEED, i)
        path = tmp_path / f"m{i}{suffix}"
        path.write_bytes(data)
        yield i, str(path), what
        path.unlink()
        i += 1


def _where(i: int, what: str) -> str:
    return f"FUZZ_SEED={SEED} mutation {i} ({what}); rebuild it with mutated(bases, {SEED}, {i})"


def test_the_reader_survives_every_mutation(bases, tmp_path):
    """What the reader guarantees by itself: no exception, one record per position, every
    key and detail storable and printable."""
    limits, done = ReadLimits.from_config(CFG), 0
    for i, path, what in _mutations(bases, tmp_path):
        try:
            records = list(iter_tar_samples(path, limits=limits))
        except Exception as e:
            raise AssertionError(f"{type(e).__name__}: {e} -- {_where(i, what)}") from e
        assert [r.position for r in records] == list(range(len(records))), _where(i, what)
        for r in records:
            r.key.encode("utf-8")  # a lone surrogate here would fail the parquet write
            assert "\n" not in r.key and (r.error is None or "\n" not in r.error.detail), _where(i, what)
        done += 1
    print(f"{done} mutations under FUZZ_SEED={SEED}")
    assert done >= MIN_MUTATIONS


def test_every_sample_read_is_written_or_quarantined_exactly_once(bases, tmp_path):
    """The whole shard task on each mutation. NOTE: a decoder that raises something other
    than SampleError on mutated member bytes is contained by the per-sample catch-all of
    `process_shard` (reason internal_error); this test relies on it for member bytes the
    fuzzer damages, the reader's own part is `test_the_reader_survives_every_mutation`."""
    store = OutputStore(str(tmp_path / "out"))
    store.makedirs()
    done = 0
    (tmp_path / "in").mkdir()
    for i, path, what in _mutations(bases, tmp_path / "in"):
        name = f"shard-{i:06d}.tar"
        try:
            stats = process_shard(path, name, store, CFG)
        except Exception as e:
            raise AssertionError(f"{type(e).__name__}: {e} -- {_where(i, what)}") from e
        parts = part_names(name)
        written = pq.read_table(store.path(parts["manifest"])).to_pylist()
        refused = pq.read_table(store.path(parts["quarantine"])).to_pylist()
        positions = sorted(r["position"] for r in written + refused)
        assert positions == list(range(stats["counts"]["read"])), _where(i, what)
        assert len(written) == stats["counts"].get("written", 0), _where(i, what)
        with tarfile.open(store.path(name)) as t:  # the output is a whole tar of the written samples
            keys = {base_plus_ext(m.name)[0] for m in t.getmembers()}
        assert keys == {r["key"] for r in written}, _where(i, what)
        done += 1
    print(f"{done} mutations under FUZZ_SEED={SEED}")
    assert done >= MIN_MUTATIONS
