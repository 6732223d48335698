"""`inspect OUT`: the report and the contact sheet, on a real preprocessed output (a corpus with
planted defects, preprocessed on the session's Ray cluster)."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import ROOT, cli
from pipelines import reasons
from pipelines.config import IMAGE_EXTS, ImageConfig
from pipelines.contact_sheet import BACKGROUND, RED, thumbnail
from pipelines.corpus import make_corpus
from pipelines.errors import UserError
from pipelines.inspect_output import contact_sheet, format_inspection, inspect_output
from pipelines.preprocess import preprocess

# planted defects whose image is whole: their quarantined samples must be on the sheet
VIEWABLE = {reasons.CAPTION_TOO_SHORT, reasons.CAPTION_TOO_LONG, reasons.IMAGE_TOO_SMALL, reasons.AUDIO_TOO_LONG,
            reasons.TEXT_NOT_UTF8, reasons.TEXT_BAD_JSON, reasons.AUDIO_EMPTY, reasons.AUDIO_DECODE_ERROR,
            reasons.DUPLICATE_CONTENT}


@pytest.fixture(scope="module")
def output(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    make_corpus(str(root / "raw"), 40, 3, seed=5, defects=True)
    preprocess([str(root / "raw")], str(root / "clean"), progress=False)
    return root / "clean"


def files_in(folder):
    return sorted((os.path.relpath(os.path.join(d, n), folder), os.path.getsize(os.path.join(d, n)))
                  for d, _, names in os.walk(folder) for n in names)


def test_the_counts_are_the_output_s_own(output):
    stats = json.loads((output / "_stats.json").read_text())
    manifest = pq.read_table(output / "_manifest.parquet").to_pylist()
    quarantine = pq.read_table(output / "_quarantine.parquet").to_pylist()
    report = inspect_output(str(output))
    c = report["counts"]
    assert c["kept"] == stats["written"] == len(manifest) > 0
    for kind, name, theirs in ((reasons.ERROR, "quarantined", sum(stats["quarantined"].values())),
                               (reasons.FILTER, "filtered", sum(stats["filtered"].values())),
                               (reasons.DUPLICATE, "duplicates", stats["duplicates"])):
        assert c[name] == theirs == sum(1 for r in quarantine if r["kind"] == kind) > 0, name
    assert (c["read"], c["shards"]) == (stats["read"], stats["shards"]) == (c["read"], 4)
    assert sum(r["count"] for r in report["reasons"]) == len(quarantine)
    chars = [r["text_chars"] for r in manifest if r["text_chars"] is not None]
    d = report["distributions"]["text_chars"]
    assert (d["count"], d["min"], d["max"]) == (len(chars), min(chars), max(chars))
    assert d["min"] <= d["p5"] <= d["p50"] <= d["p95"] <= d["max"]
    assert d["p50"] == pytest.approx(float(np.median(chars)))
    per_shard = report["distributions"]["samples_per_shard"]
    assert per_shard["count"] == 4 and per_shard["min"] * 4 <= len(manifest) <= per_shard["max"] * 4
    assert report["distributions"]["shard_bytes"]["count"] == 4


def test_every_reason_is_listed_with_examples_that_are_really_quarantined_so(output):
    quarantine = pq.read_table(output / "_quarantine.parquet").to_pylist()
    report = inspect_output(str(output), examples=2)
    listed = {(r["kind"], r["reason"]): r for r in report["reasons"]}
    assert set(listed) == {(q["kind"], q["reason"]) for q in quarantine}
    rows = {(q["key"], q["source"], q["position"]): q["reason"] for q in quarantine}
    for (kind, reason), entry in listed.items():
        assert entry["count"] == sum(1 for q in quarantine if q["reason"] == reason and q["kind"] == kind)
        assert len(entry["examples"]) == min(2, entry["count"])
        for e in entry["examples"]:
            assert rows[(e["key"], e["source"], e["position"])] == reason
            assert os.path.exists(e["source"])  # the source shard, where the sample came from
    text = format_inspection(report)
    for reason in {q["reason"] for q in quarantine}:
        assert reason in text
    assert "bad-corrupt_jpeg" in text


def test_the_cli_prints_json_and_reads_nothing_into_the_output(output):
    before = files_in(output)
    r = cli("inspect", output, "--json", "--examples", "1")
    report = json.loads(r.stdout)
    assert report["counts"] == inspect_output(str(output))["counts"]
    assert all(len(e["examples"]) == 1 for e in report["reasons"])
    assert "caption length" in cli("inspect", output).stdout
    assert files_in(output) == before


def test_the_contact_sheet_has_a_tile_for_each_sample_shown(output, tmp_path):
    quarantine = pq.read_table(output / "_quarantine.parquet").to_pylist()
    kept = sum(1 for w in pq.read_table(output / "_manifest.parquet")["image_width"].to_pylist() if w is not None)
    before = files_in(output)
    target = tmp_path / "sheets" / "sheet.png"
    target.parent.mkdir()
    r = cli("inspect", output, "--sheet", target, "--n", 6, "--json")
    sheet = json.loads(r.stdout)["sheet"]
    assert files_in(output) == before  # nothing written into OUT
    assert os.listdir(target.parent) == ["sheet.png"]  # and no temporary left beside the sheet
    shown = {label["reason"] for label in sheet["labels"]}
    assert VIEWABLE <= shown and reasons.IMAGE_DECODE_ERROR not in shown
    assert sheet["quarantined_not_viewable"] >= 2  # the corrupt JPEG and the random PNG
    assert sheet["quarantined"] + sheet["quarantined_not_viewable"] + sheet["quarantined_without_image"] \
        + sheet["quarantined_over_limit"] == len(quarantine)
    assert (sheet["kept"], sheet["kept_with_image"], sheet["kept_not_viewable"]) == (6, kept, 0)
    assert sheet["tiles"] == min(6, kept) + sheet["quarantined"]
    assert sheet["tiles"] == count_tiles(Image.open(target), sheet)


def count_tiles(image, g):
    """Tiles on the decoded sheet: cells whose picture is not blank; blank cells come only after
    the last tile, and a quarantined tile (after the kept ones) has the red frame."""
    pixels = np.asarray(image.convert("RGB"))
    assert list(image.size) == g["size"] and g["columns"] * g["rows"] >= g["tiles"]
    (cw, ch), (ox, oy), pad, px = g["cell"], g["origin"], g["pad"], g["tile_px"]
    drawn = []
    for i in range(g["columns"] * g["rows"]):
        x, y = ox + (i % g["columns"]) * cw, oy + (i // g["columns"]) * ch
        picture = pixels[y + pad + px // 4: y + pad + px, x + pad: x + pad + px]  # under the label band
        drawn.append(bool((picture != BACKGROUND).any()) and picture.std() > 5)
        if i < g["tiles"]:
            assert tuple(pixels[y + 1, x + 1]) == (RED if i >= g["kept"] else BACKGROUND), i
    assert drawn == sorted(drawn, reverse=True)  # no blank cell before a drawn one
    return sum(drawn)


def test_more_kept_asked_than_there_are_shows_them_all(output, tmp_path):
    modalities = pq.read_table(output / "_manifest.parquet")["modalities"].to_pylist()
    kept = sum(1 for m in modalities if "image" in m.split(","))
    assert 0 < kept < len(modalities)  # kept samples without an image are not on the sheet
    sheet = contact_sheet(str(output), str(tmp_path / "all.png"), n=kept + 50)
    assert sheet["kept"] == kept and sheet["tiles"] == count_tiles(Image.open(tmp_path / "all.png"), sheet)
    none = contact_sheet(str(output), str(tmp_path / "none.png"), n=0, max_quarantined=3)
    tried = sheet["quarantined"] + sheet["quarantined_not_viewable"] + sheet["quarantined_over_limit"]
    assert none["kept"] == 0 and none["quarantined"] + none["quarantined_not_viewable"] == 3
    assert none["quarantined_over_limit"] == tried - 3 and none["tiles"] == none["quarantined"]
    assert len(set(label["reason"] for label in none["labels"])) == none["quarantined"]  # one per reason first


def test_an_image_over_the_pixel_limit_is_not_decoded_for_the_sheet():
    buf = io.BytesIO()
    Image.new("L", (2000, 1000), 128).save(buf, format="PNG")  # small file, 2 megapixels
    members = {"png": buf.getvalue()}
    limit = ImageConfig(size=64, min_size=0, max_pixels=1_000_000)
    assert thumbnail(members, IMAGE_EXTS, limit) is None
    assert thumbnail(members, IMAGE_EXTS, ImageConfig(size=64, min_size=0)).size == (64, 64)


def test_what_is_not_an_output_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "raw").mkdir()
    make_corpus(str(tmp_path / "raw"), 2, 1, seed=0)
    with pytest.raises(UserError, match="not a preprocessed output"):
        inspect_output(str(tmp_path / "raw"))
    for folder in (tmp_path / "raw", tmp_path / "missing"):
        r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "inspect", str(folder), "--sheet",
                            str(tmp_path / "x.png")], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert ("does not exist" if folder.name == "missing" else "not a preprocessed output") in r.stderr
    assert not (tmp_path / "x.png").exists()
