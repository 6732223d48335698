"""Training on a weighted mixture of three sources (issue 15's acceptance): each source's share
of the trained samples follows its weight, a repeated source serves each sample once per its
own epoch, and after a driver kill and a re-run the per-source audit still shows exactly once
per source epoch. Real Ray, DeepSpeed, tar shards; the sources are shards of one preprocessed
output (10, 5 and 1 shards of 20 samples), named by path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from mmtrain.audit import check_run, manifest_ids
from mmtrain.metrics import read_metric_lines
from tests.paused_run import ROOT, start_paused

SIZES = {"web": 10, "curated": 5, "speech": 1}  # shards of 20 samples: 200, 100, 20
WEIGHTS = {"web": 0.6, "curated": 0.3, "speech": 0.1}
EPOCHS = 5


@pytest.fixture(scope="module")
def sources(ray_cluster, tmp_path_factory):
    from pipelines.corpus import make_corpus
    from pipelines.preprocess import preprocess

    root = tmp_path_factory.mktemp("mixture")
    make_corpus(str(root / "raw"), 320, 16, seed=11)
    preprocess([str(root / "raw")], str(root / "clean"), progress=False)
    shards = sorted(str(p) for p in (root / "clean").glob("**/*.tar"))
    assert len(shards) == 16
    by_source, at = {}, 0
    for name, n in SIZES.items():
        by_source[name], at = shards[at:at + n], at + n
    ids = manifest_ids([str(root / "clean")])
    expected = {name: {i for i in ids if i[0] in set(paths)} for name, paths in by_source.items()}
    assert {name: len(e) for name, e in expected.items()} == {"web": 200, "curated": 100, "speech": 20}
    config = root / "config.json"
    config.write_text(json.dumps({"train": {"log_every": 5}}))
    return {"shards": by_source, "ids": expected, "config": config, "raw": root / "raw"}


def _command(sources, run):
    data = [f"{name}={path}:{WEIGHTS[name]}" if i == 0 else f"{name}={path}"
            for name, paths in sources["shards"].items() for i, path in enumerate(paths)]
    return [sys.executable, os.path.join(ROOT, "ray_job.py"), "train", "--data", *data, "--run-dir", str(run),
            "--config", str(sources["config"]), "--epochs", str(EPOCHS), "--batch-size", "16", "--workers", "2",
            "--checkpoint-every", "10", "--audit-samples"]


def test_a_killed_mixture_run_resumes_with_each_source_exactly_once_per_source_epoch(sources, tmp_path):
    run = tmp_path / "run"
    cmd = _command(sources, run)
    first = start_paused(cmd, run, "step@20:120")
    os.killpg(first.pid, signal.SIGKILL)  # the whole driver, after step 20 and its checkpoint
    first.wait(timeout=30)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    out = r.stdout + r.stderr
    # from checkpoint 20, or 10 when the kill lands before Ray Train registered 20 (its report
    # reaches the controller asynchronously); the steps after it run again and supersede
    assert "resuming from" in out
    assert "source speech: 20 samples in 1 shards, 32 per epoch" in out

    report = check_run(str(run), None)
    assert report["attempts"] == 2, report
    resumed = min(r["step"] for r in _effective_rows(run) if r["attempt"] == 1)
    assert resumed in (11, 21) and report["superseded_rows"] == 2 * (21 - resumed), report
    # the shares of the trained samples follow the weights (exactly, by the quotas 192/96/32)
    shares = {name: s["share"] for name, s in report["sources"].items()}
    for name, weight in WEIGHTS.items():
        assert abs(shares[name] - weight) <= 0.03, shares
    # speech, 20 samples at 32 per epoch, ran 8 of its own epochs: each sample once in each
    epochs = report["epochs"]
    assert [epochs[f"speech/{k}"]["samples"] for k in range(8)] == [20] * 8, epochs
    assert "speech/8" not in epochs
    assert [epochs[f"web/{k}"]["samples"] for k in range(5)] == [200] * 4 + [160]
    assert all(e["served_twice"] == 0 for e in epochs.values()), report
    # the run's audit reads the sources from its own config; these are shards, not folders, so
    # the ids never served are checked here against each source's manifest ids
    served = {}
    for row in _effective_rows(run):
        for shard, key, part in row["ids"]:
            served.setdefault(part, set()).add((shard, key))
    for name, ids in sources["ids"].items():
        done = {"web": 4, "curated": 4, "speech": 8}[name]
        for k in range(done):
            assert served[f"{name}/{k}"] == ids, f"{name}/{k}"
    assert report["exactly_once"]
    # metrics log samples per source, and their sum is the samples trained on
    # (the dynamic split may leave one rank a row more at the end: a last step beyond the 50 planned)
    lines = read_metric_lines(str(run))
    assert lines[-1]["step"] >= 50
    for line in lines:
        assert sum(line[f"samples_{name}"] for name in WEIGHTS) == line["samples"], line
    assert sum(line["samples_speech"] for line in lines if line["step"] > resumed) > 0
    # the audit command says it per source
    audit = subprocess.run([sys.executable, os.path.join(ROOT, "ray_job.py"), "audit", "--run-dir", str(run)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "source speech: 160 samples trained on (10.0%), 8 source epoch(s), 0 served twice" in audit.stdout
    # the model of a mixture run is used like any other: its export holds the data plane's
    # settings, not the run's sources, and loads (from the export and from the run) as the same model
    from mmtrain.export import export
    from mmtrain.inference.loaded import load_model, model_fingerprint

    exported = export(str(run), str(tmp_path / "model.safetensors"))
    from_file, from_run = load_model(exported["output"]), load_model(str(run))
    assert type(from_file.data_cfg).__name__ == "DataConfig" and from_file.data_cfg == from_run.data_cfg
    assert model_fingerprint(from_file) == model_fingerprint(from_run)


def test_raw_sources_are_counted_by_reading_them(sources):
    """Raw shards carry no manifest: a mixture of them counts each shard's records in one Ray
    Data job, and the plan stands on those counts as on a manifest's."""
    from mmtrain.config import RunConfig
    from mmtrain.data_sources import plan_mixture, record_counts, source_shards

    raw = sorted(str(p) for p in sources["raw"].glob("*.tar"))
    cfg = RunConfig.from_dict({"run_dir": "/unused", "data": {"sources": [
        {"name": "a", "paths": raw[:3], "weight": 2}, {"name": "b", "paths": raw[3:4], "weight": 1}]}})
    by_source = source_shards(cfg)
    counts = record_counts([s for group in by_source.values() for s in group], cfg.data, None)
    assert counts == {shard: 20 for shard in raw[:4]}
    mixture = plan_mixture(cfg, by_source, counts)
    assert {s.name: s.quota for s in mixture.sources} == {"a": 53, "b": 27}  # 80 samples, 2:1 (largest remainder)


def _effective_rows(run):
    from mmtrain.audit import effective, read_audit

    return effective(read_audit(str(run)))
