"""The per-stage CPU clock: exclusive time, every stage summed into the task's total, a no-op
outside a clock; and a real shard task's stats carry the breakdown."""
from __future__ import annotations

import time

import pytest

from pipelines.stage_clock import STAGES, StageClock, add_seconds, stage


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_time_is_exclusive_and_adds_up_to_the_whole() -> None:
    t0 = time.thread_time()
    with StageClock() as clock:
        _spin(0.02)                   # bookkeeping
        with stage("resize"):
            _spin(0.03)
            with stage("encode"):     # nested: charged to encode only
                _spin(0.04)
    total = time.thread_time() - t0
    s = clock.seconds()
    assert set(s) == set(STAGES)
    assert s["encode"] >= 0.04 and 0.03 <= s["resize"] < 0.04 + 0.02
    assert s["bookkeeping"] >= 0.02
    assert sum(s.values()) == pytest.approx(total, abs=0.005)


def test_outside_a_clock_stage_is_a_no_op_and_unknown_stages_are_refused() -> None:
    with stage("resize"):
        pass  # no clock: nothing to charge, nothing raised
    with StageClock():
        with pytest.raises(ValueError, match="unknown stage"):
            with stage("resizing"):
                pass


def test_add_seconds_sums_per_stage() -> None:
    a = dict.fromkeys(STAGES, 1.0)
    assert add_seconds(add_seconds({}, a), a)["log_mel"] == 2.0


def test_a_shard_task_reports_where_its_cpu_went(tmp_path) -> None:
    from pipelines.config import DataConfig
    from pipelines.corpus import make_corpus
    from pipelines.shard_job import process_shard
    from pipelines.storage import OutputStore

    make_corpus(str(tmp_path / "raw"), 12, 1, seed=3)
    shard = sorted((tmp_path / "raw").glob("*.tar"))[0]
    store = OutputStore(str(tmp_path / "out"))
    stats = process_shard(str(shard), "shard-000000.tar", store, DataConfig())
    s = stats["stage_cpu_s"]
    for name in ("read", "image_decode", "resize", "encode", "log_mel", "text", "write", "bookkeeping"):
        assert s[name] > 0, (name, s)
    assert store.read_json("_parts/shard-000000.done.json")["stage_cpu_s"] == s
