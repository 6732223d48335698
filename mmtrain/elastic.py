"""Elastic worker counts: `--workers MIN-MAX`, and the global batch every group size keeps.

An elastic run (scale.min_workers < scale.workers) hands Ray Train (V2) `num_workers=(MIN, MAX)`:
it starts with as many workers as the cluster holds (at least MIN), goes on with fewer when a
node is lost (down to MIN) and restarts the group larger when capacity returns (trainer.py).
Every new group resumes from the latest checkpoint through the universal-checkpoint path, with
the data position re-split over the new ranks (resume.py, the ExactSplit of trainer.py).

The global batch is batch_size x grad_accum x MAX workers, on every group size: W workers each
accumulate global / (batch_size x W) micro steps per optimizer step, so every step sees the
same number of samples and the learning-rate schedule and loss curve stay comparable. The
micro batch stays what the user chose (it sizes memory), so a W for which that is no whole
number trains with the nearest global batch below (floor, at least one micro step): Ray
Train may start any count between MIN and MAX (its elastic policy counts the workers the
nodes fit), and no global batch divides by every count of a wide range such as 8-64. The run
says at its start which counts keep the global batch exactly, and every metrics line records
the group's global batch. Deterministic runs give each rank its own
dataset (train_0..train_{W-1}, fixed when the trainer is built), which cannot follow a changing
worker count: they are refused with a range too.

Torch- and Ray-free: the command line's parser imports it.
"""
from __future__ import annotations

import argparse


def parse_workers(text: str) -> str:
    """`--workers`: N (fixed) or MIN-MAX (elastic), as the "MIN-MAX" text `split_worker_range`
    reads (N is "N-N": a plain count on the command line also clears a config's min_workers)."""
    low, sep, high = str(text).partition("-")
    if not low.strip().isdigit() or (sep and not high.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX (e.g. 2 or 1-4), got {text!r}")
    return f"{int(low)}-{int(high) if sep else int(low)}"


def split_worker_range(scale: dict) -> dict:
    """The scale section with a "MIN-MAX" `workers` (from the flag, a config file or --set) as
    `workers` MAX and `min_workers` MIN (None when they are equal: a fixed count). Anything else
    is left to the section's own type checks."""
    workers = scale.get("workers")
    if not isinstance(workers, str) or "-" not in workers:
        return scale
    low, _, high = workers.partition("-")
    try:
        low_n, high_n = int(low), int(high)
    except ValueError:
        return scale  # the type check says scale.workers must be an integer
    return {**scale, "workers": high_n, "min_workers": low_n if low_n != high_n else None}


def global_batch(train, scale) -> int:
    """Samples per optimizer step, on every worker count of the run."""
    return train.batch_size * train.grad_accum * scale.workers


def accumulation(train, scale, world: int) -> int:
    """Micro steps per optimizer step on `world` workers: the global batch's, or where it does
    not divide into whole micro batches of every worker, the nearest below (at least 1)."""
    return max(1, global_batch(train, scale) // (train.batch_size * world))


def inexact_counts(train, scale) -> list[int]:
    """The worker counts of the range on which the global batch is not kept exactly."""
    return [w for w in range(scale.fewest, scale.workers + 1)
            if accumulation(train, scale, w) * train.batch_size * w != global_batch(train, scale)]


def elastic_checks(train, scale):
    """The run config's rules for an elastic worker range, as (holds, one line)."""
    if not scale.elastic:
        return
    yield not train.deterministic, (
        f"--deterministic gives each of the {scale.workers} ranks its own dataset, fixed when the run starts, so its "
        f"worker count cannot change: use a fixed --workers N, or leave out --deterministic")
