"""Where a shard task's CPU goes: per-stage thread CPU time, always on, nearly free.

A task runs `with StageClock() as clock:`; code inside marks its stages with
`with stage("resize"):`. Time is exclusive: a stage nested in another is charged to the inner
one only, and whatever the task does outside every named stage is charged to `bookkeeping`
(manifest rows, dedup, hashing, quarantine records, parquet parts). So the stages add up to the
task's whole thread CPU. Outside a clock, `stage()` is a shared no-op.

The clock is thread CPU (`time.thread_time_ns`, ~0.3 us per read): a task's own work, not its
neighbours' and not time spent waiting on a store. A few dozen reads per sample cost
microseconds against milliseconds of decoding, so the clock stays on in production and every
`_stats.json` carries the breakdown (`stage_cpu_s`), the same numbers the benchmark reports.
"""
from __future__ import annotations

import contextvars
import time

# The stages, in the order a sample meets them. `bookkeeping` is everything else the task does.
STAGES = ("read", "image_decode", "resize", "encode", "audio_decode", "resample", "log_mel", "text",
          "write", "bookkeeping")
BASE = "bookkeeping"

_ACTIVE: contextvars.ContextVar["StageClock | None"] = contextvars.ContextVar("stage_clock", default=None)


class StageClock:
    """Exclusive thread-CPU seconds per stage for the code run inside `with StageClock():`."""

    __slots__ = ("ns", "_stack", "_mark", "_token")

    def __init__(self) -> None:
        self.ns = dict.fromkeys(STAGES, 0)
        self._stack = [BASE]
        self._mark = 0
        self._token = None

    def __enter__(self) -> "StageClock":
        self._token = _ACTIVE.set(self)
        self._mark = time.thread_time_ns()
        return self

    def __exit__(self, *exc) -> None:
        self._switch()
        _ACTIVE.reset(self._token)

    def _switch(self) -> None:
        now = time.thread_time_ns()
        self.ns[self._stack[-1]] += now - self._mark
        self._mark = now

    def push(self, name: str) -> None:
        if name not in self.ns:
            raise ValueError(f"unknown stage {name!r}; the stages are {STAGES}")
        self._switch()
        self._stack.append(name)

    def pop(self) -> None:
        self._switch()
        self._stack.pop()

    def seconds(self) -> dict[str, float]:
        """CPU seconds per stage (every stage present, zeros included)."""
        return {k: v / 1e9 for k, v in self.ns.items()}


class _Stage:
    __slots__ = ("clock", "name")

    def __init__(self, clock: StageClock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        self.clock.push(self.name)

    def __exit__(self, *exc) -> None:
        self.clock.pop()


class _NoClock:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_NO_CLOCK = _NoClock()


def stage(name: str):
    """`with stage("log_mel"): ...` charges the block's CPU to that stage of the running clock."""
    clock = _ACTIVE.get()
    return _NO_CLOCK if clock is None else _Stage(clock, name)


def add_seconds(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    """Sum of two `seconds()` dicts (shards' stats summed into the job's)."""
    return {k: total.get(k, 0.0) + part.get(k, 0.0) for k in dict.fromkeys([*STAGES, *total, *part])}
