"""Elastic worker counts end to end (`train --workers 1-2`, mmtrain/elastic.py): on a local
3-node cluster the run loses a node and goes on with 1 worker, then grows back to 2 when a node
joins, with no person in between; every sample of every epoch is trained on exactly once through
both changes, and every optimizer step takes the same global batch on either group size.
The run and its cluster: tests/elastic_run.py (shared with benchmarks/resume.py)."""
import tempfile

import pytest

from elastic_run import run_through_loss_and_rejoin, start_cluster, stop_cluster, write_config
from fault_runs import SAMPLES, STEPS
from mmtrain.audit import check


@pytest.fixture
def cluster():
    folder = tempfile.mkdtemp(prefix="rje-", dir="/tmp")  # short: Ray's unix socket paths live under it
    try:
        yield start_cluster(folder)
    finally:
        stop_cluster(folder)


def test_a_1_to_2_worker_run_shrinks_on_a_lost_node_and_grows_on_a_new_one(fault_data, cluster, tmp_path):
    run = tmp_path / "run"
    out = run_through_loss_and_rejoin(cluster, str(fault_data["clean"]), str(run),
                                      write_config(str(tmp_path / "elastic.json")))
    assert out["returncode"] == 0, out["output"][-4000:]
    lines = out["lines"]
    # the group sizes in the order they trained: 2, then 1 after the loss, then 2 again
    sizes = [m["world_size"] for m in lines]
    assert [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]] == [2, 1, 2], sizes
    # step 3 ran on 2 workers and again on 1 (from checkpoint 2), step 5 on 1 and again on 2 (from 4)
    assert [m["step"] for m in lines] == [1, 2, 3, 3, 4, 5, 5, 6, 7, STEPS], [m["step"] for m in lines]
    # the same global batch before and after each change: the accumulation made up for the lost worker
    assert {(m["world_size"], m["grad_accum"], m["global_batch"]) for m in lines} == {(2, 1, 16), (1, 2, 16)}
    full = {m["world_size"] for m in lines if m["samples"] == 16}
    assert full == {1, 2} and max(m["samples"] for m in lines) == 16, [(m["world_size"], m["samples"]) for m in lines]
    # each restart resumed from the latest checkpoint before it (2, then 4) and said so
    assert (out["first_smaller_step"], out["first_larger_step"]) == (3, 5), out
    assert "on 1 workers x gradient accumulation 2, global batch 16" in out["output"]
    assert "on 2 workers x gradient accumulation 1, global batch 16" in out["output"]
    for step in (2, 4):  # 2 -> 1 and 1 -> 2 went through DeepSpeed's universal checkpoint
        assert f"checkpoint_{step:09d} (universal, new worker count)" in out["output"]
    report = check(str(run), fault_data["ids"])
    assert report["attempts"] == 3 and report["exactly_once"] and sorted(report["epochs"]) == [0, 1], report
    assert all(e["samples"] == SAMPLES for e in report["epochs"].values()), report
