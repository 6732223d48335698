"""Run configs: every bad value is a one-line error before Ray starts."""
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from mmtrain.config import ConfigError, RunConfig, load_run_config
from mmtrain.deepspeed_config import build_deepspeed_config


def test_defaults_are_the_tiny_cpu_config():
    cfg = load_run_config(None, data_paths=["x"], run_dir="r")
    assert cfg.preset == "tiny" and cfg.model.width == 128 and cfg.scale.workers == 2
    again = RunConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg  # round trip through the JSON saved with every run


@pytest.mark.parametrize("overrides, words", [
    ({"train": {"zero_stage": 4}}, "zero_stage must be 0, 1, 2 or 3"),
    ({"train": {"batch_size": 0}}, "batch_size must be at least 1"),
    ({"train": {"bogus": 1}}, "unknown config key(s): train.bogus"),
    ({"bogus": 1}, "unknown config key(s): bogus"),
    ({"model": {"depth": 3}}, "unknown model config key(s): depth"),
    ({"preset": "huge"}, "unknown model preset 'huge'"),
    ({"train": {"precision": "fp8"}}, "precision must be one of"),
    ({"train": {"offload_params": True, "zero_stage": 2}}, "offload_params needs zero_stage 3"),
    ({"scale": {"workers": 0}}, "workers must be at least 1"),
    ({"data": {"audio": {"n_mels": 64}}}, "n_mels"),
])
def test_bad_values(overrides, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(None, data_paths=["x"], run_dir="r", **overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(str(tmp_path / "none.json"), data_paths=["x"], run_dir="r")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_run_config(str(bad), data_paths=["x"], run_dir="r")


@pytest.mark.parametrize("name", ["tiny.json", "base.json", "large.json"])
def test_shipped_configs_load(name):
    cfg = load_run_config(str(ROOT / "configs" / name), data_paths=["x"], run_dir="r")
    assert cfg.model.width >= 128


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_is_standard(stage):
    cfg = load_run_config(None, data_paths=["x"], run_dir="r", train={"zero_stage": stage, "grad_accum": 2,
                                                                     "precision": "bf16"})
    ds = build_deepspeed_config(cfg, world_size=4, steps=100, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 32 * 2 * 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["scheduler"]["params"]["total_num_steps"] == 100
    json.dumps(ds)  # plain JSON, usable outside this project


@pytest.mark.parametrize("args, words", [
    (["--zero-stage", "4"], "zero_stage must be 0, 1, 2 or 3"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--max-steps", "3", "--epochs", "2"], "either --max-steps or --epochs"),
])
def test_train_cli_bad_config_one_line(tmp_path, args, words):
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "train", "--data", str(tmp_path),
                        "--run-dir", str(tmp_path / "run"), *args], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


def test_train_cli_missing_data_one_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"train": {"unknown_key": 1}}))
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "train", "--data", str(tmp_path / "nothing"),
                        "--run-dir", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no such shard" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "train", "--data", str(tmp_path),
                        "--run-dir", str(tmp_path / "run"), "--config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "train.unknown_key" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_saved_config_leaves_credentials_out():
    cfg = load_run_config(None, data_paths=["s3://b/x"], run_dir="r", storage_options={
        "key": "AKIA", "secret": "s3cr3t", "token": "t", "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_secret_access_key": "s",
                          "aws_access_key_id": "a", "aws_session_token": "t"}})
    saved = json.loads(cfg.to_json())
    assert saved["storage_options"] == {"anon": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert "s3cr3t" not in cfg.to_json() and cfg.storage_options["secret"] == "s3cr3t"  # kept in memory


def _train_config(*argv):
    """The run config `ray_job.py train ARGV` would train with (parsed, not run)."""
    import ray_job

    args = ray_job.build_parser().parse_args(["train", "--data", "/d", "--run-dir", "/r", *argv])
    return load_run_config(args.config, **ray_job._train_overrides(args))


def test_train_flags_come_from_the_config_fields_and_set_reaches_the_rest():
    cfg = _train_config("--batch-size", "8", "--workers", "3", "--deterministic", "--precision", "bf16",
                        "--set", "train.lr=3e-4", "--set", "train.betas=[0.9, 0.95]", "--set", "model.dropout=0.1",
                        "--set", "data.image.size=160", "--set", "tokenizer=bpe", "--set", "scale.use_gpu=true",
                        "--set", "train.batch_size=4")  # the flag wins over --set
    assert (cfg.train.batch_size, cfg.scale.workers, cfg.train.deterministic) == (8, 3, True)
    assert cfg.train.precision == "bf16"
    assert cfg.train.lr == 3e-4 and cfg.train.betas == (0.9, 0.95) and cfg.model.dropout == 0.1
    assert cfg.data.image.size == 160 and cfg.data.image.min_size == 32 and cfg.tokenizer == "bpe" and cfg.scale.use_gpu
    assert _train_config() == load_run_config(None, data_paths=["/d"], run_dir="/r")  # no flag: the config decides


@pytest.mark.parametrize("argv, words", [
    (["--set", "train.bogus=1"], "unknown config key(s): train.bogus"),
    (["--set", "model.depth=3"], "unknown model config key(s): depth"),
    (["--set", "train.batch_size=eight"], "train.batch_size must be an integer, got 'eight'"),
    (["--set", "train.betas=[0.9]"], "train.betas must be a list of 2"),
    (["--set", "data.image.size=0"], "size must be at least 1, got 0"),
    (["--set", "tokenizer=words"], "tokenizer must be one of byte, bpe, got 'words'"),
    (["--set", "train.lr"], "--set train.lr: expected SECTION.KEY=VALUE"),
    (["--set", "train=1", "--batch-size", "2"], "train.batch_size: train is given both a value and settings"),
])
def test_set_refuses_what_a_config_file_refuses(argv, words):
    with pytest.raises(ConfigError) as e:
        _train_config(*argv)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_every_flag_has_help_text():
    import argparse

    import ray_job

    commands = next(a for a in ray_job.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in commands.choices.items():
        for action in sp._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_every_config_section_checks_itself():
    from pipelines.config import AudioConfig, DataConfig, ImageConfig
    from mmtrain.config import ScaleConfig, TrainConfig
    from mmtrain.model import ModelConfig

    for make, words in [(lambda: ImageConfig(jpeg_quality=101), "jpeg_quality must be at most 100"),
                        (lambda: DataConfig(audio=AudioConfig(sample_rate=0)), "sample_rate must be at least 1"),
                        (lambda: DataConfig(max_sample_members=0), "max_sample_members must be at least 1"),
                        (lambda: TrainConfig(grad_accum=0), "grad_accum must be at least 1"),
                        (lambda: ScaleConfig(cpus_per_worker=-1), "cpus_per_worker must be at least 0"),
                        (lambda: ModelConfig(mel_norm="log"), "mel_norm must be one of none, whisper"),
                        (lambda: DataConfig.from_dict({"image": {"x": 1}}), "unknown data config key(s): image.x"),
                        (lambda: DataConfig.from_dict({"extra_exts": "txt"}), "extra_exts must be a list")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            make()
    assert DataConfig.from_dict(DataConfig().to_dict()) == DataConfig()  # lists come back as tuples


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(tmp_path):
    # a ValueError from a library (json, on a damaged metrics file) is not the user's: exit 1, traceback
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "plot", "--run-dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "JSONDecodeError" in r.stderr, r.stderr
    # a UserError: exit 2, one line
    (tmp_path / "metrics.jsonl").unlink()
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "plot", "--run-dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path} has no metrics.jsonl yet\n", r.stderr


def test_a_damaged_run_config_is_the_users_to_fix_in_one_line(tmp_path):
    # a run's saved config is the user's file: damaged, it is a one-line error, not a traceback
    (tmp_path / "run_config.json").write_text("{cut short")
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "export", "--run-dir", str(tmp_path),
                        "--output", str(tmp_path / "m.safetensors")], capture_output=True, text=True)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert r.returncode == 2 and len(lines) == 1 and "run_config.json is not valid JSON" in lines[0], r.stderr


# --- elastic worker counts (mmtrain/elastic.py) -------------------------------------------

def test_workers_min_max_is_an_elastic_range_and_n_a_fixed_count(tmp_path):
    cfg = _train_config("--workers", "1-4", "--batch-size", "8", "--set", "train.grad_accum=3")  # 96: 1 to 4 divide it
    assert (cfg.scale.min_workers, cfg.scale.workers, cfg.scale.elastic, cfg.scale.fewest) == (1, 4, True, 1)
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg  # saved with the run as two integers
    # a plain count on the command line is fixed, whatever the config file's range says
    config = tmp_path / "elastic.json"
    config.write_text(json.dumps({"scale": {"workers": "1-2"}}))
    assert _train_config("--config", str(config)).scale.described == "1-2"
    fixed = _train_config("--config", str(config), "--workers", "3").scale
    assert (fixed.workers, fixed.min_workers, fixed.elastic) == (3, None, False)
    assert _train_config("--workers", "2-2").scale.elastic is False
    assert _train_config("--set", "scale.workers=1-2", "--set", "scale.resize_check_s=5").scale.resize_check_s == 5


@pytest.mark.parametrize("argv, words", [
    (["--workers", "3-1"], "min_workers 3 is above workers 1"),
    (["--workers", "0-2"], "min_workers must be at least 1, got 0"),
    (["--workers", "1-2", "--deterministic"], "--deterministic gives each of the 2 ranks its own dataset"),
    (["--set", "scale.workers=1-x"], "scale.workers must be an integer, got '1-x'"),
])
def test_a_bad_worker_range_is_one_line(argv, words):
    with pytest.raises(ConfigError) as e:
        _train_config(*argv)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_workers_flag_refuses_what_is_no_count_or_range(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "train", "--data", str(tmp_path),
                        "--run-dir", str(tmp_path / "run"), "--workers", "two"], capture_output=True, text=True)
    assert r.returncode == 2 and "expected N or MIN-MAX (e.g. 2 or 1-4), got 'two'" in r.stderr, r.stderr


