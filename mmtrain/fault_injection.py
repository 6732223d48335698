"""Fault injection for tests and benchmarks: MMTRAIN_FAULT_PAUSE="WHERE@STEP:SECONDS" in the
driver's environment holds every rank of the run's first attempt at one moment, so that a kill
can be aimed at it:

- `save@STEP`: inside the save of STEP, its files written and not yet uploaded;
- `step@STEP`: after step STEP and its checkpoint.

"WHERE@STEP:SECONDS/ATTEMPT" holds that attempt instead of the first (0), and several holds
are joined with commas: an elastic run is held once on its first group and once on the smaller
group that follows a lost node (tests/elastic_run.py).

The driver reads the variable (`FaultPause.from_environment`), the worker plan carries it only
when it is set, and the worker runs it as a hook at those two moments (see worker.py; loop.py attaches it); the
production path knows nothing of it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV = "MMTRAIN_FAULT_PAUSE"


@dataclass(frozen=True)
class Hold:
    where: str       # "save" | "step"
    step: int
    seconds: float
    attempt: int = 0

    def __str__(self) -> str:
        return f"{self.where}@{self.step}:{self.seconds:g}" + (f"/{self.attempt}" if self.attempt else "")


@dataclass(frozen=True)
class FaultPause:
    holds: tuple[Hold, ...]

    @classmethod
    def from_environment(cls) -> FaultPause | None:
        spec = os.environ.get(ENV)
        return cls.parse(spec) if spec else None

    @classmethod
    def parse(cls, spec: str) -> FaultPause:
        holds = []
        for item in spec.split(","):
            where, _, rest = item.partition("@")
            rest, _, attempt = rest.partition("/")
            step, _, seconds = rest.partition(":")
            try:
                holds.append(Hold(where, int(step), float(seconds), int(attempt or 0)))
            except ValueError:
                raise ValueError(f"{ENV}={spec!r}: expected WHERE@STEP:SECONDS[/ATTEMPT], comma-separated") from None
        return cls(tuple(holds))

    def __str__(self) -> str:
        return ",".join(map(str, self.holds))

    def inside_save(self, worker) -> None:
        self._hold(worker, "save")

    def after_step(self, worker) -> None:
        self._hold(worker, "step")

    def _hold(self, worker, where: str) -> None:
        # only the attempt named (the first by default): the attempt after the kill must run through
        for hold in self.holds:
            if worker.attempt == hold.attempt and hold.where == where and hold.step == worker.state.step:
                if worker.rank == 0:
                    print(f"fault injection: pausing {'inside the save of' if where == 'save' else 'after'} "
                          f"step {hold.step}" + (f" (attempt {hold.attempt}, {worker.world} workers)"
                                                 if hold.attempt else ""), flush=True)
                time.sleep(hold.seconds)
