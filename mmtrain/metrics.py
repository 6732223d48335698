"""Training metrics: JSON lines (RUN/metrics.jsonl) and TensorBoard (RUN/tensorboard/),
written by rank 0, plus a PNG plot of a finished or running run."""
from __future__ import annotations

import json
import math
import os
import time

from pipelines.errors import UserError


class MetricsWriter:
    """Appends one JSON object per logged step; TensorBoard gets the same scalars.

    A resumed run appends to the same file; `read_metrics` keeps the last record of each
    step, so steps replayed after a restart don't appear twice in plots.
    """

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:  # tensorboard is a dependency, but metrics must not die with it
            self._tb = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metric_lines(run_dir: str) -> list[dict]:
    """Every record of RUN/metrics.jsonl in the order written: a resumed run's replayed steps
    appear again (what the fault-tolerance tests and the resume benchmark look at). [] when
    the run has logged nothing yet."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics(run_dir: str) -> list[dict]:
    """The last record of each step, by step: what a run's curve is."""
    by_step = {rec["step"]: rec for rec in read_metric_lines(run_dir)}
    return [by_step[s] for s in sorted(by_step)]


def plot_run(run_dir: str, output: str | None = None) -> str:
    """loss (and its parts) and throughput against step, as a PNG; the title says the mean
    tflops_per_s where the run logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{run_dir} has no metrics.jsonl yet")
    output = output or os.path.join(run_dir, "training.png")
    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in ("loss", "loss_image_text", "loss_image_audio", "loss_text_audio", "loss_caption"):
        if key in records[0]:
            ax1.plot(steps, [r.get(key) for r in records], label=key, lw=2 if key == "loss" else 1)
    ax1.set_xlabel("step"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
    ax1.set_title("loss")
    ax2.plot(steps, [r.get("samples_per_s") for r in records], label="samples/s")
    ax2.set_xlabel("step"), ax2.set_ylabel("samples/s"), ax2.grid(alpha=0.3)
    twin = ax2.twinx()
    twin.plot(steps, [100 * r.get("data_wait_frac", 0) for r in records], color="tab:red", alpha=0.6,
              label="data wait %")
    twin.set_ylabel("data wait (% of step)")
    tflops = [r["tflops_per_s"] for r in records if r.get("tflops_per_s") is not None]
    ax2.set_title("throughput" + (f", {sum(tflops) / len(tflops):.3g} TFLOP/s per worker (mean)" if tflops else ""))
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
