"""Hostile input at the decoders, end to end: crafted members in real tars beside good samples,
through the real `preprocess` job on the real Ray cluster (one run over all shards). Every
hostile sample ends where it should (quarantined with its reason, or written when it is odd but
valid), every good neighbour comes out, the job returns normally. Also the per-sample
catch-all (`internal_error`) of a shard task, and bad rows in training ingest."""
from __future__ import annotations

import io
import json
import logging
import os
import struct
import tarfile
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from pipelines import ingest, reasons as R
from pipelines.config import AudioConfig, DataConfig
from pipelines.datasource import sample_schema
from pipelines.images import decode_image
from pipelines.preprocess import preprocess
from pipelines.shard_job import process_shard
from pipelines.storage import OutputStore
from mediautil import png_by_hand, wav_edited
from tarutil import write_tar

WRITTEN = "written"


# ---------------------------------------------------------------- media made in code

def _wav(wave: np.ndarray, sr: int, subtype: str = "PCM_16", *, rate: int | None = None,
         data_size: int | None = None) -> bytes:
    """WAV bytes, optionally with the header's sample rate or data size edited afterwards."""
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype=subtype)
    return wav_edited(buf.getvalue(), rate=rate, data_size=data_size)


def _encoded(wave: np.ndarray, sr: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt)
    return buf.getvalue()


