"""The efficiency metrics' parts (mmtrain/efficiency.py): the peak table, the FLOPs of a batch, and
what a metrics line gets on CPU. Every log line of a real run carrying them is checked in
tests/test_guarantees_train.py (the reference run and the negative control)."""
import os

import pytest
import torch

from mmtrain.efficiency import EfficiencyMeter, device_peak_tflops, peak_bf16_tflops
from mmtrain.metrics import MetricsWriter, read_metric_lines
from mmtrain.model import PRESETS, ModelConfig, build_model, flops_per_sample, token_counts
from mmtrain.model.flops import flops_per_batch, head_flops_per_target


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A10G", 125.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0),
    ("NVIDIA B200", 2250.0),
    ("Tesla V100-SXM2-16GB", None),  # no bf16 tensor cores
    ("NVIDIA GeForce RTX 3060", None),
])
def test_peak_bf16_tflops_by_the_name_torch_reports(name, tflops):
    assert peak_bf16_tflops(name) == tflops


def test_a_configured_peak_wins_and_a_cpu_has_none():
    cpu = torch.device("cpu")
    assert device_peak_tflops(cpu, None, rank=0) is None
    assert device_peak_tflops(cpu, 2.5, rank=0) == 2.5


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_a_batch_costs_its_rows_times_a_sample(preset):
    cfg = PRESETS[preset]
    per_sample = flops_per_sample(cfg, *token_counts(cfg, 224, 64, 1001))
    assert flops_per_batch(cfg, 16, 224, 64, 1001) == pytest.approx(16 * per_sample, rel=1e-12)
    # the head counted at every decoder position is what flops_per_sample assumes
    assert flops_per_batch(cfg, 16, 224, 64, 1001, caption_targets=16 * 63) == pytest.approx(16 * per_sample,
                                                                                            rel=1e-12)
    no_head = flops_per_batch(cfg, 16, 224, 64, 1001, caption_targets=0)
    assert 16 * per_sample - no_head == pytest.approx(16 * 63 * head_flops_per_target(cfg), rel=1e-9)


def test_the_meter_counts_the_head_where_the_model_applies_it_and_reports_null_on_cpu():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = build_model(cfg)
    head_rows = []
    model.decoder.head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[0]))
    B, S, L, T = 4, 64, 16, 100
    batch = {"image": torch.randn(B, 3, S, S), "image_present": torch.tensor([1, 1, 0, 0]).bool(),
             "text_ids": torch.randint(3, 200, (B, L)), "text_present": torch.tensor([1, 0, 1, 1]).bool(),
             "mel": torch.randn(B, 80, T), "mel_frames": torch.tensor([100, 50, 0, 30]),
             "audio_present": torch.tensor([1, 1, 1, 0]).bool()}
    batch["text_ids"][:, 10:] = 0
    batch["text_ids"][0, 6:] = 0
    # captions on rows 0 (with an image), 2 (a clip of 0 frames: nothing to caption from) and 3 (nothing)
    with torch.no_grad():
        model(batch)
    assert head_rows == [5]

    meter = EfficiencyMeter(cfg, torch.device("cpu"))
    meter.count(batch)
    meter.count(batch)
    assert meter.take_flops() == pytest.approx(2 * flops_per_batch(cfg, B, S, L, T, caption_targets=5))
    assert meter.take_flops() == 0.0  # taken: the next line counts from zero
    assert meter.values(3e12, 2.0) == {"tflops_per_s": 1.5, "mfu": None, "gpu_mem_allocated_gb": None,
                                       "gpu_mem_reserved_gb": None}
    assert EfficiencyMeter(cfg, torch.device("cpu"), peak_tflops=3.0).values(3e12, 2.0)["mfu"] == 0.5

    # a compiled model applies the head at every decoder position of every row
    compiled = EfficiencyMeter(cfg, torch.device("cpu"), head_everywhere=True)
    compiled.count(batch)
    assert compiled.take_flops() == pytest.approx(flops_per_batch(cfg, B, S, L, T, caption_targets=B * (L - 1)))


def test_null_metrics_are_written_as_null_and_do_not_break_tensorboard(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=True)
    for step in (1, 2):
        writer.log(step, {"loss": 1.0 / step, "tflops_per_s": 0.25, "mfu": None, "gpu_mem_allocated_gb": None})
    writer.close()
    lines = read_metric_lines(str(tmp_path))
    assert [(m["tflops_per_s"], m["mfu"], m["gpu_mem_allocated_gb"]) for m in lines] == [(0.25, None, None)] * 2
    assert os.listdir(tmp_path / "tensorboard")
