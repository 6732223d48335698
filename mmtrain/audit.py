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

from pipelines.mixture import part_name, source_of_part

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


def epoch_counts(rows: list[dict]) -> dict:
    """How many times each id was trained on, per epoch (a mixture: per part "NAME/K", the
    source's epoch K), in `rows` (pass the effective ones)."""
    counts: dict = {}
    for r in rows:
        for source, key, part in r["ids"]:
            counts.setdefault(part, Counter())[(source, key)] += 1
    return counts


def check(run_dir: str, expected: set[Id] | None = None, by_source: dict[str, set[Id]] | None = None) -> dict:
    """Per epoch: ids trained on twice or more, and (given the epoch's ids) ids never trained on.
    Also how many rows later attempts superseded (steps run again after a crash).

    A mixture's record is per part, (source, source epoch); `by_source` gives each source's
    ids. A source epoch is checked for ids never served once a later epoch of its source has
    begun (the stream passed it); the run's last one may stop part way, by design."""
    rows = read_audit(run_dir)
    kept = effective(rows)
    report = {"attempts": len({r["attempt"] for r in rows}), "rows": len(rows),
              "superseded_rows": len(rows) - len(kept), "epochs": {}}
    counts = epoch_counts(kept)
    for part, served in sorted(counts.items(), key=lambda item: _part_order(item[0])):
        name = source_of_part(part)
        if name is None:
            ids = expected
        else:
            k = int(part.rsplit("/", 1)[1])
            ids = (by_source or {}).get(name) if part_name(name, k + 1) in counts else None
        twice = sorted(i for i, n in served.items() if n > 1)
        never = sorted(ids - set(served)) if ids is not None else []
        report["epochs"][part] = {"samples": len(served), "served_twice": len(twice), "never_served": len(never),
                                  "examples": [list(i) for i in (twice + never)[:5]]}
    report["exactly_once"] = all(e["served_twice"] == 0 and e["never_served"] == 0
                                 for e in report["epochs"].values())
    if any(source_of_part(p) is not None for p in counts):
        report["sources"] = _per_source(counts, report["epochs"])
    return report


def _part_order(part) -> tuple:
    name = source_of_part(part)
    return (0, part, 0) if name is None else (1, name, int(part.rsplit("/", 1)[1]))


def _per_source(counts: dict, epochs: dict) -> dict:
    """Per source: samples trained on (with repeats), its share of all, its epochs begun."""
    total = sum(sum(c.values()) for c in counts.values()) or 1
    out: dict[str, dict] = {}
    for part, served in counts.items():
        source = out.setdefault(source_of_part(part), {"samples": 0, "source_epochs": 0, "served_twice": 0,
                                                        "never_served": 0})
        source["samples"] += sum(served.values())
        source["source_epochs"] += 1
        source["served_twice"] += epochs[part]["served_twice"]
        source["never_served"] += epochs[part]["never_served"]
    for source in out.values():
        source["share"] = round(source["samples"] / total, 4)
    return dict(sorted(out.items()))


def check_run(run_dir: str, data: list[str] | None, storage_options: dict | None = None) -> dict:
    """`check` with the expected ids: of the preprocessed folders `data`, else of the run's own
    mixture sources when they are preprocessed (RUN/run_config.json)."""
    if data:
        return check(run_dir, manifest_ids(data, storage_options))
    sources = _run_sources(run_dir)
    by_source = None
    if sources:
        try:
            by_source = {s["name"]: manifest_ids(s["paths"], storage_options) for s in sources}
        except (OSError, ValueError):  # raw shards (no manifest) or a store out of reach: twice-checks only
            by_source = None
    return check(run_dir, None, by_source)


def _run_sources(run_dir: str) -> list[dict]:
    try:
        with open(os.path.join(run_dir, "run_config.json")) as f:
            return json.load(f).get("data", {}).get("sources") or []
    except (OSError, ValueError):
        return []


def report_lines(report: dict) -> str:
    """The report as the `audit` command prints it."""
    lines = [f"{report['rows']} audit rows from {report['attempts']} attempt(s); "
             f"{report['superseded_rows']} superseded (steps run again after a restart)"]
    for epoch, e in report["epochs"].items():
        label = f"source epoch {epoch}" if isinstance(epoch, str) else f"epoch {epoch}"
        lines.append(f"{label}: {e['samples']} samples, {e['served_twice']} served twice, "
                     f"{e['never_served']} never served" + (f"  e.g. {e['examples'][0]}" if e["examples"] else ""))
    for name, s in report.get("sources", {}).items():
        lines.append(f"source {name}: {s['samples']} samples trained on ({s['share']:.1%}), "
                     f"{s['source_epochs']} source epoch(s), {s['served_twice']} served twice, "
                     f"{s['never_served']} never served")
    lines.append("exactly once: " + ("yes" if report["exactly_once"] else "NO"))
    return "\n".join(lines)


def manifest_ids(data_dirs: list[str], storage_options: dict | None = None) -> set[Id]:
    """Every sample id of preprocessed folders, from their manifests (ids as the ingest names
    them: the output shard's URL and the key)."""
    from pipelines.dataset import PreprocessedDataset

    ids: set[Id] = set()
    for folder in data_dirs:
        ids |= PreprocessedDataset(folder, storage_options).ids()
    return ids
