"""`--profile-steps A:B`: a torch.profiler trace of optimizer steps A to B (both included) on
every rank, written to RUN/profile/ where TensorBoard reads it (`tensorboard --logdir
RUN/profile` with the torch-tb-profiler plugin; the `.pt.trace.json.gz` files also open in
Perfetto or chrome://tracing).

A worker hook (see worker.py): it starts recording before step A, marks each optimizer step
with the `ProfilerStep#N` range TensorBoard's step view reads, and writes the trace after step
B. A run resumed past A profiles the steps of the range still to come, one resumed past B
profiles nothing, and a run that ends inside the range writes what it recorded (`close`);
rank 0 says each of these in one line.

torch's own step marking (`profile.step()` with a `schedule`) numbers steps from 0 and starts
from the profiler's construction; the range here is in optimizer steps and may start part-way
(a resume), so the hook starts and stops the profiler itself and opens the same named range.
"""
from __future__ import annotations

import os

import torch
from torch.profiler import ProfilerActivity, profile, record_function, tensorboard_trace_handler

FOLDER = "profile"


class StepProfiler:
    def __init__(self, first: int, last: int, directory: str, rank: int, on_gpu: bool):
        self.first, self.last, self.directory, self.rank, self.on_gpu = first, last, directory, rank, on_gpu
        self.prof: profile | None = None
        self.step_range = None  # the open ProfilerStep#N range
        self.started_at: int | None = None

    @classmethod
    def attach(cls, worker) -> StepProfiler | None:
        """The hook for the worker's --profile-steps, added to its hooks (None without the flag);
        it starts at once when the worker stands at or inside the range (A = 1, or a resume)."""
        span = worker.cfg.train.profile_range
        if span is None:
            return None
        hook = cls(*span, os.path.join(worker.cfg.run_dir, FOLDER), worker.rank, worker.device.type == "cuda")
        worker.hooks.append(hook)
        step = worker.state.step
        if step >= hook.last:
            hook._say(f"profile_steps {hook.first}:{hook.last}: the run resumes after step {step}, past the range: "
                      f"nothing is profiled")
        elif hook.first - 1 <= step < worker.max_steps:
            hook._start(step + 1)
        return hook

    def after_step(self, worker) -> None:
        step = worker.state.step
        if self.prof is None:
            if step == self.first - 1 and step < worker.max_steps:
                self._start(step + 1)
            return
        self.step_range.__exit__(None, None, None)
        if step >= worker.max_steps and step < self.last:
            self._say(f"profile_steps {self.first}:{self.last}: the run ends after step {step}, inside the range")
        if step >= min(self.last, worker.max_steps):
            self._stop(step)
        else:
            self._open_step(step + 1)

    def inside_save(self, worker) -> None:
        pass  # a save inside the range is part of its step's trace

    def close(self, worker) -> None:
        """At the end of the run. A run given in epochs may end inside the range, found only when
        its data runs out: the trace is written as it stands, its last ProfilerStep range holding
        that end of the stream (a run given in steps stops the trace at its last step)."""
        step = worker.state.step
        if self.prof is not None and step >= self.started_at:
            self.step_range.__exit__(None, None, None)
            self._say(f"profile_steps {self.first}:{self.last}: the run ended after step {step}, inside the range")
            self._stop(step)
        elif self.prof is not None:  # started for a step that never came: nothing to write
            self.prof.on_trace_ready = None
            self.step_range.__exit__(None, None, None)
            self.prof.stop()
            self._say(f"profile_steps {self.first}:{self.last}: the run ended after step {step}, before the range: "
                      f"nothing is profiled")
        elif self.started_at is None and step < self.first:
            self._say(f"profile_steps {self.first}:{self.last}: the run ended after step {step}, before the range: "
                      f"nothing is profiled")

    def _start(self, step: int) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_gpu else [])
        # shapes and memory for TensorBoard's operator and memory views; Python stacks are left
        # out: they multiply the trace's size and the profiler's overhead
        self.prof = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False,
                            on_trace_ready=tensorboard_trace_handler(self.directory, worker_name=f"rank{self.rank}",
                                                                     use_gzip=True))
        self.started_at = step
        if step > self.first:
            self._say(f"profile_steps {self.first}:{self.last}: the run resumes after step {step - 1}: profiling "
                      f"steps {step} to {self.last}")
        self.prof.start()
        self._open_step(step)

    def _open_step(self, step: int) -> None:
        self.step_range = record_function(f"ProfilerStep#{step}")
        self.step_range.__enter__()

    def _stop(self, step: int) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()  # the last step's kernels belong to its trace
        self.prof.stop()  # writes the trace (on_trace_ready)
        self.prof = self.step_range = None
        self._say(f"profile of steps {self.started_at} to {step} written to {self.directory}")

    def _say(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)
