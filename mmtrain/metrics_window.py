"""What one metrics line reports: sums over the micro-steps since the last line, reduced over
ranks when the line is written (every rank calls `report`: it is a collective)."""
from __future__ import annotations

import time

import numpy as np

from pipelines.mixture import source_of_part

from .device import sum_over_ranks
from .efficiency import EfficiencyMeter

LOSS_KEYS = ("loss", "loss_image_text", "loss_image_audio", "loss_text_audio", "loss_caption")


class MetricsWindow:
    def __init__(self, meter: EfficiencyMeter | None = None, sources: tuple[str, ...] = ()):
        self.meter = meter  # tflops_per_s, mfu and peak memory on every line (efficiency.py)
        self.sources = sources  # a mixture's source names: samples_NAME on every line
        self.reset()

    def reset(self):
        self.per_source = {name: 0 for name in self.sources}
        self.sums = {k: 0.0 for k in LOSS_KEYS}
        self.micro, self.samples, self.tokens, self.wait = 0, 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, out: dict, ids: list, inputs: dict) -> None:
        # the sums stay tensors on the training device (float64: the same sums python floats give)
        # until `report`: reading a GPU value is a host-device sync, once per line, not per step
        for k in LOSS_KEYS:
            self.sums[k] = self.sums[k] + out[k].detach().double()
        self.micro += 1
        self.samples += len(ids)
        for _, _, part in ids if self.sources else ():
            self.per_source[source_of_part(part)] += 1
        self.tokens = self.tokens + ((inputs["text_ids"] > 0) & inputs["text_present"].bool()[:, None]).sum()
        if self.meter is not None:
            self.meter.count(inputs)

    def report(self, engine, world: int, device) -> dict:
        """`device`: the training device, where the sums are reduced."""
        elapsed = time.perf_counter() - self.start
        flops = self.meter.take_flops() if self.meter is not None else 0.0
        sums = [float(v) for v in self.sums.values()]
        counts = list(self.per_source.values())
        vec = sum_over_ranks([*sums, self.micro, self.samples, int(self.tokens), flops, *counts, self.wait, elapsed],
                             device)
        n = max(vec[len(LOSS_KEYS)].item(), 1.0)
        values = {k: vec[i].item() / n for i, k in enumerate(LOSS_KEYS)}
        samples, tokens = vec[len(LOSS_KEYS) + 1].item(), vec[len(LOSS_KEYS) + 2].item()
        wait, total = vec[-2].item() / world, vec[-1].item() / world
        norm = engine.get_global_grad_norm()
        values.update({
            "samples": int(samples),
            "samples_per_s": samples / max(total, 1e-9),
            "tokens_per_s": tokens / max(total, 1e-9),
            "data_wait_frac": wait / max(total, 1e-9),
            "lr": float(engine.get_lr()[0]),
            "grad_norm": float(norm) if norm is not None and np.isfinite(float(norm)) else None,
        })
        first = len(LOSS_KEYS) + 4
        values.update({f"samples_{name}": int(vec[first + i].item()) for i, name in enumerate(self.sources)})
        if self.meter is not None:
            values.update(self.meter.values(vec[len(LOSS_KEYS) + 3].item() / world, total))
        self.reset()
        return values
