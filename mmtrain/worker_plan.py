"""What the driver hands every training worker: one typed, frozen plan.

Ray Train's dashboard (its Train state API) serves `train_loop_config` to every token holder,
so the plan holds no credential: it keeps the run config's storage options without secrets,
and the full options travel beside it as a Ray object reference (see `to_loop_config`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import RunConfig
from .credentials import without_secrets
from .fault_injection import FaultPause


@dataclass(frozen=True)
class WorkerPlan:
    run: RunConfig                   # its storage options without credentials (enforced below)
    deepspeed: dict                  # the DeepSpeed config (RUN/deepspeed_config.json)
    clock: str                       # the name of the epoch-clock actor (pipelines/ingest.py)
    storage: str                     # the checkpoint storage root (checkpoint.location.checkpoint_root)
    per_rank_data: bool              # datasets train_0..train_{W-1}, one per rank (deterministic runs)
    epochs_per_pass: int             # epochs served as one stream
    samples_per_epoch: int | None    # None: unknown (raw shards and --max-steps)
    fault: FaultPause | None = None  # tests and benchmarks only (fault_injection.py)
    progress: str | None = None      # the name of the driver's progress board (progress.py)

    def __post_init__(self):
        public = dataclasses.replace(self.run, storage_options=without_secrets(self.run.storage_options))
        object.__setattr__(self, "run", public)

    def to_loop_config(self, storage_options) -> dict:
        """Ray Train's train_loop_config: plain JSON values for its dashboard, and
        `storage_options` (an ObjectRef of the full options) beside the plan's fields."""
        config = {"run": self.run.to_public_dict(), "storage_options": storage_options,
                  "deepspeed": self.deepspeed, "clock": self.clock, "storage": self.storage,
                  "per_rank_data": self.per_rank_data, "epochs_per_pass": self.epochs_per_pass,
                  "samples_per_epoch": self.samples_per_epoch, "progress": self.progress}
        if self.fault is not None:
            config["fault_pause"] = str(self.fault)
        return config

    @classmethod
    def from_loop_config(cls, config: dict) -> WorkerPlan:
        fault = config.get("fault_pause")
        return cls(run=RunConfig.from_dict(config["run"]), deepspeed=config["deepspeed"], clock=config["clock"],
                   storage=config["storage"], per_rank_data=config["per_rank_data"],
                   epochs_per_pass=config["epochs_per_pass"], samples_per_epoch=config["samples_per_epoch"],
                   fault=FaultPause.parse(fault) if fault else None, progress=config.get("progress"))

    def run_config(self, storage_options: dict) -> RunConfig:
        """The run config with the full storage options (resolved from the object reference)."""
        return dataclasses.replace(self.run, storage_options=storage_options)
