"""`ray_job.py show RUN` on real runs: the demo's finished run (read in place), a copy of it cut
as a kill leaves a run (a metrics line cut short, every checkpoint incomplete, attempts.json
cut, the lock of a driver that died), its checkpoints in a real S3 server (moto on loopback),
and folders that are not runs. Every value is checked against the run's own files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ray_job

ROOT = Path(__file__).resolve().parent.parent


def show(capsys, *args) -> tuple[int, str]:
    rc = ray_job.main(["show", *map(str, args)])
    return rc, capsys.readouterr().out


def show_json(capsys, *args) -> dict:
    rc, out = show(capsys, *args, "--json")
    assert rc == 0
    return json.loads(out)


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def newest_complete(run: Path) -> str:
    """The newest checkpoint folder with train_state.json and a done record from every rank."""
    for folder in sorted((run / "train").glob("checkpoint_[0-9]*"), reverse=True):
        state = folder / "train_state.json"
        if state.exists() and len(list((folder / "done").glob("rank_*"))) == json.loads(state.read_text())["world_size"]:
            return folder.name
    raise AssertionError(f"no complete checkpoint in {run}")


def test_show_the_demo_run(demo_workdir, capsys):
    work, _ = demo_workdir
    run = work / "run"
    o = show_json(capsys, run)
    last = metric_lines(run)[-1]
    newest = newest_complete(run)
    state = json.loads((run / "train" / newest / "train_state.json").read_text())
    config = json.loads((run / "run_config.json").read_text())
    planned = json.loads((run / "deepspeed_config.json").read_text())["scheduler"]["params"]["total_num_steps"]

    assert o["run"] == str(run)
    assert o["metrics"]["last"]["step"] == last["step"] and o["metrics"]["last"]["loss"] == last["loss"]
    assert o["metrics"]["last"]["samples_per_s"] == last["samples_per_s"]
    assert o["metrics"]["lines"] == len(metric_lines(run)) and o["metrics"]["unreadable"] == 0
    assert o["checkpoint"]["latest_complete"] == newest
    assert o["checkpoint"]["storage"] == str(run / "train") and o["checkpoint"]["local"] is True
    assert o["checkpoint"]["state"]["step"] == state["step"] and o["checkpoint"]["incomplete"] == []
    assert o["progress"]["steps_done"] == max(state["step"], last["step"])
    assert o["progress"]["steps_planned"] == planned
    assert o["progress"]["epochs_planned"] == config["train"]["epochs"]
    assert o["progress"]["epochs_done_at_checkpoint"] == state["epoch"]
    assert o["progress"]["finished"] is True
    c = o["config"]
    assert (c["preset"], c["workers"], c["zero_stage"], c["precision"], c["batch_size"], c["data_paths"]) == (
        config["preset"], config["scale"]["workers"], config["train"]["zero_stage"], config["train"]["precision"],
        config["train"]["batch_size"], config["data_paths"])
    assert o["attempts"]["started"] == json.loads((run / "attempts.json").read_text())["started"]
    assert o["state"]["lock"] is None and o["audit"]["recorded"] is False
    assert o["tensorboard"]["folder"] == str(run / "tensorboard") and o["tensorboard"]["event_files"] >= 1
    # the demo writes evaluate's output beside run/ (eval.json, and again in summary.json)
    evaluation = json.loads((work / "eval.json").read_text())
    assert [e["results"] for e in o["evaluation"]] == [evaluation]
    assert str(work / "eval.json") in o["evaluation"][0]["files"]
    assert str(run / "training.png") in o["other_files"]  # the demo plots its run
    assert o["problems"] == []

    rc, text = show(capsys, run)
    assert rc == 0
    assert f"step {last['step']}: loss {last['loss']:.4f}" in text
    assert f"{newest} (step {state['step']}, epoch {state['epoch']}" in text
    assert f"{o['progress']['steps_done']} of {planned} planned" in text
    assert f"ZeRO stage {config['train']['zero_stage']}, {config['train']['precision']}" in text
    assert str(work / "eval.json") in text and f"text_to_image/recall@1 {evaluation['text_to_image/recall@1']:.4g}" in text
    assert f"tensorboard --logdir {run / 'tensorboard'}" in text
    assert len(text.splitlines()) <= 40  # one screen


def _kill_like(run: Path) -> dict:
    """Cuts the copied run as a kill leaves one; returns what was cut."""
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(b"".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    newest, middle, oldest = sorted((run / "train").glob("checkpoint_[0-9]*"), reverse=True)[:3]
    (newest / "done" / "rank_00001").unlink()  # killed before rank 1 finished its part
    model = middle / "ds" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # an upload cut short
    (oldest / "train_state.json").unlink()
    (run / "attempts.json").write_text('{"sta')
    # a driver that dies holding RUN/train.lock (exits without releasing it)
    subprocess.run([sys.executable, "-c", "import os, sys; from mmtrain.run_lock import RunLock; "
                    "RunLock(sys.argv[1]).acquire(); os._exit(0)", str(run)], check=True, cwd=ROOT)
    return {"last": json.loads(lines[-2]), "lines": len(lines), "checkpoints": [newest.name, middle.name, oldest.name]}


def test_show_a_killed_run(demo_workdir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(demo_workdir[0] / "run", run)
    cut = _kill_like(run)
    o = show_json(capsys, run)
    assert o["checkpoint"]["latest_complete"] is None
    why = {i["name"]: i["why"] for i in o["checkpoint"]["incomplete"]}
    newest, middle, oldest = cut["checkpoints"]
    assert set(why) == {newest, middle, oldest}
    assert "rank 1" in why[newest] and "bytes" in why[middle] and "train_state.json" in why[oldest]
    assert o["metrics"]["unreadable"] == 1 and o["metrics"]["lines"] == cut["lines"]
    assert o["metrics"]["last"]["step"] == cut["last"]["step"] and o["metrics"]["last"]["loss"] == cut["last"]["loss"]
    assert o["progress"]["steps_done"] == cut["last"]["step"] and o["progress"]["finished"] is False
    assert o["attempts"]["started"] is None
    assert o["state"]["lock"]["alive"] is False and "no longer exists" in o["state"]["lock"]["why_dead"]
    assert any("metrics.jsonl: 1 of" in p for p in o["problems"])
    assert any("attempts.json is unreadable" in p for p in o["problems"])
    assert o["evaluation"] == []  # nothing beside the copy
    assert o["config"]["workers"] == 2

    rc, text = show(capsys, run)
    assert rc == 0
    assert text.splitlines()[1].startswith("state        stopped before the end")
    assert "no complete checkpoint yet" in text and "1 unreadable" in text and "killed or lost" in text
    assert f"step {cut['last']['step']}: loss {cut['last']['loss']:.4f}" in text
    assert f"incomplete   {newest}: " in text


def test_show_a_run_without_checkpoints_or_config(tmp_path, capsys):
    """A run killed in its first steps: metrics.jsonl only, its one line cut."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 5.5, "epoch": 0}\n{"step": 20, "lo')
    o = show_json(capsys, run)
    assert o["config"] is None and o["checkpoint"]["latest_complete"] is None and o["checkpoint"]["all"] == []
    assert o["metrics"]["last"]["loss"] == 5.5 and o["metrics"]["unreadable"] == 1
    assert o["progress"]["steps_done"] == 10 and o["progress"]["steps_planned"] is None
    rc, text = show(capsys, run)
    assert rc == 0 and "run_config.json missing or unreadable" in text and "10 of ? planned" in text


