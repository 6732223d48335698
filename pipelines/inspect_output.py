"""`inspect OUT`: what a preprocessed output holds, for a person: its counts, why samples were
left out (each reason with a few example keys and the shard they came from), and how sizes
and lengths are distributed, all from the output's own files (`dataset.py`'s manifest,
quarantine table and `_stats.json`); no shard is read. The contact sheet, which does read
shards, is `contact_sheet.py`'s.

Torch-free, Ray-free: this runs on a laptop against a folder or a bucket.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from . import reasons
from .contact_sheet import contact_sheet
from .dataset import QUARANTINE_FILE, PreprocessedDataset
from .errors import UserError
from .retry import read_parquet_retrying
from .storage import files_below, join

__all__ = ["contact_sheet", "format_inspection", "inspect_output"]

# the manifest's size and length columns, and how the report names them
MANIFEST_MEASURES = {
    "image_width": "image width (px, original)",
    "image_height": "image height (px, original)",
    "text_chars": "caption length (characters)",
    "audio_seconds": "audio duration (s, original)",
}
PERCENTILES = (5, 50, 95)
KINDS = (reasons.ERROR, reasons.FILTER, reasons.DUPLICATE)


def distribution(values) -> dict:
    """count, min, p5, p50, p95, max of the values (None for each but count when there are none)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"count": 0, "min": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    pct = np.percentile(arr, PERCENTILES)
    out = {"count": int(arr.size), "min": arr.min(), **{f"p{p}": v for p, v in zip(PERCENTILES, pct)},
           "max": arr.max()}
    return {k: (v if k == "count" else _plain(v)) for k, v in out.items()}


def _plain(v: float) -> float | int:
    return int(v) if float(v).is_integer() else round(float(v), 3)


def quarantine_table(dataset: PreprocessedDataset) -> pa.Table:
    return read_parquet_retrying(dataset.fs, join(dataset.path, QUARANTINE_FILE),
                                 columns=["key", "source", "position", "reason", "kind", "detail"])


