"""Reading a run's sample audit (`--audit-samples`): which ids each step trained on, and
whether every sample of every epoch was trained on exactly once.

RUN/audit/attempt_AAA.rank_RRRRR.jsonl holds one line per micro-step:
    {"attempt": A, "step": S, "rank": R, "ids": [[source, key, epoch], ...]}

(a micro-step may train on rows of two epochs: a pass of epochs is one stream).

An attempt that crashed may have run steps after its last checkpoint; the next attempt
resumes from that checkpoint and runs those step numbers again. So the record of a step is
the one from the last attempt that ran it: attempt a's line for step s is superseded when a
later attempt started at a step <= s. What is left is what the model's weights saw.
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter

Id = tuple[str, str]  # (shard URL, key), as `pipelines.dataset.Id`


def read_audit(run_dir: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(run_dir, "audit", "attempt_*.rank_*.jsonl"))):
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass  # the last line of a killed attempt may be cut; its step is superseded
    return rows


def effective(rows: list[dict]) -> list[dict]:
    """The rows that count: each step as run by the last attempt that ran it."""
    first_step = {}
    for r in rows:
        first_step[r["attempt"]] = min(first_step.get(r["attempt"], r["step"]), r["step"])
    attempts = sorted(first_step)

    def superseded(r: dict) -> bool:
        return any(first_step[b] <= r["step"] for b in attempts if b > r["attempt"])

    return [r for r in rows if not superseded(r)]


def epoch_counts(rows: list[dict]) -> dict[int, Counter]:
    """How many times each id was trained on, per epoch, in `rows` (pass the effective ones)."""
    counts: dict[int, Counter] = {}
    for r in rows:
        for source, key, epoch in r["ids"]:
            counts.setdefault(epoch, Counter())[(source, key)] += 1
    return counts


def check(run_dir: str, expected: set[Id] | None = None) -> dict:
    """Per epoch: ids trained on twice or more, and (given the epoch's ids) ids never trained on.
    Also how many rows later attempts superseded (steps run again after a crash)."""
    rows = read_audit(run_dir)
    kept = effective(rows)
    report = {"attempts": len({r["attempt"] for r in rows}), "rows": len(rows),
              "superseded_rows": len(rows) - len(kept), "epochs": {}}
    for epoch, counts in sorted(epoch_counts(kept).items()):
        twice = sorted(i for i, n in counts.items() if n > 1)
        never = sorted(expected - set(counts)) if expected is not None else []
        report["epochs"][epoch] = {"samples": len(counts), "served_twice": len(twice), "never_served": len(never),
                                   "examples": [list(i) for i in (twice + never)[:5]]}
    report["exactly_once"] = all(e["served_twice"] == 0 and e["never_served"] == 0
                                 for e in report["epochs"].values())
    return report


def manifest_ids(data_dirs: list[str], storage_options: dict | None = None) -> set[Id]:
    """Every sample id of preprocessed folders, from their manifests (ids as the ingest names
    them: the output shard's URL and the key)."""
    from pipelines.dataset import PreprocessedDataset

    ids: set[Id] = set()
    for folder in data_dirs:
        ids |= PreprocessedDataset(folder, storage_options).ids()
    return ids
