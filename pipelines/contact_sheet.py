"""The contact sheet of `inspect OUT --sheet FILE.png`: one PNG, a grid of tiles, for people who
would rather look than read. First N kept samples, spread evenly over those of the manifest
that have an image (each its stored image and caption), then the quarantined samples that still have a viewable image,
each framed in red and labelled with its reason.

Where the pictures come from: a kept sample's from its output shard (its key, from the
manifest); a quarantined sample keeps no bytes in the output, only its `source` shard and
`position` there (`dataset.QUARANTINE_SCHEMA`), so its image is read from the source shard,
where preprocessing found it. Both reads go through `source.iter_tar_samples` under the
output's own read limits, and images are decoded by `images.decode_image` under its pixel
limit (`data.image.max_pixels`): a hostile shard or image can make the sheet hold no more
than preprocessing held. A quarantined sample whose image member does not decode (or whose
source shard is gone) is not on the sheet; it is counted.

The PNG is written whole or not at all (`storage.OutputStore.open_atomic`: a temporary and a
rename), at the path the user names and nowhere else.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
from contextlib import closing
from dataclasses import dataclass
from typing import Callable

import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from . import images
from .config import IMAGE_EXTS, TEXT_EXTS, DataConfig, ImageConfig
from .dataset import OUT_IMAGE, OUT_TEXT, QUARANTINE_FILE, PreprocessedDataset
from .errors import ConfigError, UserError
from .reasons import DUPLICATE, SampleError
from .retry import read_parquet_retrying
from .source import RawSample, base_plus_ext, gzip_member_ext, iter_tar_samples, split_modalities
from .storage import OutputStore, filesystem, is_local, join
from .tarheaders import ReadLimits

TILE_PX = 160            # a tile's picture is TILE_PX x TILE_PX (the stored crop, scaled)
MAX_KEPT = 1024          # kept samples on one sheet: 128 rows of 8, a ~30,000 px tall PNG
MAX_QUARANTINED = 64     # quarantined samples tried per sheet, taken in turn from each reason
MAX_COLUMNS = 8
PAD = 6
CAPTION_LINES = 3
CAPTION_BYTES = 600      # of a caption member shown: the tile has room for ~100 characters
BACKGROUND, INK, GREY, RED = (255, 255, 255), (20, 20, 20), (110, 110, 110), (200, 30, 30)


@dataclass
class Tile:
    image: Image.Image
    key: str
    caption: str
    reason: str | None = None  # None: a kept sample
    source: str = ""


def contact_sheet(out: str, path: str, n: int = 16, storage_options: dict | None = None, *,
                  tile_px: int = TILE_PX, max_quarantined: int = MAX_QUARANTINED) -> dict:
    """Draw the sheet of the output at `out` into `path` (local, or a URL with the options);
    returns what is on it and its geometry: tile i sits at origin + (i % columns, i // columns) x cell."""
    if not 0 <= n <= MAX_KEPT:
        raise UserError(f"--n must be between 0 and {MAX_KEPT} (a sheet is one image in memory), got {n}")
    dataset = PreprocessedDataset.open(out, storage_options)
    store, name, where = sheet_target(path, storage_options)
    try:
        cfg = DataConfig.from_dict(dataset.settings)
    except ConfigError:  # settings of another version: the default limits, which bound the reads as well
        cfg = DataConfig()
    limits = ReadLimits.from_config(cfg)
    display = ImageConfig(size=tile_px, min_size=0, max_pixels=cfg.image.max_pixels)
    kept_jobs, with_image = _kept_reads(dataset, n)
    chosen, counts = _quarantined_candidates(dataset, max_quarantined)
    quarantined_jobs = _quarantined_reads(chosen)
    progress = _progress(len(kept_jobs) + len(quarantined_jobs))
    kept = _read_tiles(kept_jobs, storage_options, limits, display, (OUT_IMAGE,), (OUT_TEXT,), progress)
    quarantined = _read_tiles(quarantined_jobs, storage_options, limits, display, IMAGE_EXTS, TEXT_EXTS, progress)
    quarantined.sort(key=lambda t: t.reason)  # grouped by reason (stable: by source and position within)
    if progress is not None:
        progress.close()
    tiles = kept + quarantined
    sheet, geometry = draw_sheet(tiles, tile_px, [
        f"{dataset.url}",
        f"{len(kept)} of {with_image} kept sample(s) with an image, evenly spaced; "
        f"{len(quarantined)} quarantined with a viewable image (red: the reason)"])
    save_png(sheet, store, name)
    return {"path": where, "tiles": len(tiles), "kept": len(kept), "kept_with_image": with_image,
            "kept_not_viewable": sum(len(r.wanted) for r in kept_jobs) - len(kept), "quarantined": len(quarantined),
            "quarantined_not_viewable": len(chosen) - len(quarantined),
            "quarantined_without_image": counts["without_image"],
            "quarantined_over_limit": counts["over_limit"], "quarantined_limit": max_quarantined,
            "labels": [{"key": t.key, "source": t.source, "reason": t.reason} for t in quarantined],
            **geometry}


# --- which samples, read from where --------------------------------------------------------

# one shard's reads: shard URL, what to look for (a key, or a position and the key expected
# there), and how each found sample is labelled (a reason, or None for a kept sample)
@dataclass
class ShardRead:
    url: str
    by_position: bool
    wanted: dict  # key or position -> (expected key, reason | None)


def _kept_reads(dataset: PreprocessedDataset, n: int) -> tuple[list[ShardRead], int]:
    """Reads of `n` kept samples with an image, evenly spaced over the manifest's order; and
    how many kept samples have an image."""
    manifest = dataset.manifest(["key", "output_shard", "image_width"])
    manifest = manifest.filter(pc.is_valid(manifest["image_width"]))  # the manifest records an image's size
    rows, k = manifest.num_rows, min(n, manifest.num_rows)
    reads: dict[str, ShardRead] = {}
    keys, shards = manifest["key"].to_pylist(), manifest["output_shard"].to_pylist()
    for i in sorted({i * rows // k for i in range(k)}):
        url = join(dataset.url, shards[i])
        reads.setdefault(url, ShardRead(url, False, {})).wanted[keys[i]] = (keys[i], None)
    return list(reads.values()), rows


def _is_image_member(name: str) -> bool:
    _, ext = base_plus_ext(name)
    return ext is not None and gzip_member_ext(ext.lower())[0] in IMAGE_EXTS


def _quarantined_candidates(dataset: PreprocessedDataset, limit: int) -> tuple[list[dict], dict]:
    """The quarantine rows worth reading (a sample, not a whole shard, with an image member
    listed, or a duplicate, which lists none), at most `limit`, taken in turn from each reason
    so that every reason shows."""
    table = read_parquet_retrying(dataset.fs, join(dataset.path, QUARANTINE_FILE),
                                  columns=["key", "source", "position", "reason", "kind", "members"])
    by_reason: dict[str, list[dict]] = {}
    without_image = 0
    for row in table.to_pylist():
        if row["key"] and (row["kind"] == DUPLICATE or any(map(_is_image_member, row["members"] or []))):
            by_reason.setdefault(row["reason"], []).append(row)
        else:
            without_image += 1
    chosen: list[dict] = []
    queues = [list(rows) for _, rows in sorted(by_reason.items())]
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    candidates = sum(len(rows) for rows in by_reason.values())
    return chosen, {"without_image": without_image, "over_limit": candidates - len(chosen)}


def _quarantined_reads(chosen: list[dict]) -> list[ShardRead]:
    reads: dict[str, ShardRead] = {}
    for row in sorted(chosen, key=lambda r: (r["reason"], r["source"], r["position"])):
        reads.setdefault(row["source"], ShardRead(row["source"], True, {})).wanted[row["position"]] = (
            row["key"], row["reason"])
    return list(reads.values())


def _progress(total: int):
    if not sys.stderr.isatty() or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc="contact sheet", dynamic_ncols=True, leave=False)


def _read_tiles(reads: list[ShardRead], storage_options: dict | None, limits: ReadLimits, display: ImageConfig,
                image_exts: tuple[str, ...], text_exts: tuple[str, ...], progress) -> list[Tile]:
    """The tiles of the wanted samples that have an image that decodes, in the order asked."""
    def tile_of(raw: RawSample, reason: str | None) -> Tile | None:
        image = thumbnail(raw.members, image_exts, display)
        return None if image is None else Tile(image, raw.key, caption(raw.members, text_exts), reason, raw.source)

    found: dict[tuple[str, object], Tile] = {}
    for read in reads:
        for ident, tile in _scan(read, storage_options, limits, tile_of):
            found[(read.url, ident)] = tile
        if progress is not None:
            progress.update(1)
    return [found[(r.url, ident)] for r in reads for ident in r.wanted if (r.url, ident) in found]


def _scan(read: ShardRead, storage_options: dict | None, limits: ReadLimits,
          tile_of: Callable[[RawSample, str | None], Tile | None]):
    """(key or position, tile) of the wanted samples of one shard, read once, up to the last wanted."""
    left = dict(read.wanted)
    with closing(iter_tar_samples(read.url, storage_options=storage_options, limits=limits)) as samples:
        for raw in samples:
            ident = raw.position if read.by_position else raw.key
            if ident in left:
                key, reason = left.pop(ident)
                tile = tile_of(raw, reason) if raw.key == key else None
                if tile is not None:
                    yield ident, tile
            if not left:
                return


def thumbnail(members: dict[str, bytes], exts: tuple[str, ...], display: ImageConfig) -> Image.Image | None:
    """The sample's image as a display-size square, decoded as preprocessing decodes (its
    pixel limit included), or None if it has none that decodes."""
    chosen, _ = split_modalities(members, {"image": exts})
    if "image" not in chosen:
        return None
    ext, data = chosen["image"]
    try:
        pixels, _ = images.decode_image(data, ext, display)
    except SampleError:
        return None
    return Image.fromarray(pixels)


def caption(members: dict[str, bytes], exts: tuple[str, ...]) -> str:
    """The caption as shown: the text member's first bytes, leniently (a caption quarantined
    for being too short, too long or not UTF-8 is still shown as it is)."""
    chosen, _ = split_modalities(members, {"text": exts})
    if "text" not in chosen:
        return ""
    ext, data = chosen["text"]
    text = None
    if ext == "json":  # the member is bounded by data.text.max_bytes: parsing it whole is cheap
        try:
            obj = json.loads(data.decode("utf-8"))
            text = next((obj[k] for k in ("caption", "text") if isinstance(obj.get(k), str)), None) \
                if isinstance(obj, dict) else None
        except (ValueError, RecursionError):
            text = None
    if text is None:
        text = data[:CAPTION_BYTES].decode("utf-8", errors="replace")
    return " ".join(text[:CAPTION_BYTES].split())


# --- drawing -------------------------------------------------------------------------------

def draw_sheet(tiles: list[Tile], tile_px: int, header: list[str]) -> tuple[Image.Image, dict]:
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox("Ag|")
    line = bottom - min(0, top) + 3
    cell = (tile_px + 2 * PAD, PAD + tile_px + 4 + (1 + CAPTION_LINES) * line + PAD)
    origin = (0, PAD + len(header) * line + PAD)
    columns = min(MAX_COLUMNS, max(1, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    width = max(columns, 3) * cell[0]
    sheet = Image.new("RGB", (width, origin[1] + max(rows, 1) * cell[1]), BACKGROUND)  # one row for "nothing"
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(header):
        draw.text((PAD, PAD + i * line), ellipsize(font, text, width - 2 * PAD), fill=INK, font=font)
    if not tiles:
        draw.text((PAD, origin[1] + PAD), "nothing to show: no kept sample and no viewable quarantined one",
                  fill=GREY, font=font)
    for i, tile in enumerate(tiles):
        x = origin[0] + (i % columns) * cell[0]
        y = origin[1] + (i // columns) * cell[1]
        _draw_tile(draw, sheet, tile, (x, y), cell, tile_px, font, line)
    return sheet, {"columns": columns, "rows": rows, "tile_px": tile_px, "cell": list(cell),
                   "origin": list(origin), "size": list(sheet.size), "pad": PAD}


def _draw_tile(draw: ImageDraw.ImageDraw, sheet: Image.Image, tile: Tile, at: tuple[int, int],
               cell: tuple[int, int], tile_px: int, font, line: int) -> None:
    x, y = at
    sheet.paste(tile.image.resize((tile_px, tile_px)) if tile.image.size != (tile_px, tile_px) else tile.image,
                (x + PAD, y + PAD))
    text_width = tile_px
    if tile.reason is not None:
        draw.rectangle((x + 1, y + 1, x + cell[0] - 2, y + cell[1] - 2), outline=RED, width=2)
        draw.rectangle((x + PAD, y + PAD, x + PAD + tile_px - 1, y + PAD + line + 1), fill=RED)
        draw.text((x + PAD + 3, y + PAD + 1), ellipsize(font, tile.reason, tile_px - 6), fill=BACKGROUND, font=font)
    ty = y + PAD + tile_px + 4
    draw.text((x + PAD, ty), ellipsize(font, tile.key, text_width), fill=GREY, font=font)
    for j, text in enumerate(wrap(font, tile.caption, text_width, CAPTION_LINES)):
        draw.text((x + PAD, ty + (j + 1) * line), text, fill=INK, font=font)


def _longest_fit(font, text: str, width: float, suffix: str = "") -> int:
    """The most characters of `text` that fit in `width` followed by `suffix` (binary search)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid] + suffix) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def ellipsize(font, text: str, width: float) -> str:
    if font.getlength(text) <= width:
        return text
    return text[:_longest_fit(font, text, width, "...")].rstrip() + "..."


def wrap(font, text: str, width: float, lines: int) -> list[str]:
    """`text` in at most `lines` lines of `width`, broken at spaces (inside a word too long for
    a line), the last line cut with "..." when text is left over."""
    words, out, current, i = text.split(), [], "", 0
    while i < len(words) and len(out) < lines:
        trial = f"{current} {words[i]}" if current else words[i]
        if font.getlength(trial) <= width:
            current, i = trial, i + 1
        elif current:
            out.append(current)
            current = ""
        else:  # one word wider than the line
            cut = max(1, _longest_fit(font, words[i], width))
            out.append(words[i][:cut])
            words[i] = words[i][cut:]
    rest = " ".join(words[i:])
    if len(out) < lines:
        if current:
            out.append(current)
    elif current or rest:
        out[-1] = ellipsize(font, " ".join(filter(None, (out[-1], current, rest))), width)
        if not out[-1].endswith("..."):
            out[-1] = out[-1][:_longest_fit(font, out[-1], width, "...")] + "..."
    return out


def sheet_target(path: str, storage_options: dict | None) -> tuple[OutputStore, str, str]:
    """Where the PNG goes: (its folder as a store, its name there, the path as reported).
    Checked before any shard is read: a wrong path is said at once."""
    local = is_local(path)
    _, where = filesystem(path, None if local else storage_options)
    if not local:
        folder, name = path.rstrip("/").rsplit("/", 1)
        return OutputStore(folder, storage_options), name, path
    where = os.path.abspath(os.path.expanduser(where))
    if os.path.isdir(where):
        raise UserError(f"--sheet {path} is a folder; name the PNG file to write")
    folder, name = os.path.split(where)
    if not os.path.isdir(folder):
        raise UserError(f"--sheet {path}: the folder {folder} does not exist")
    return OutputStore(folder), name, where


def save_png(sheet: Image.Image, store: OutputStore, name: str) -> None:
    """Write the PNG whole or not at all (a temporary and a rename, or one upload)."""
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    store.write_bytes(name, buf.getvalue())
