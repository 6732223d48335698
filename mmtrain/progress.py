"""Training progress on the driver, fed by rank 0's log steps.

Rank 0 pushes one record per log step (step, epoch, loss, samples/s, data wait), one when a
worker group starts (the step it resumes at, its attempt) and the notices the user must hear
(a fallback to an older checkpoint) to a small named actor, the progress board, which the
driver creates and owns; a thread of the driver reads it while `trainer.fit()` blocks and
draws a live bar on a terminal, or one plain line per log step elsewhere (a file, a
`submit --wait` log): `step 40/200 epoch 1/20 loss 3.2104 samples/s 91.2 data wait 4% ETA 0:02:10`.

Why a board actor rather than the run's metrics.jsonl or a Ray Train callback: on a cluster
the driver need not share a filesystem with rank 0, and Ray Train V2's `UserCallback.after_report`
runs in the Train controller, itself an actor (not in the driver), and fires only when every
worker calls `ray.train.report` (a synchronizing call that we make at checkpoints only). The
board is reached by name from any node, rank 0's pushes are fire-and-forget (no wait in the
training step), and it lives as long as the driver, so it outlives worker restarts: a restarted
group says where it resumes, and the bar goes back to that step.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time

import ray

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """What rank 0 said, in order; the driver reads what it has not read yet."""

    def __init__(self):
        self.records: list[dict] = []

    def push(self, record: dict) -> None:
        self.records.append(record)

    def since(self, index: int) -> list[dict]:
        return self.records[index:]


def progress_board(name: str):
    """On the driver's node: on another, that node's loss would take the records of the worker
    groups after it."""
    from pipelines.runtime import on_the_drivers_node

    return ProgressBoard.options(name=name, scheduling_strategy=on_the_drivers_node()).remote()


# --- the worker side (rank 0) ------------------------------------------------------------------

_board = {"handle": None}


def connect(name: str | None) -> None:
    """Rank 0 finds the driver's board (other ranks pass None: they push nothing)."""
    handle = None
    if name:
        try:
            handle = ray.get_actor(name)
        except ValueError:  # a worker run without a board (a benchmark's own loop)
            handle = None
    _board["handle"] = handle


def push(kind: str, **values) -> None:
    if _board["handle"] is not None:
        _board["handle"].push.remote({"kind": kind, "time": time.time(), **values})


def say(text: str) -> None:
    """A line the user must hear (a checkpoint fallback, where training resumes): in the
    worker's log, and on the driver's console even when Ray does not forward worker output."""
    print(text, flush=True)
    push("notice", text=text)


# --- the driver side -------------------------------------------------------------------------

def format_eta(seconds: float | None) -> str:
    return "?" if seconds is None else str(datetime.timedelta(seconds=max(0, int(round(seconds)))))