@pytest.mark.parametrize("batch, accum, workers, world, expected", [
    (8, 1, "1-2", 1, 2), (8, 1, "1-2", 2, 1),    # 16 samples a step on 1 or 2 workers
    (4, 3, "2-4", 2, 6), (4, 3, "2-4", 3, 4),    # 48: 6, 4 or 3 micro steps
    (4, 3, "2-4", 4, 3),
])
def test_gradient_accumulation_keeps_the_global_batch_on_every_group_size(batch, accum, workers, world, expected):
    from mmtrain.deepspeed_config import for_world_size
    from mmtrain.elastic import accumulation, global_batch

    cfg = _train_config("--workers", workers, "--batch-size", str(batch), "--set", f"train.grad_accum={accum}")
    assert accumulation(cfg.train, cfg.scale, world) == expected
    ds = for_world_size(build_deepspeed_config(cfg, cfg.scale.workers, 100, on_gpu=False), world)
    # DeepSpeed's own rule: train_batch_size = micro batch x accumulation x world size
    assert ds["train_batch_size"] == global_batch(cfg.train, cfg.scale) == batch * expected * world
    assert ds["gradient_accumulation_steps"] == expected


def test_a_count_the_global_batch_does_not_divide_trains_with_the_nearest_below():
    """Ray Train may start any count of the range; no global batch divides by every count of a
    wide one (8-64): 24 samples a step on 3 workers of 8 is 16 on 2 (one micro step each)."""
    from mmtrain.deepspeed_config import for_world_size
    from mmtrain.elastic import accumulation, inexact_counts

    cfg = _train_config("--workers", "2-3", "--batch-size", "8")
    assert inexact_counts(cfg.train, cfg.scale) == [2] and accumulation(cfg.train, cfg.scale, 2) == 1
    ds = for_world_size(build_deepspeed_config(cfg, cfg.scale.workers, 100, on_gpu=False), 2)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (16, 1)
    wide = _train_config("--workers", "8-64", "--batch-size", "64", "--set", "train.grad_accum=2")
    assert 8 not in inexact_counts(wide.train, wide.scale) and 24 in inexact_counts(wide.train, wide.scale)
    assert accumulation(wide.train, wide.scale, 24) == 5  # 8192 // (64 x 24)
