"""train_loop_per_worker: what each Ray Train worker runs. Reads top to bottom:
set up and restore -> for each pass of epochs: set the epoch clock, stream batches in
lockstep, step, log, checkpoint -> the last checkpoint and the probe (worker.py)."""
from __future__ import annotations

import time

import ray

from .device import any_rank
from .mlflow_tracking import MlflowMetrics
from .profiling import StepProfiler
from .worker import Worker
from .worker_plan import WorkerPlan


def train_loop_per_worker(config: dict) -> None:
    plan = WorkerPlan.from_loop_config(config)
    # the credentials come as an object reference, not in the config (see WorkerPlan)
    worker = Worker(plan, storage_options=ray.get(config["storage_options"]))
    if plan.fault is not None:
        worker.hooks.append(plan.fault)
    profiler = StepProfiler.attach(worker)  # --profile-steps: a hook on the worker, else None
    MlflowMetrics.attach(worker)  # --mlflow: rank 0's metrics writer also logs to the MLflow run
    while worker.has_work_left():
        for batch, _, waited in lockstep(worker.start_pass(), worker.collate.empty, worker.device):
            if worker.train_on(batch, waited) and worker.state.step >= worker.max_steps:
                break
        worker.end_pass()
    if profiler is not None:
        profiler.close(worker)
    worker.finish()


def lockstep(batches, empty_batch, device):
    """Yields (batch, is_real, seconds blocked on the data) until every rank has run out.

    Ranks get unequal numbers of rows (a dynamic split, or ids filtered on resume). A rank
    that runs out keeps stepping on an empty batch (loss 0, no samples) so collectives stay
    matched, until all ranks are done: no rank hangs, and no rank drops its last rows.
    The flag is reduced on the training `device`, where the process group takes it.
    """
    it = iter(batches)
    while True:
        started = time.perf_counter()
        batch = next(it, None)
        waited = time.perf_counter() - started  # not the all-reduce below: that is waiting for peers
        if not any_rank(batch is not None, device):
            return
        yield (batch, True, waited) if batch is not None else (empty_batch(), False, waited)
