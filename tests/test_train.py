"""Training end to end: real Ray Train, real DeepSpeed ZeRO on 2 CPU workers, real shards."""
import glob
import gzip
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, cli
from mmtrain.audit import manifest_ids, read_audit
from mmtrain.checkpoint import CheckpointStore
from mmtrain.export import load_exported, verify_probe
from mmtrain.metrics import read_metric_lines


def train_one_epoch(small_data, run, stage, *extra, cwd=ROOT):
    # 48 samples, 2 workers x 8 per step: 3 steps per epoch if the split is even, more if not
    cli("train", "--data", small_data, "--run-dir", run, "--zero-stage", stage, "--epochs", 1,
        "--batch-size", 8, "--checkpoint-every", 2, "--audit-samples", *extra, cwd=cwd)


@pytest.fixture(scope="module")
def default_run(small_data, tmp_path_factory):
    """The stage-2 (default) run, which test_evaluate_writes_flat_json evaluates, plots and
    reads the profile of: one training for both. Its --run-dir is relative (the workers, whose
    working directory is elsewhere, must still find it) and it ends inside --profile-steps'
    range (the trace holds what was recorded, on every rank)."""
    folder = tmp_path_factory.mktemp("default_run")
    train_one_epoch(small_data, "run", 2, "--profile-steps", "2:1000", cwd=folder)
    return folder


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_checkpoints_and_exports(small_data, tmp_path, stage):
    train_one_epoch(small_data, tmp_path / "run", stage)
    check_trained_checkpointed_and_exported(small_data, tmp_path, stage)


def test_zero_stage_2_trains_checkpoints_and_exports(small_data, default_run):
    check_trained_checkpointed_and_exported(small_data, default_run, 2)


def check_trained_checkpointed_and_exported(small_data, folder, stage):
    run = folder / "run"
    rows = read_audit(str(run))
    last = max(r["step"] for r in rows)
    metrics = read_metric_lines(str(run))
    assert [m["step"] for m in metrics] == [last]  # log_every 10: only the last step is logged
    m = metrics[0]
    assert math.isfinite(m["loss"]) and m["loss"] > 0 and 0 <= m["data_wait_frac"] <= 1 and m["samples"] > 0
    assert {"loss_image_text", "loss_caption", "samples_per_s", "tokens_per_s", "lr", "grad_norm"} <= set(m)
    assert (run / "tensorboard").is_dir() and os.listdir(run / "tensorboard")
    ds_config = json.load(open(run / "deepspeed_config.json"))
    assert ds_config["zero_optimization"]["stage"] == stage

    store = CheckpointStore(str(run / "train"))
    ckpts = store.list()
    assert os.path.basename(ckpts[0]) == "checkpoint_000000002"
    assert os.path.basename(ckpts[-1]) == f"checkpoint_{last:09d}"
    assert all(store.is_complete(c) for c in ckpts)
    optim = glob.glob(os.path.join(ckpts[-1], "ds", "*optim_states.pt"))
    assert len(optim) == 2  # every rank's ZeRO partition is in the one checkpoint

    # the epoch served every sample exactly once
    epoch0 = [(source, key) for r in rows for source, key, epoch in r["ids"] if epoch == 0]
    assert len(epoch0) == len(set(epoch0)) and set(epoch0) == manifest_ids([str(small_data)])
    assert {r["step"] for r in rows} == set(range(1, last + 1))

    out = cli("export", "--run-dir", run, "--output", folder / "model.safetensors")
    assert "matches the training engine" in out.stdout
    model, model_cfg, meta = load_exported(str(folder / "model.safetensors"))
    assert isinstance(model, torch.nn.Module) and model_cfg.width == 128
    assert verify_probe(model, str(run)) < 1e-5  # the bare model reproduces the engine's outputs


def test_evaluate_writes_flat_json(small_data, default_run, tmp_path):
    run = default_run / "run"
    last = max(r["step"] for r in read_audit(str(run)))
    traces = sorted(os.listdir(run / "profile"))
    assert [t.split(".")[0] for t in traces] == ["rank0", "rank1"] and all(t.endswith(".pt.trace.json.gz")
                                                                         for t in traces)
    # a run given in epochs finds its end when the data runs out: the range it opened for the
    # step after its last is in the trace too (the "endless" rows of the profiling test below)
    for t in traces:
        assert profiled_steps(run / "profile" / t) == sorted(f"ProfilerStep#{s}" for s in range(2, last + 2))
    cli("evaluate", "--run-dir", run, "--data", small_data, "--output", tmp_path / "eval.json")
    result = json.load(open(tmp_path / "eval.json"))
    for direction in ("image_to_text", "text_to_image", "image_to_audio", "audio_to_text"):
        assert 0 <= result[f"{direction}/recall@1"] <= result[f"{direction}/recall@5"] <= 1
    assert result["caption_loss"] > 0 and result["samples"] == 48
    assert all(not isinstance(v, (dict, list)) for v in result.values())
    cli("plot", "--run-dir", run)
    assert os.path.getsize(run / "training.png") > 1000


