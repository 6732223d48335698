"""A synthetic WebDataset corpus with learnable structure and known defects, written as tar
shards (what a sample holds: `corpus_samples.py`).

With `defects=True` one sample of each kind the reader must refuse is planted, and
`_corpus.json` says where and with which reason code, so that tests can check the
quarantine instead of guessing. Output is a pure function of the arguments: the
random state of each sample comes from (seed, stream, index) only.
"""
from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from . import reasons as R
from .corpus_samples import (DEFECT, GOOD, MAX_SUBJECTS, TRUNC, Member, defect_samples, plan, render, subject,
                             subject_names)
from .errors import ConfigError
from .storage import filesystem

_MTIME = 1_700_000_000  # fixed, so that the same seed gives the same tar bytes


def _add(tar: tarfile.TarFile, members: list[Member]) -> None:
    for name, data, link in members:
        info = tarfile.TarInfo()
        info.name, info.mtime, info.mode = name, _MTIME, 0o644  # set directly: names are not sanitised
        if link is not None:
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _interleave(goods: list, bad: list) -> list:
    """Defects spaced evenly between the good samples, so no reader can special-case the ends."""
    out, d = [], 0
    for g, item in enumerate(goods):
        while d < len(bad) and (d + 1) * len(goods) // (len(bad) + 1) <= g:
            out.append(bad[d])
            d += 1
        out.append(item)
    return out + bad[d:]


def _truncated_shard(seed: int, subjects: int) -> tuple[bytes, list[str], str, str]:
    """10 good samples, then one cut in the middle of its last member, then two never reached."""
    plans = [plan(seed, TRUNC, i, subjects) for i in range(13)]
    cut = plans[10]  # made whole and folder-free, so that the cut lands mid-sample in a big member
    cut.key, cut.image = cut.key.split("/")[-1], cut.image or ("jpg", 200, 260)
    cut.text, cut.audio = cut.text or ("txt", subject(cut.subject).name, {}), cut.audio or ("wav", 16000, 2.0, 1)
    buf, rendered = io.BytesIO(), [render(p) for p in plans]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for members in rendered:
            _add(tar, members)
    name = rendered[10][-1][0]
    info = tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getmember(name)
    return buf.getvalue()[: info.offset_data + info.size // 2], [p.key for p in plans[:10]], cut.key, name


Build = Callable[[], list[Member]]  # renders one sample's members when called


def make_corpus(out: str, samples: int, shards: int = 1, *, seed: int = 0, subjects: int = 16,
                defects: bool = False, storage_options: dict | None = None, progress: bool = False) -> dict:
    """Write `samples` good samples over `shards` tar shards under `out` (local path or fsspec URL).

    With `defects`, one sample per known defect is added (plus `shard-trunc.tar`), each recorded in
    `_corpus.json` with the reason code the reader must give it. Returns what `_corpus.json` holds.
    """
    if samples < 0 or shards < 1 or not 1 <= subjects <= MAX_SUBJECTS:
        raise ConfigError(f"need samples >= 0, shards >= 1 and 1 <= subjects <= {MAX_SUBJECTS}")
    if defects and samples < 1:
        raise ConfigError("defects=True needs at least one good sample to duplicate")
    fs, root = filesystem(out, storage_options)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    names = [f"shard-{i:06d}.tar" for i in range(shards)]
    ranges = [range(i * samples // shards, (i + 1) * samples // shards) for i in range(shards)]
    items: list[list[Build]] = [[lambda i=i: render(plan(seed, GOOD, i, subjects)) for i in r] for r in ranges]
    records: list[dict] = []
    if defects:
        items = _plant_defects(items, names, ranges, seed, subjects, records)
    _write_shards(fs, root, names, items, progress)

    meta: dict = {"samples": samples, "shards": names, "seed": seed, "subjects": subjects,
                  "subject_names": subject_names(subjects), "defects": records,
                  "good_keys_in_truncated_shard": [], "shard_samples": {n: len(r) for n, r in zip(names, ranges)}}
    if defects:
        data, good, cut_key, cut_member = _truncated_shard(seed, subjects)
        with fs.open(f"{root}/shard-trunc.tar", "wb") as f:
            f.write(data)
        names.append("shard-trunc.tar")
        meta["shard_samples"]["shard-trunc.tar"], meta["good_keys_in_truncated_shard"] = len(good), good
        records.append(_record("shard-trunc.tar", cut_key, cut_member, "truncated_shard", R.TRUNCATED_SHARD, R.ERROR))
    meta["good_total"] = samples + len(meta["good_keys_in_truncated_shard"])
    with fs.open(f"{root}/_corpus.json", "wb") as f:
        f.write(json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))
    return meta


def _record(shard: str, key: str, member: str | None, defect: str, reason: str, kind: str, **kw) -> dict:
    """A planted defect, as `_corpus.json` lists it."""
    return {"shard": shard, "key": key, "member": member, "defect": defect, "reason": reason, "kind": kind, **kw}


def _plant_defects(items: list[list[Build]], names: list[str], ranges: list[range], seed: int, subjects: int,
                   records: list[dict]) -> list[list[Build]]:
    """The shards' samples with one of each defect sample spread over them (recorded in `records`),
    and the two duplicates at the end of the last shard."""
    shards = len(names)
    bad: list[list[Build]] = [[] for _ in names]
    for j, (name, (reason, kind, member, build)) in enumerate(defect_samples(seed, subjects).items()):
        bad[j % shards].append(build)
        # a flawed sample is keyed like any sample; a flawed name is recorded as written
        key = member.split(".")[0] if member.startswith("bad-") and name != "symlink" else member
        records.append(_record(names[j % shards], key, member, name, reason, kind))
    items = [_interleave(g, b) for g, b in zip(items, bad)]
    # The duplicates close the last shard (never empty when samples >= 1), the copy first, so
    # the repeated key is never adjacent to its first occurrence. Originals are plain samples.
    c = shards - 1
    cands = [plan(seed, GOOD, i, subjects) for i in list(ranges[c])[:64]]
    plain = [p for p in cands if p.plain] or cands
    orig_k, orig_c = plain[0], plain[-1]
    copy = "bad-duplicate_content"
    items[c].append(lambda: [(copy + n[len(orig_c.key):], d, None) for n, d, _ in
                             render(plan(seed, GOOD, int(orig_c.key[-7:]), subjects))])
    records.append(_record(names[c], copy, None, "duplicate_content", R.DUPLICATE_CONTENT, R.DUPLICATE,
                           original=orig_c.key))

    def dup_key() -> list[Member]:
        p = plan(seed, DEFECT, 100, subjects)
        p.key = orig_k.key  # new content under a key this shard already used
        return render(p)
    items[c].append(dup_key)
    records.append(_record(names[c], orig_k.key, None, "duplicate_key", R.DUPLICATE_KEY, R.ERROR))
    return items


def _write_shards(fs, root: str, names: list[str], items: list[list[Build]], progress: bool) -> None:
    every = max(1, len(names) // 10)
    with ThreadPoolExecutor(max_workers=2) as pool:  # encoders and numpy release the GIL
        for s, name in enumerate(names):
            with fs.open(f"{root}/{name}", "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
                for lo in range(0, len(items[s]), 32):  # bounded look-ahead keeps memory flat
                    for members in pool.map(lambda build: build(), items[s][lo:lo + 32]):
                        _add(tar, members)
            if progress and ((s + 1) % every == 0 or s + 1 == len(names)):
                print(f"[corpus] {s + 1}/{len(names)} shards written", flush=True)