class ProgressDisplay:
    """Reads the board in a thread while training runs. On a terminal (stderr is one): a tqdm
    bar, its postfix the last log step's values; otherwise one line per log step through `log`.
    Every step line also goes to the driver's log file (pipelines/console.py)."""

    def __init__(self, board, total_steps: int, *, epochs: int | None = None, log=print,
                 interactive: bool | None = None, poll_s: float = 0.5):
        self.board, self.total, self.epochs, self.log = board, total_steps, epochs, log
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.poll_s = poll_s
        self.read, self.starts, self.step, self.skipped = 0, 0, 0, 0
        self.since_start: list[tuple[float, int]] = []  # (time, step) of the records since the last start
        self.bar = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-progress", daemon=True)

    def __enter__(self):
        from pipelines import console

        console.refresh()  # DeepSpeed's and Ray Train's handlers exist by now
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| step {n}/{total}{postfix} [{elapsed}]")
            self.bar.set_postfix_str("starting the workers")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
        self._drain()  # what the last steps said, after fit returned
        if self.skipped:
            self._say(f"ingest skipped {self.skipped} sample(s) it could not decode (each is named in the "
                      f"data workers' logs)")
        if self.bar is not None:
            self.bar.close()
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()
            if self.bar is not None:
                self.bar.refresh()  # the elapsed time moves: a live run is told from a hung one

    def _drain(self) -> None:
        try:
            records = ray.get(self.board.since.remote(self.read), timeout=30)
        except Exception as e:  # the display must never fail the run
            logger.info("progress board unreadable: %s", e)
            return
        self.read += len(records)
        for record in records:
            try:
                getattr(self, f"_on_{record['kind']}", lambda r: None)(record)
            except Exception as e:  # a record this display cannot show: training goes on, the log says which
                logger.info("progress record not shown (%s: %s): %r", type(e).__name__, e, record)

    def _on_start(self, record: dict) -> None:
        self.starts += 1
        self.since_start = [(record["time"], record["step"])]
        shape = (f"{record['world_size']} workers x gradient accumulation {record['grad_accum']}, global batch "
                 f"{record['global_batch']}" if "world_size" in record else "")
        if self.starts > 1:  # a worker group after a failure or a resize: the steps may go back to its checkpoint
            where = (f"resuming from {record['resumed']} at step {record['step']}" if record.get("resumed")
                     else "starting over at step 0 (no complete checkpoint)")
            self._say(f"training workers restarted (attempt {record['attempt'] + 1}): {where}" +
                      (f" on {shape}" if shape else ""))
        elif shape:
            self._say(f"training on {shape}")
        self._move_to(record["step"])

    def _on_notice(self, record: dict) -> None:
        from pipelines.console import worker_output_forwarded

        if not worker_output_forwarded():  # else Ray has printed the worker's line already
            self._say(record["text"])

    def _on_skipped(self, record: dict) -> None:
        """A row ingest dropped (pipelines/ingest.py): the first in one line, then a count at the end."""
        from pipelines.console import log_only, worker_output_forwarded

        self.skipped += 1
        if self.skipped == 1 and not worker_output_forwarded():
            self._say(f"ingest: {record['text']} (others are counted at the end)")
        else:
            log_only(f"ingest: {record['text']}")

    def _on_step(self, record: dict) -> None:
        step = record["step"]
        if step < self.step:
            self._say(f"back to step {step} (restored from a checkpoint)")
            self.since_start = []
        self.since_start.append((record["time"], step))
        line = self.line(record)
        from pipelines.console import log_only

        log_only(line)
        if self.bar is None:
            self.log(line)
            self.step = step
            return
        self.bar.set_postfix_str(line.split(" ", 2)[2], refresh=False)
        self._move_to(step)

    def line(self, record: dict) -> str:
        epoch = record.get("epoch", 0) + 1
        # the plan's step count, or more where the epochs' uneven splits took more steps than planned
        return (f"step {record['step']}/{max(self.total, record['step'])} epoch {epoch}" + (f"/{self.epochs}" if self.epochs else "")
                + f" loss {record['loss']:.4f} samples/s {record['samples_per_s']:.1f}"
                f" data wait {100 * record['data_wait_frac']:.0f}% ETA {format_eta(self.eta())}")

    def eta(self) -> float | None:
        """Seconds left at the pace since the group started (its first log step excluded from
        the pace once there is a second: start-up is not the pace of training)."""
        points = self.since_start[1:] if len(self.since_start) > 2 else self.since_start
        if len(points) < 2 or points[-1][1] <= points[0][1]:
            return None
        (t0, s0), (t1, s1) = points[0], points[-1]
        return (self.total - s1) * (t1 - t0) / (s1 - s0)

    def _move_to(self, step: int) -> None:
        self.step = step
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            self.log(text)
        from pipelines.console import log_only

        log_only(text)


def board_name(clock_name: str) -> str:
    """The board's actor name, beside the run's epoch clock's (unique per driver and run)."""
    return clock_name.replace("epoch-clock", "training-progress", 1) + f"-{os.getpid()}"
