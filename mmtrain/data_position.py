"""Which samples the run has trained on: the data position saved in every checkpoint.

The data plane serves a pass of several epochs as one stream (see pipelines/ingest.py), so
near an epoch boundary a batch may hold rows of two epochs. Each rank records, per epoch of
the current pass, the ids, (source shard, key), of the samples in its committed optimizer
steps. A checkpoint holds every rank's record; on resume they are merged, whatever the number
of workers was or is now, and the data plane serves only the rest of each epoch of the pass.
Prefetched or shuffled-but-untrained rows are not recorded, so they are served again: the
guarantee is exactly-once for committed steps, not for rows that were merely in flight.

In a mixture of sources (pipelines/mixture.py) the record is kept per part, (source, source
epoch), instead of per epoch: a repeated source serves a sample once in each of its own
epochs, which may fall in one epoch of the run. A pass's pieces of a part never overlap the
pieces of earlier passes (stream positions never repeat), so forgetting at a pass's end holds
for parts as for epochs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

Id = tuple[str, str]  # (source shard URL, key)
Part = int | str  # an epoch of the pass; in a mixture of sources "NAME/K", the source's epoch K


def part_key(text: str) -> Part:
    """A part as saved (a JSON object key) -> as the data plane tags rows with it."""
    return int(text) if text.lstrip("-").isdigit() else text


@dataclass
class DataPosition:
    epoch: int = 0  # the first epoch of the current pass
    restored: dict[Part, set[Id]] = field(default_factory=dict)  # per part, before this attempt (all ranks)
    mine: dict[Part, set[Id]] = field(default_factory=dict)      # per part, this rank, this attempt
    pending: list[tuple[Part, Id]] = field(default_factory=list)  # this rank, micro-steps not yet committed

    def consumed(self) -> dict[Part, set[Id]]:
        return {e: self.restored.get(e, set()) | self.mine.get(e, set())
                for e in sorted(set(self.restored) | set(self.mine), key=str)}

    def add(self, ids: list[tuple[str, str, int]]) -> None:
        """`ids`: (source, key, part) of the rows of one micro-batch."""
        self.pending.extend((epoch, (source, key)) for source, key, epoch in ids)

    def commit(self) -> None:
        """Called at an optimizer step boundary: the pending micro-batches now count."""
        for epoch, i in self.pending:
            self.mine.setdefault(epoch, set()).add(i)
        self.pending.clear()

    def next_pass(self, epoch: int) -> None:
        """Every epoch before `epoch` was served whole: nothing of them needs remembering."""
        self.epoch, self.restored, self.mine, self.pending = epoch, {}, {}, []

    # --- persistence: one file per rank, merged on load ---------------------------------
    def save_rank(self, directory: str, rank: int) -> None:
        """Rank 0 also carries what earlier attempts consumed, so no id is written twice."""
        per_epoch = self.consumed() if rank == 0 else self.mine
        ids: dict[str, dict[str, list[str]]] = {}
        for epoch, members in per_epoch.items():
            by_source: dict[str, list[str]] = {}
            for source, key in sorted(members):
                by_source.setdefault(source, []).append(key)
            ids[str(epoch)] = by_source
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"rank_{rank:05d}.json"), "w") as f:
            json.dump({"epoch": self.epoch, "ids": ids}, f)

    @classmethod
    def load(cls, directory: str) -> "DataPosition":
        files = sorted(n for n in os.listdir(directory) if n.startswith("rank_") and n.endswith(".json"))
        if not files:
            raise FileNotFoundError(f"no data position files in {directory}")
        epochs, consumed = set(), {}
        for name in files:
            with open(os.path.join(directory, name)) as f:
                d = json.load(f)
            epochs.add(d["epoch"])
            for epoch, by_source in d["ids"].items():
                consumed.setdefault(part_key(epoch), set()).update((s, k) for s, keys in by_source.items() for k in keys)
        if len(epochs) != 1:
            raise ValueError(f"ranks disagree on the pass's first epoch in {directory}: {sorted(epochs)}")
        return cls(epoch=epochs.pop(), restored=consumed)
