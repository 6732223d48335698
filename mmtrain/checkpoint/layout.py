"""What a checkpoint folder is called and what it holds (the file names every part agrees on).

    checkpoint_NNNNNNNNN/  the save of step N (`_rK` appended when an abandoned folder holds
                           the plain name)
      ds/ ...              DeepSpeed's files (`engine.save_checkpoint(dir, tag="ds")`)
      latest               DeepSpeed's tag file (rank 0)
      run_config.json      the resolved run config (rank 0)
      train_state.json     step, epoch, world size, ZeRO stage (rank 0)
      position/rank_N.json data position (every rank; see data_position.py)
      rng/rank_N.json      python / numpy / torch (and CUDA) RNG states (every rank), as JSON
      done/rank_N          written last by each rank: size and sha256 of every file of its part
      ds_universal/        only after an elastic resume: DeepSpeed's universal checkpoint
      done/ds_universal    written last by the conversion: the same for ds_universal/
      ABANDONED            only in a folder emptied because a later attempt resumed before it
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Callable

DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"  # DeepSpeed's world-size-free format, made on an elastic resume
UNIVERSAL_DONE = f"done/{UNIVERSAL_TAG}"
TRAIN_STATE = "train_state.json"
CKPT_RE = re.compile(r"^checkpoint_(\d{9})(?:_r(\d+))?$")
ABANDONED = "ABANDONED"  # marker in an emptied folder of an abandoned save (see CheckpointStore.discard_newer)
# files that one rank alone reads back: DeepSpeed loads only its own ZeRO partition (model
# states too at stage 3) unless zero_optimization.elastic_checkpoint is on, which we never set
OWN_FILE_RE = re.compile(rf"^(?:{DS_TAG}/(?:bf16_)?zero_pp_rank_|rng/rank_)(\d+)")


@dataclass
class TrainState:
    step: int = 0            # optimizer steps done
    epoch: int = 0
    samples: int = 0         # real samples trained on, all ranks
    world_size: int = 1
    zero_stage: int = 0

    @classmethod
    def from_json(cls, data: bytes | str) -> "TrainState":
        return cls(**json.loads(data))


def done_record(rank: int) -> str:
    """The record a rank writes last (its part is complete once it exists)."""
    return f"done/rank_{rank:05d}"


def rng_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.json"


def checkpoint_name(step: int, taken: frozenset[str] | set[str] = frozenset()) -> str:
    """The folder name for a save of `step`: never one in `taken` (folders already in storage,
    abandoned ones included), so Ray Train never tracks two checkpoints at one path."""
    name, n = f"checkpoint_{step:09d}", 0
    while (f"{name}_r{n}" if n else name) in taken:
        n += 1
    return f"{name}_r{n}" if n else name


def order(path: str) -> tuple[int, int]:
    """(step, retry number) of a checkpoint folder or its path: the order saves happened in."""
    m = CKPT_RE.match(os.path.basename(path.rstrip("/")))
    return int(m.group(1)), int(m.group(2) or 0)


def step_of(path: str) -> int:
    return order(path)[0]


def read_by(rank: int, universal: bool) -> Callable[[str], bool]:
    """Which files of a checkpoint a rank's restore reads: the shared ones, every rank's data
    position (it is re-split), its own ZeRO partition and RNG state, and of the two DeepSpeed
    copies the one it loads (every rank reads all of the universal one: one file per parameter,
    each sliced to the rank's partition)."""
    folders = ("position", "rng", UNIVERSAL_TAG if universal else DS_TAG)

    def wanted(name: str) -> bool:
        own = OWN_FILE_RE.match(name)
        return ("/" not in name or name.split("/", 1)[0] in folders) and (own is None or int(own.group(1)) == rank)

    return wanted


def converter_reads(name: str) -> bool:
    """DeepSpeed's universal converter reads every rank's files of the tag (and the top-level ones)."""
    return name.startswith(f"{DS_TAG}/") or "/" not in name


def say_incomplete(path: str, why: str) -> str:
    return (f"checkpoint {os.path.basename(path)} is incomplete ({why}): a save was interrupted or files were "
            f"lost or changed; falling back to the previous complete checkpoint")


def restore_dir(checkpoint: str, rank: int) -> str:
    """Node-local folder for a rank's copy of a checkpoint in remote storage."""
    key = hashlib.sha1(checkpoint.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "mmtrain-restore", f"{key}.rank_{rank:05d}")
