"""CPU to GPU by configuration alone: `--gpus-per-worker G` and `--use-gpu` on the command line,
and the shipped GPU configs and cluster definitions agreeing on those keys (parsed, not run)."""
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from mmtrain.config import ConfigError, load_run_config
from test_clusters import CLUSTERS, load
from test_config import _train_config


@pytest.mark.parametrize("argv, use_gpu, gpus", [
    ([], False, 1.0),                                                   # the tiny CPU default
    (["--gpus-per-worker", "1"], True, 1.0),                            # a CPU config moves to GPUs with one flag
    (["--gpus-per-worker", "0.5", "--workers", "1"], True, 0.5),    # one worker may share a GPU
    (["--use-gpu"], True, 1.0),
    (["--use-gpu", "--gpus-per-worker", "2"], True, 2.0),
    (["--config", str(ROOT / "configs" / "base.json")], True, 1.0),
    (["--config", str(ROOT / "configs" / "base.json"), "--gpus-per-worker", "0"], False, 0.0),  # GPU config on CPUs
    (["--set", "scale.use_gpu=true", "--gpus-per-worker", "0"], False, 0.0),  # the flag wins over --set
])
def test_gpus_per_worker_on_the_command_line_sets_use_gpu(argv, use_gpu, gpus):
    cfg = _train_config(*argv)
    assert (cfg.scale.use_gpu, cfg.scale.gpus_per_worker) == (use_gpu, gpus)


def test_gpu_flags_refuse_contradictions_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "train", "--data", str(tmp_path), "--run-dir",
                        str(tmp_path / "run"), "--use-gpu", "--gpus-per-worker", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == ("error: --use-gpu with --gpus-per-worker 0: give each worker a GPU, "
                                              "or leave out --use-gpu to train on CPUs\n"), r.stderr
    with pytest.raises(ConfigError, match="use_gpu needs gpus_per_worker above 0"):  # the same in a config file
        _train_config("--set", "scale.use_gpu=true", "--set", "scale.gpus_per_worker=0")
    # two ranks on one GPU: NCCL refuses them
    with pytest.raises(ConfigError, match="2 workers on GPUs need at least one GPU each"):
        _train_config("--gpus-per-worker", "0.5", "--workers", "2")
    # the collective guard watches every torch call from Python, which torch.compile cannot trace
    with pytest.raises(ConfigError, match="check_collectives .* use it without compile"):
        _train_config("--compile", "--set", "train.check_collectives=true")


def test_train_help_names_the_forms_of_the_gpu_and_profile_flags():
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "train", "-h"], capture_output=True, text=True)
    usage = " ".join(r.stdout.split())
    assert "--profile-steps A:B" in usage and "--gpus-per-worker G" in usage and "--use-gpu" in usage
    assert _train_config("--profile-steps", "3:5").train.profile_range == (3, 5)


def _gpu_pools():
    """(where, GPUs per node, CPUs per node) of every GPU pool in clusters/."""
    pools = []
    for name in ("aws.yaml", "gcp.yaml"):
        for node, t in load(CLUSTERS / name)["available_node_types"].items():
            if t["resources"].get("GPU"):
                pools.append((f"{name}:{node}", t["resources"]["GPU"], t["resources"]["CPU"]))
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = load(CLUSTERS / "kuberay" / name)
        for g in doc["spec"].get("rayClusterSpec", doc["spec"])["workerGroupSpecs"]:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            if int(limits.get("nvidia.com/gpu", 0)):
                pools.append((f"{name}:{g['groupName']}", int(limits["nvidia.com/gpu"]), int(limits["cpu"])))
    return pools


@pytest.mark.parametrize("config", ["base.json", "large.json"])
def test_gpu_configs_fit_the_gpu_pools_node_by_node(config):
    """Every GPU pool's nodes hold whole workers of the shipped GPU configs: their GPUs per
    worker divide a node's GPUs, and the CPUs of a node's workers fit in its CPUs."""
    scale = load_run_config(str(ROOT / "configs" / config), data_paths=["x"], run_dir="r").scale
    assert scale.use_gpu and scale.gpus_per_worker >= 1
    pools = _gpu_pools()
    assert len(pools) == 4
    for where, gpus, cpus in pools:
        per_node = gpus // scale.gpus_per_worker
        assert per_node >= 1 and per_node * scale.gpus_per_worker == gpus, where
        assert per_node * scale.cpus_per_worker <= cpus, where


def test_the_rayjob_trains_with_the_gpu_keys_its_pods_have():
    """The RayJob's entrypoint parses as `ray_job.py train` and asks for what its pods give."""
    doc = load(CLUSTERS / "kuberay" / "rayjob.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert re.search(r"ray_job\.py$", argv[1]) and argv[2] == "train"
    argv = [a.replace("/home/ray/raymm/", str(ROOT) + "/") for a in argv[3:]]
    assert "--gpus-per-worker" in argv
    cfg = _train_config(*argv)
    (gpu,) = [g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    pod_gpus = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.scale.use_gpu and cfg.scale.workers * cfg.scale.gpus_per_worker == gpu["maxReplicas"] * pod_gpus