def profiled_steps(trace) -> list[str]:
    """The ProfilerStep#N ranges of a gzipped torch.profiler trace (a Chrome trace: what
    TensorBoard's profiler plugin reads), checked to hold operator events too."""
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    assert sum(e.get("cat") == "cpu_op" for e in events) > 10
    return sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})


def test_profiling_starts_at_its_first_step_also_on_a_resume_past_it(tmp_path, capsys):
    """The --profile-steps hook on a stand-in for the worker (the attributes it reads), over
    real torch work: a run resumed inside the range profiles the rest, one past it nothing."""
    from types import SimpleNamespace

    from mmtrain.config import load_run_config
    from mmtrain.profiling import StepProfiler

    def worker(step, profile_steps, max_steps):
        cfg = load_run_config(None, data_paths=["x"], run_dir=str(tmp_path / f"run{step}"),
                              train={"profile_steps": profile_steps})
        return SimpleNamespace(cfg=cfg, rank=0, device=torch.device("cpu"), hooks=[], state=SimpleNamespace(step=step),
                               max_steps=max_steps)

    endless = float("inf")  # a run given in epochs: its end is found when the data runs out
    for start, steps, max_steps, last, profiled, said in [
            (0, "2:3", 5, 5, ["ProfilerStep#2", "ProfilerStep#3"], "profile of steps 2 to 3 written"),
            (2, "2:4", 5, 5, ["ProfilerStep#3", "ProfilerStep#4"], "resumes after step 2: profiling steps 3 to 4"),
            (5, "2:4", 7, 7, [], "resumes after step 5, past the range: nothing is profiled"),
            (0, "2:4", 1, 1, [], "ended after step 1, before the range: nothing is profiled"),
            (0, "2:4", endless, 1, [], "ended after step 1, before the range: nothing is profiled"),
            (0, "2:4", endless, 3, ["ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"],
             "the run ended after step 3, inside the range")]:
        w = worker(start, steps, max_steps)
        hook = StepProfiler.attach(w)
        assert w.hooks == [hook]
        while w.state.step < last:
            torch.randn(64, 64) @ torch.randn(64, 64)
            w.state.step += 1
            hook.after_step(w)
        hook.close(w)
        folder = tmp_path / f"run{start}" / "profile"
        traces = sorted(folder.glob("rank0.*.pt.trace.json.gz")) if folder.exists() else []
        assert [profiled_steps(t) for t in traces] == ([profiled] if profiled else []), (start, steps)
        assert said in capsys.readouterr().out, (start, steps)
        shutil.rmtree(tmp_path / f"run{start}", ignore_errors=True)


def test_an_embedded_ray_refuses_workers_it_cannot_place(small_data, tmp_path):
    # an embedded Ray with 2 CPUs and no GPU to spare (as a preprocess step in the same process
    # would start it): workers asking for more GPUs than it has, or 2 one-CPU workers, would
    # wait forever to be placed or for their first batch
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from pipelines.runtime import local_mode_env, init_ray\n"
            "local_mode_env(); init_ray(num_cpus=2)\n"
            "from mmtrain.config import ConfigError, load_run_config\n"
            "from mmtrain.trainer import train\n"
            "for scale in ({'use_gpu': True, 'workers': 1, 'gpus_per_worker': 64}, {},\n"
            "              {'use_gpu': True, 'workers': 2, 'min_workers': 1, 'gpus_per_worker': 64},\n"
            "              {'workers': 2, 'min_workers': 1}):\n"
            "    try:\n"
            f"        train(load_run_config(None, data_paths=[{str(small_data)!r}], run_dir={str(tmp_path / 'run')!r},"
            " scale=scale))\n"
            "    except ConfigError as e:\n"
            "        print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    refused = [line for line in r.stdout.splitlines() if line.startswith("refused:")]
    assert len(refused) == 4, r.stdout
    assert "the training workers need 64 GPUs (1 x gpus_per_worker 64) and Ray found" in refused[0]
    assert "Ray has 2 CPUs and the 2 training workers hold 2: none is left for the data pipeline" in refused[1]
    # elastic (--workers 1-2): it starts with what there is, so its fewest workers' GPUs must exist;
    # its group grows to the most that fit, so the CPUs left to the data are counted with those
    assert "the training workers need 64 GPUs (1 x gpus_per_worker 64) and Ray found" in refused[2]
    assert "Ray has 2 CPUs and the 2 training workers hold 2: none is left for the data pipeline" in refused[3]
