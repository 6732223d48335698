"""Fault injection for tests and benchmarks: MMTRAIN_FAULT_PAUSE="WHERE@STEP:SECONDS" in the
driver's environment holds every rank of the run's first attempt at one moment, so that a kill
can be aimed at it:

- `save@STEP`: inside the save of STEP, its files written and not yet uploaded;
- `step@STEP`: after step STEP and its checkpoint.

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
class FaultPause:
    where: str       # "save" | "step"
    step: int
    seconds: float

    @classmethod
    def from_environment(cls) -> FaultPause | None:
        spec = os.environ.get(ENV)
        return cls.parse(spec) if spec else None

    @classmethod
    def parse(cls, spec: str) -> FaultPause:
        where, _, rest = spec.partition("@")
        step, _, seconds = rest.partition(":")
        try:
            return cls(where, int(step), float(seconds))
        except ValueError:
            raise ValueError(f"{ENV}={spec!r}: expected WHERE@STEP:SECONDS") from None

    def __str__(self) -> str:
        return f"{self.where}@{self.step}:{self.seconds:g}"

    def inside_save(self, worker) -> None:
        self._hold(worker, "save")

    def after_step(self, worker) -> None:
        self._hold(worker, "step")

    def _hold(self, worker, where: str) -> None:
        # only the first attempt: the attempt after the kill must run through
        if worker.attempt == 0 and self.where == where and self.step == worker.state.step:
            if worker.rank == 0:
                print(f"fault injection: pausing {'inside the save of' if where == 'save' else 'after'} "
                      f"step {self.step}", flush=True)
            time.sleep(self.seconds)