def _tone(sr: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _ramp(h: int, w: int) -> np.ndarray:
    return np.add.outer(np.arange(h) * 150 // h, np.arange(w) * 100 // w).astype(np.uint8)


def _webp_claiming(w: int, h: int) -> bytes:
    """A small lossy WebP whose VP8 frame header claims w x h."""
    b = bytearray(_saved(Image.new("RGB", (64, 64), (10, 120, 200)), "WEBP", quality=80))
    i = b.find(b"VP8 ") + 8
    b[i + 6:i + 10] = struct.pack("<HH", w, h)
    return bytes(b)


def _jpeg_with_broken_exif() -> bytes:
    jpeg = _saved(Image.fromarray(np.dstack([_ramp(300, 400)] * 3)), "JPEG", quality=90)
    # a TIFF header whose first IFD lies far past the end of the block
    body = b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0" + b"\x00\x07garbage"
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def _flac_of_unknown_length() -> bytes:
    b = bytearray(_encoded(_tone(16000, 0.5), 16000, "FLAC"))
    field = int.from_bytes(b[18:26], "big") & ~((1 << 36) - 1)  # STREAMINFO total samples: 0 = unknown
    b[18:26] = field.to_bytes(8, "big")
    return bytes(b)


def _descending_marks(n_bytes: int) -> str:
    marks = sorted((c for c in map(chr, range(0x300, 0x370)) if unicodedata.combining(c)),
                   key=unicodedata.combining, reverse=True)
    return ("a" + "".join(m * 700 for m in marks))[: n_bytes // 2]


def _good(i: int) -> dict[str, bytes]:
    rng = np.random.default_rng(100 + i)
    img = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    return {"jpg": _saved(img, "JPEG", quality=90), "txt": f"good sample number {i}".encode(),
            "wav": _wav(_tone(16000, 0.5, 300.0 + 40 * i), 16000)}


def _hostile_cases() -> dict[str, list[tuple[str, dict[str, bytes], tuple[str, str]]]]:
    """shard -> [(key, members, (reason, kind) or (WRITTEN, "")), ...]"""
    nan = _tone(16000, 0.2)
    nan[50] = np.nan
    quiet = np.zeros(800, np.float32)
    grey8 = _ramp(800, 1200)
    low = np.random.default_rng(1).integers(0, 256, grey8.shape, dtype=np.uint16)
    rgb8 = np.dstack([grey8, 255 - grey8, grey8 // 2])
    err, filt = R.ERROR, R.FILTER
    return {
        "audio": [
            ("a-255ch", {"wav": _wav(np.zeros((1600, 255), np.float32), 16000)}, (R.AUDIO_UNSUPPORTED, err)),
            ("a-384khz", {"wav": _wav(np.zeros(4000, np.float32), 384_000)}, (R.AUDIO_UNSUPPORTED, err)),
            ("a-rate-2g", {"wav": _wav(quiet, 16000, rate=2**31 - 1)}, (R.AUDIO_UNSUPPORTED, err)),
            ("a-rate-0", {"wav": _wav(quiet, 16000, rate=0)}, (R.AUDIO_DECODE_ERROR, err)),
            ("a-unknown-length", {"flac": _flac_of_unknown_length()}, (R.AUDIO_UNSUPPORTED, err)),
            ("a-flac-garbage", {"flac": _encoded(_tone(16000, 1.0), 16000, "FLAC")[:100]
                                + np.random.default_rng(2).bytes(5000)}, (R.AUDIO_DECODE_ERROR, err)),
            ("a-ogg-garbage", {"ogg": _encoded(_tone(16000, 1.0), 16000, "OGG")[:200] + bytes(1000)},
             (R.AUDIO_DECODE_ERROR, err)),
            ("a-nan", {"wav": _wav(nan, 16000, "FLOAT")}, (R.AUDIO_DECODE_ERROR, err)),
            ("a-under-reported", {"wav": _wav(_tone(16000, 3.0), 16000, data_size=3200)}, (WRITTEN, "")),
            ("a-192khz-stereo", {"wav": _wav(np.stack([_tone(192_000, 0.5)] * 2, 1), 192_000)}, (WRITTEN, "")),
        ],
        "image": [
            ("i-over-cap", {"png": png_by_hand(8000, 8000, 2, 8)}, (R.IMAGE_TOO_LARGE, err)),
            ("i-pillow-bomb", {"png": png_by_hand(20000, 20000, 2, 8)}, (R.IMAGE_TOO_LARGE, err)),
            ("i-png-lying", {"png": png_by_hand(4000, 4000, 2, 8, rows=10)}, (R.IMAGE_DECODE_ERROR, err)),
            ("i-webp-lying", {"webp": _webp_claiming(4000, 4000)}, (R.IMAGE_DECODE_ERROR, err)),
            ("i-webp-over-cap", {"webp": _webp_claiming(8000, 8000)}, (R.IMAGE_TOO_LARGE, err)),
            ("i-png16-grey", {"png": png_by_hand(1200, 800, 0, 16, ((grey8.astype(np.uint16) << 8) | low).astype(">u2"))},
             (WRITTEN, "")),
            ("i-png16-rgb", {"png": png_by_hand(1200, 800, 2, 16, (rgb8.astype(np.uint16) << 8).astype(">u2"))},
             (WRITTEN, "")),
            ("i-palette-alpha", {"png": _saved(Image.new("P", (300, 200), 3), "PNG", transparency=3)},
             (WRITTEN, "")),
            ("i-grey-alpha", {"png": _saved(Image.new("LA", (300, 200), (0, 128)), "PNG")}, (WRITTEN, "")),
            ("i-cmyk", {"jpg": _saved(Image.new("CMYK", (300, 200), (0, 255, 255, 0)), "JPEG")}, (WRITTEN, "")),
            ("i-1bit", {"png": _saved(Image.fromarray(grey8 > 100), "PNG")}, (WRITTEN, "")),
            ("i-broken-exif", {"jpg": _jpeg_with_broken_exif()}, (WRITTEN, "")),
        ],
        "text": [
            ("t-2mb-combining", {"txt": ("a" + "\u0301" * (1 << 20)).encode()}, (R.CAPTION_TOO_LONG, filt)),
            ("t-nfc-quadratic", {"txt": _descending_marks(64000).encode()}, (R.CAPTION_TOO_LONG, filt)),
            ("t-json-100k-deep", {"json": b"[" * 100_000 + b"]" * 100_000}, (R.CAPTION_TOO_LONG, filt)),
            ("t-json-30k-deep", {"json": b'{"caption": ' + b"[" * 30000 + b"]" * 30000 + b"}"},
             (R.TEXT_BAD_JSON, err)),
            ("t-surrogate-txt", {"txt": b"a lone \xed\xa0\x80 surrogate"}, (R.TEXT_NOT_UTF8, err)),
            ("t-surrogate-json", {"json": b'{"caption": "a lone \\ud800 surrogate"}'}, (R.TEXT_BAD_JSON, err)),
        ],
    }


def _write_shard(path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    return write_tar(path, [(f"{key}.{ext}", data) for key, members in samples for ext, data in members.items()])


# ---------------------------------------------------------------- the preprocess job

@pytest.fixture(scope="module")
def hostile_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "in").mkdir()
    cases = _hostile_cases()
    good: list[str] = []
    for s, (shard, hostile) in enumerate(sorted(cases.items())):
        samples = []
        for i, (key, members, _) in enumerate(hostile):  # a good neighbour before every hostile sample
            good.append(f"good-{shard}-{i}")
            samples += [(good[-1], _good(100 * s + i)), (key, members)]
        _write_shard(root / "in" / f"{shard}.tar", samples)
    before = set(os.listdir(root))
    stats = preprocess([str(root / "in")], str(root / "out"), progress=False)
    assert set(os.listdir(root)) == before | {"out"}  # nothing written beside the output
    expected = {key: want for hostile in cases.values() for key, _, want in hostile}
    return root / "out", stats, expected, good


def test_every_hostile_sample_ends_where_it_should(hostile_run):
    out, stats, expected, good = hostile_run
    assert len(expected) >= 25
    quarantine = {r["key"]: r for r in pq.read_table(out / "_quarantine.parquet").to_pylist()}
    written = set(pq.read_table(out / "_manifest.parquet")["key"].to_pylist())
    for key, (reason, kind) in expected.items():
        if reason == WRITTEN:
            assert key in written and key not in quarantine, (key, quarantine.get(key))
        else:
            assert key in quarantine, key
            assert (quarantine[key]["reason"], quarantine[key]["kind"]) == (reason, kind), quarantine[key]
            assert quarantine[key]["detail"] and "\n" not in quarantine[key]["detail"]
    assert set(good) <= written  # every good neighbour came out
    assert set(quarantine) == {k for k, (r, _) in expected.items() if r != WRITTEN}
    assert stats["read"] == len(written) + len(quarantine) == len(expected) + len(good)


def test_odd_images_come_out_as_their_8bit_selves(hostile_run):
    out, _, _, _ = hostile_run
    with tarfile.open(out / "shard-000001.tar") as t:  # the sorted shards: audio, image, text
        jpgs = {m.name[:-4]: t.extractfile(m).read() for m in t if m.name.endswith(".jpg")}
    grey8 = _ramp(800, 1200)
    for key, eight in (("i-png16-grey", grey8), ("i-png16-rgb", np.dstack([grey8, 255 - grey8, grey8 // 2]))):
        want, _ = decode_image(_saved(Image.fromarray(eight), "PNG"), "png", DataConfig().image)
        got = np.asarray(Image.open(io.BytesIO(jpgs[key])).convert("RGB")).astype(int)
        assert np.abs(got - want).mean() < 1.5, key  # only the JPEG re-encoding differs
    cmyk = np.asarray(Image.open(io.BytesIO(jpgs["i-cmyk"])).convert("RGB")).reshape(-1, 3).mean(0)
    assert np.abs(cmyk - (255, 0, 0)).max() < 8
    la = np.asarray(Image.open(io.BytesIO(jpgs["i-grey-alpha"])).convert("RGB"))
    assert np.abs(la.astype(int) - 127).max() <= 3  # half-transparent black on white


# ---------------------------------------------------------------- the per-sample catch-all

def _audio_shard(path) -> str:
    samples = [("k0", _good(0)), ("k1", {"wav": _wav(_tone(16000, 0.5), 16000)}),
               ("k2", {"jpg": _good(2)["jpg"], "txt": b"an image and a caption"}),
               ("k3", {"flac": _encoded(_tone(16000, 0.5, 500.0), 16000, "FLAC")}),
               ("k4", {"txt": b"only a caption here"})]
    return _write_shard(path, samples)


@pytest.fixture()
def records():
    """`records(logger_name, level)`: a list that receives that logger's records from then on.
    Our own handler, not pytest's caplog: the test command runs with `-p no:logging`."""
    attached = []

    def attach(name: str, level: int) -> list[logging.LogRecord]:
        got: list[logging.LogRecord] = []
        handler = logging.Handler(level)
        handler.emit = got.append
        logger = logging.getLogger(name)
        attached.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(level)
        return got

    yield attach
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)


# Configurations under which our own code raises something that is not a SampleError on every
# sample with audio (real paths, no mocks): log_mel refuses a window longer than the FFT
# (ValueError), and fit_length's buffer of 1e13 s at 16 kHz (568 PiB) is a MemoryError on any
# 64-bit machine, whatever its overcommit setting.
UNEXPECTED = {
    "ValueError": AudioConfig(n_fft=256),
    "MemoryError": AudioConfig(seconds=1e13),  # numpy's _ArrayMemoryError, named MemoryError
}


@pytest.mark.parametrize("error", sorted(UNEXPECTED))
def test_an_unexpected_exception_quarantines_only_its_sample(tmp_path, records, error):
    shard = _audio_shard(tmp_path / "in.tar")
    store = OutputStore(str(tmp_path / "out"))
    store.makedirs("_parts")
    logged = records("pipelines.shard_job", logging.ERROR)
    stats = process_shard(shard, "shard-000000.tar", store, DataConfig(audio=UNEXPECTED[error]))

    q = pq.read_table(tmp_path / "out" / "_parts" / "shard-000000.quarantine.parquet").to_pylist()
    assert {r["key"] for r in q} == {"k0", "k1", "k3"}  # the samples with audio
    assert all(r["reason"] == R.INTERNAL_ERROR and r["kind"] == R.ERROR for r in q)
    assert all(r["detail"].startswith(f"{error}: ") and "\n" not in r["detail"] for r in q)
    counts = stats["counts"]
    assert (counts["read"], counts["written"], counts[f"{R.ERROR}:{R.INTERNAL_ERROR}"]) == (5, 2, 3)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as t:
        assert sorted({m.name.split(".")[0] for m in t}) == ["k2", "k4"]
    # one traceback per exception type in this shard, then a count of the rest
    tracebacks = [r for r in logged if r.exc_info]
    assert len(tracebacks) == 1 and type(tracebacks[0].exc_info[1]).__name__ == error
    assert any("2 more sample(s)" in r.getMessage() for r in logged)


def test_internal_errors_never_end_the_preprocess_job(ray_cluster, tmp_path):
    _audio_shard(tmp_path / "a.tar")
    write_tar(tmp_path / "b.tar", [("z.txt", b"a caption without audio")])
    stats = preprocess([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], str(tmp_path / "out"),
                       cfg=DataConfig(audio=UNEXPECTED["ValueError"]), progress=False)
    assert stats["quarantined"] == {R.INTERNAL_ERROR: 3} and stats["written"] == 3


# ---------------------------------------------------------------- training ingest

def _preprocessed_members(i: int, *, mel: bytes | None = None, meta: bytes | None = None) -> dict[str, bytes]:
    buf = io.BytesIO()
    np.save(buf, np.zeros((80, 1001), np.float16), allow_pickle=False)
    return {"jpg": _good(i)["jpg"], "txt": f"caption {i}".encode(),
            "mel.npy": buf.getvalue() if mel is None else mel,
            "json": json.dumps({"mel_frames": 1001}).encode() if meta is None else meta}


# id -> why the row is bad; None: a good row
BAD_ROWS = {"p0": None, "p1": "mel.npy that is not an array", "p2": None, "p3": "metadata that is not JSON",
            "p4": "mel.npy that is not an array", "p5": "a JPEG that is not one", "p6": None}


def _bad_row(key: str, why: str | None) -> dict[str, bytes]:
    i = int(key[1:])
    if why == "mel.npy that is not an array":
        return _preprocessed_members(i, mel=b"\x93NUMPY garbage")
    if why == "metadata that is not JSON":
        return _preprocessed_members(i, meta=b"{not json")
    if why == "a JPEG that is not one":
        return {**_preprocessed_members(i), "jpg": b"\xff\xd8 not a jpeg"}
    return _preprocessed_members(i)


def test_bad_rows_in_ingest_are_dropped_counted_and_logged(records):
    schema = sample_schema(ingest.PREPROCESSED_COLUMNS)
    rows = []
    for key, why in BAD_ROWS.items():
        members = _bad_row(key, why)
        rows.append({"key": key, "source": "s.tar", "position": 0, "extras": [],
                     **{m: members.get(ext[0]) if ext else None for m, ext in ingest.PREPROCESSED_COLUMNS.items()},
                     **{f"{m}_ext": ext[0] if ext else None for m, ext in ingest.PREPROCESSED_COLUMNS.items()}})
    ingest.internal_errors.clear()
    logged = records("pipelines.ingest", logging.WARNING)
    out = ingest.decode_batch(pa.Table.from_pylist(rows, schema=schema), DataConfig())
    assert list(out["key"]) == [k for k, why in BAD_ROWS.items() if why is None]
    assert len(out["image"]) == len(out["mel"]) == 3
    assert dict(ingest.internal_errors) == {"ValueError": 2, "JSONDecodeError": 1}  # the JPEG is a SampleError
    tracebacks = [r for r in logged if r.exc_info]
    assert sorted(type(r.exc_info[1]).__name__ for r in tracebacks) == ["JSONDecodeError", "ValueError"]
    skipped = [r.getMessage() for r in logged if r.getMessage().startswith("skipping sample")]
    assert len(skipped) == 4 and all("\n" not in m for m in skipped)


def test_ingest_reads_past_bad_rows(ray_cluster, tmp_path):
    shard = _write_shard(tmp_path / "shard-000000.tar", [(k, _bad_row(k, why)) for k, why in BAD_ROWS.items()])
    ds = ingest.build_dataset([shard], DataConfig(), seed=0, preprocessed=True)
    assert sorted(r["key"] for r in ds.iter_rows()) == [k for k, why in BAD_ROWS.items() if why is None]