def reason_table(quarantine: pa.Table, examples: int) -> list[dict]:
    """One entry per (kind, reason), most frequent first, with up to `examples` example samples
    (key, source shard, position in it, detail) in the order the quarantine table lists them."""
    by_reason: dict[tuple[str, str], dict] = {}
    for row in quarantine.to_pylist():
        entry = by_reason.setdefault((row["kind"], row["reason"]), {
            "kind": row["kind"], "reason": row["reason"], "count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < examples:
            entry["examples"].append({k: row[k] for k in ("key", "source", "position", "detail")})
    kind_order = {k: i for i, k in enumerate(KINDS)}
    return sorted(by_reason.values(), key=lambda e: (kind_order.get(e["kind"], len(KINDS)), -e["count"], e["reason"]))


def _shard_sizes(dataset: PreprocessedDataset) -> list[int]:
    """Bytes of each output shard (the top-level .tar files), from one listing."""
    return [size for name, size in files_below(dataset.fs, dataset.path).items()
            if "/" not in name and name.endswith(".tar")]


def inspect_output(out: str, storage_options: dict | None = None, examples: int = 3) -> dict:
    """The report on the preprocessed output at `out` (UserError if it is not one)."""
    if examples < 0:
        raise UserError(f"--examples must be at least 0, got {examples}")
    dataset = PreprocessedDataset.open(out, storage_options)
    stats = dataset.stats
    manifest = dataset.manifest([*MANIFEST_MEASURES, "output_shard", "modalities"])
    quarantine = quarantine_table(dataset)
    by_kind = dict.fromkeys(KINDS, 0)
    for kind in quarantine["kind"].to_pylist():
        by_kind[kind] = by_kind.get(kind, 0) + 1
    per_shard = dataset.shard_counts()
    shard_bytes = _shard_sizes(dataset)
    columns = {name: manifest[name].to_pylist() for name in MANIFEST_MEASURES}
    pixels = [w * h if w is not None and h is not None else None
              for w, h in zip(columns["image_width"], columns["image_height"])]
    shards = stats.get("shards", len(shard_bytes))
    distributions = {
        **{name: distribution(values) for name, values in columns.items()},
        "image_megapixels": distribution(None if p is None else p / 1e6 for p in pixels),
        # shards that kept nothing count as 0
        "samples_per_shard": distribution([*per_shard.values(), *[0] * max(0, shards - len(per_shard))]),
        "shard_bytes": distribution(shard_bytes),
    }
    modalities: dict[str, int] = {}
    for m in manifest["modalities"].to_pylist():
        modalities[m] = modalities.get(m, 0) + 1
    return {
        "output": dataset.url,
        "counts": {
            "read": stats.get("read"),
            "kept": manifest.num_rows,
            "quarantined": by_kind[reasons.ERROR],
            "filtered": by_kind[reasons.FILTER],
            "duplicates": by_kind[reasons.DUPLICATE],
            "shards": shards,
            "shards_with_samples": len(per_shard),
            "crashed_shards": stats.get("crashed_shards", 0),
        },
        "bytes": {"in": stats.get("bytes_in"), "out": stats.get("bytes_out")},
        "modalities": dict(sorted(modalities.items(), key=lambda kv: (-kv[1], kv[0]))),
        "reasons": reason_table(quarantine, examples),
        "distributions": distributions,
        "image_size": dataset.settings.get("image", {}).get("size"),
    }


# how the text report names the distributions it lists, in order
_SHOWN = {**MANIFEST_MEASURES, "image_megapixels": "image size (megapixels)",
          "samples_per_shard": "kept samples per shard", "shard_bytes": "shard size (bytes)"}


def _number(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.2f}"


def _example(e: dict) -> str:
    where = os.path.basename(e["source"].rstrip("/")) or e["source"]
    key = repr(e["key"]) if e["key"] else "(the whole shard)"
    return f"{key} in {where} #{e['position']}"


def format_inspection(report: dict) -> str:
    c = report["counts"]
    lines = [
        f"inspect {report['output']}",
        f"  shards      {c['shards']} ({c['shards_with_samples']} with kept samples"
        + (f", {c['crashed_shards']} crashed" if c["crashed_shards"] else "") + ")",
        f"  samples     read {_number(c['read'])}, kept {c['kept']}, quarantined {c['quarantined']}, "
        f"filtered {c['filtered']}, duplicates {c['duplicates']}",
    ]
    if report["modalities"]:
        lines.append("  modalities  " + ", ".join(f"{m or '(none)'} {n}" for m, n in report["modalities"].items()))
    if report["reasons"]:
        lines.append("  left out, by reason (examples: key in source shard #position):")
        for r in report["reasons"]:
            shown = "; ".join(_example(e) for e in r["examples"])
            more = ", ..." if r["count"] > len(r["examples"]) and r["examples"] else ""
            lines.append(f"    {r['kind']:<9} {r['reason']:<25} {r['count']:>6}  {shown}{more}")
    else:
        lines.append("  left out    nothing")
    header = f"  {'distributions':<31}" + "".join(f"{h:>12}" for h in ("count", "min", "p5", "p50", "p95", "max"))
    lines.append(header)
    for name, title in _SHOWN.items():
        d = report["distributions"][name]
        lines.append(f"    {title:<29}"[:33] + "".join(f"{_number(d[k]):>12}" for k in
                                                     ("count", "min", "p5", "p50", "p95", "max")))
    sheet = report.get("sheet")
    if sheet:
        lines.append(f"  sheet       {sheet['path']}: {sheet['kept']} kept (of {sheet['kept_with_image']} with "
                     f"an image) and {sheet['quarantined']} quarantined sample(s), "
                     f"{sheet['columns']} x {sheet['rows']} tiles")
        if sheet["quarantined_not_viewable"]:
            lines.append(f"              {sheet['quarantined_not_viewable']} quarantined sample(s) whose image "
                         "could not be read or decoded are not on it")
        if sheet["quarantined_over_limit"]:
            lines.append(f"              {sheet['quarantined_over_limit']} more quarantined sample(s) with an "
                         f"image were not tried (at most {sheet['quarantined_limit']} per sheet)")
    return "\n".join(lines)
