"""Which attempt of the run this worker group is, and its sample audit file.

Workers start on a run more than once (driver re-runs and Ray Train's automatic restarts
alike); the audit keeps each attempt's lines apart (see audit.py for how they are combined),
and fault injection holds the first attempt only."""
from __future__ import annotations

import json
import os

from .device import broadcast_int


def attempt_number(run_dir: str, rank: int, device) -> int:
    """How many times workers started on this run before: rank 0 counts in RUN/attempts.json
    and tells the others (a collective on the training `device`)."""
    before = 0
    if rank == 0:
        path = os.path.join(run_dir, "attempts.json")
        before = json.load(open(path))["started"] if os.path.exists(path) else 0
        with open(path + ".tmp", "w") as f:
            json.dump({"started": before + 1}, f)
        os.replace(path + ".tmp", path)
    return broadcast_int(before, device, src=0)


class AuditFile:
    """RUN/audit/attempt_AAA.rank_RRRRR.jsonl: one line per micro-step, in the format audit.py reads."""

    def __init__(self, run_dir: str, rank: int, attempt: int):
        self.rank, self.attempt = rank, attempt
        directory = os.path.join(run_dir, "audit")
        os.makedirs(directory, exist_ok=True)
        self._file = open(os.path.join(directory, f"attempt_{attempt:03d}.rank_{rank:05d}.jsonl"), "a")

    def write(self, step: int, ids: list) -> None:
        self._file.write(json.dumps({"attempt": self.attempt, "step": step, "rank": self.rank,
                                     "ids": [list(i) for i in ids]}) + "\n")

    def flush(self) -> None:
        # before each save: a kill after the checkpoint is registered must not lose the lines of
        # the steps it holds, since the resumed run does not train on them again
        self._file.flush()

    def close(self) -> None:
        self._file.close()