def test_show_says_what_audit_says(tmp_path, capsys):
    """A run's sample audit, written by the workers' own AuditFile: show's verdict is the
    `audit` command's (here: one sample served twice in epoch 0)."""
    from mmtrain.attempts import AuditFile

    run = tmp_path / "run"
    run.mkdir()
    (run / "attempts.json").write_text('{"started": 1}')
    for rank, steps in ((0, [[("s", "a", 0), ("s", "b", 0)], [("s", "a", 0)]]), (1, [[("s", "c", 0)], [("s", "d", 0)]])):
        audit = AuditFile(str(run), rank, attempt=0)
        for step, ids in enumerate(steps, start=1):
            audit.write(step, ids)
        audit.close()
    o = show_json(capsys, run)
    assert ray_job.main(["audit", "--run-dir", str(run), "--json"]) == 1  # not exactly once
    report = json.loads(capsys.readouterr().out)
    assert o["audit"]["recorded"] is True and o["audit"]["exactly_once"] is report["exactly_once"] is False
    assert o["audit"]["served_twice"] == report["epochs"]["0"]["served_twice"] == 1
    assert o["audit"]["rows"] == report["rows"] == 4 and o["attempts"] == {"started": 1, "restarts": 0}
    rc, text = show(capsys, run)
    assert rc == 0 and "1 sample served twice (4 rows, 1 epoch, 1 attempt" in text


