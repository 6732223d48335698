"""The fault-tolerance corpus and its uninterrupted deterministic run, which every interrupted
run is compared with: tests/test_fault_tolerance.py and tests/test_secrets.py (whose run with
credentials loses a training worker) share them through conftest's session fixtures
`fault_data` and `fault_reference`, so the reference trains once per session.

64 samples in 8 shards, 2 workers x 8 per step: 4 steps per epoch, 2 epochs, a checkpoint
every 2 steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from mmtrain.audit import check, manifest_ids, read_audit
from mmtrain.checkpoint import CheckpointStore
from mmtrain.metrics import read_metric_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8  # 2 epochs x 4 steps
SAMPLES = 64


def make_data(root) -> dict:
    from pipelines.corpus import make_corpus
    from pipelines.preprocess import preprocess

    make_corpus(str(root / "raw"), SAMPLES, 8, seed=7)
    preprocess([str(root / "raw")], str(root / "clean"), progress=False)
    config = root / "log_every_step.json"
    config.write_text(json.dumps({"train": {"log_every": 1}}))
    return {"clean": root / "clean", "config": config, "ids": manifest_ids([str(root / "clean")])}


def command(data, run, *extra, workers=2):
    return [sys.executable, os.path.join(ROOT, "ray_job.py"), "train", "--data", str(data["clean"]),
            "--run-dir", str(run), "--config", str(data["config"]), "--epochs", "2", "--batch-size", "8",
            "--checkpoint-every", "2", "--workers", str(workers), "--audit-samples", *map(str, extra)]


def run_to_end(cmd, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r.stdout + r.stderr


def last_loss(run):
    lines = read_metric_lines(str(run))
    assert lines[-1]["step"] == STEPS
    return lines[-1]["loss"]


def assert_exactly_once(run, data, attempts):
    report = check(str(run), data["ids"])
    assert report["attempts"] == attempts, report
    assert sorted(report["epochs"]) == [0, 1], report
    for epoch in report["epochs"].values():
        assert epoch["samples"] == SAMPLES and epoch["served_twice"] == 0 and epoch["never_served"] == 0, report
    return report


def make_reference(data, run) -> dict:
    """The uninterrupted deterministic run, and what it proves about its checkpoints."""
    run_to_end(command(data, run, "--deterministic"))
    assert_exactly_once(run, data, attempts=1)
    # checkpoints at 2, 4, 6, 8; keep_checkpoints (3) keeps the last three, all complete
    store = CheckpointStore(str(run / "train"))
    kept = store.list()
    assert [os.path.basename(c) for c in kept] == [f"checkpoint_{s:09d}" for s in (4, 6, 8)]
    assert all(store.problem(c) is None for c in kept)
    return {"run": run, "loss": last_loss(run)}


def resumed_at(run):
    """The first step the second attempt ran."""
    return min(r["step"] for r in read_audit(str(run)) if r["attempt"] == 1)


def assert_same_loss(run, reference):
    loss = last_loss(run)
    assert abs(loss - reference["loss"]) <= 1e-3 * abs(reference["loss"]), (loss, reference["loss"])
