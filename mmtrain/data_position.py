"""Which samples the run has trained on: the data position saved in every checkpoint.

Each rank records the ids, (source shard, key), of the samples in its committed optimizer
steps of the current epoch. A checkpoint holds every rank's list; on resume they are merged
into one set, whatever the number of workers was or is now, and the data plane serves only
the rest of the epoch (see pipelines/ingest.py). Prefetched or shuffled-but-untrained rows
are not in the set, so they are served again: the guarantee is exactly-once for committed
steps, not for rows that were merely in flight.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

Id = tuple[str, str]  # (source shard URL, key)


@dataclass
class DataPosition:
    epoch: int = 0
    restored: set[Id] = field(default_factory=set)  # consumed this epoch before this attempt (all ranks)
    mine: set[Id] = field(default_factory=set)      # consumed this epoch by this rank, this attempt
    pending: list[Id] = field(default_factory=list)  # this rank, in micro-steps not yet committed

    @property
    def consumed(self) -> set[Id]:
        return self.restored | self.mine

    def add(self, ids: list[Id]) -> None:
        self.pending.extend(ids)

    def commit(self) -> None:
        """Called at an optimizer step boundary: the pending micro-batches now count."""
        self.mine.update(self.pending)
        self.pending.clear()

    def next_epoch(self) -> None:
        self.epoch += 1
        self.restored, self.mine, self.pending = set(), set(), []

    # --- persistence: one file per rank, merged on load ---------------------------------
    def save_rank(self, directory: str, rank: int) -> None:
        """Rank 0 also carries what earlier attempts consumed, so no id is written twice."""
        ids = self.consumed if rank == 0 else self.mine
        by_source: dict[str, list[str]] = {}
        for source, key in sorted(ids):
            by_source.setdefault(source, []).append(key)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"rank_{rank:05d}.json"), "w") as f:
            json.dump({"epoch": self.epoch, "ids": by_source}, f)

    @classmethod
    def load(cls, directory: str) -> "DataPosition":
        files = sorted(n for n in os.listdir(directory) if n.startswith("rank_") and n.endswith(".json"))
        if not files:
            raise FileNotFoundError(f"no data position files in {directory}")
        epochs, consumed = set(), set()
        for name in files:
            with open(os.path.join(directory, name)) as f:
                d = json.load(f)
            epochs.add(d["epoch"])
            consumed.update((s, k) for s, keys in d["ids"].items() for k in keys)
        if len(epochs) != 1:
            raise ValueError(f"ranks disagree on the epoch in {directory}: {sorted(epochs)}")
        return cls(epoch=epochs.pop(), restored=consumed)