def test_show_checkpoints_in_s3(demo_workdir, tmp_path, s3_bucket, s3_server, capsys):
    """A run whose --checkpoint-storage is a bucket: the newest complete checkpoint is found there."""
    bucket, fs = s3_bucket
    src = demo_workdir[0] / "run"
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("train"))
    config = json.loads((run / "run_config.json").read_text())
    config["checkpoint_storage"] = f"s3://{bucket}/ckpt"
    (run / "run_config.json").write_text(json.dumps(config))
    newest = newest_complete(src)
    fs.put(str(src / "train" / newest), f"{bucket}/ckpt/train/{newest}", recursive=True)
    o = show_json(capsys, run, "--storage-options", json.dumps(s3_server["storage_options"]))
    assert o["checkpoint"]["storage"] == f"s3://{bucket}/ckpt/train" and o["checkpoint"]["local"] is False
    assert o["checkpoint"]["latest_complete"] == newest and o["checkpoint"]["all"] == [newest]
    rc, text = show(capsys, run, "--storage-options", json.dumps(s3_server["storage_options"]))
    assert rc == 0 and f"s3://{bucket}/ckpt/train (remote, --checkpoint-storage; 1 checkpoint)" in text

    # the whole run in the bucket, RUN given as its URL: its checkpoints are in RUN/train
    remote = f"s3://{bucket}/run"
    for name in ("run_config.json", "metrics.jsonl", "attempts.json", "deepspeed_config.json"):
        fs.put(str(src / name), f"{bucket}/run/{name}")
    fs.put(str(src / "train" / newest), f"{bucket}/run/train/{newest}", recursive=True)
    o = show_json(capsys, remote, "--storage-options", json.dumps(s3_server["storage_options"]))
    assert o["run"] == remote and o["checkpoint"]["storage"] == f"{remote}/train"
    assert o["checkpoint"]["latest_complete"] == newest
    assert o["metrics"]["last"]["loss"] == metric_lines(src)[-1]["loss"]
    assert o["state"]["lock"] is None and "not local" in o["state"]["note"]


@pytest.mark.parametrize("what", ["missing", "not a run"])
def test_show_refuses_what_is_not_a_run(tmp_path, what):
    target = tmp_path / "nothing"
    if what == "not a run":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    r = subprocess.run([sys.executable, "ray_job.py", "show", str(target)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert str(target) in r.stderr and ("does not exist" if what == "missing" else "not a training run") in r.stderr


def test_show_imports_neither_torch_nor_ray(demo_workdir):
    """`show` reads files: a run with checkpoints is shown without importing torch, Ray or
    DeepSpeed (seconds each), checkpoint listing included."""
    code = ("import json, sys, ray_job; rc = ray_job.main(['show', sys.argv[1], '--json']); "
            "print(json.dumps([m for m in ('torch', 'ray', 'deepspeed', 'mlflow') if m in sys.modules]), file=sys.stderr); "
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(demo_workdir[0] / "run")], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["checkpoint"]["latest_complete"] is not None  # the checkpoint store was listed
    assert json.loads(r.stderr.strip().splitlines()[-1]) == []
