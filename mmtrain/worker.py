"""One Ray Train worker's training state and steps; loop.py drives it top to bottom.

The worker holds the DeepSpeed engine, where training stands (`TrainState`), which rows this
rank trained on (`DataPosition`), the metrics writer and window, and the audit file. Hooks
(objects with `inside_save(worker)` and `after_step(worker)`; fault_injection.py is the one
there is) see the moments a test aims a kill at.
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import deepspeed
import ray
import ray.train
import torch
import torch.distributed as dist

from .attempts import AuditFile, attempt_number
from .batch import Collate
from .checkpoint import TrainState, checkpoint_name, restore, staged_checkpoint
from .collective_guard import CollectiveGuard
from .data_position import DataPosition
from .deepspeed_config import for_world_size
from .device import training_device
from .device_batches import PinnedCollate, on_device
from .efficiency import EfficiencyMeter
from .metrics import MetricsWriter
from .metrics_window import MetricsWindow
from .model import build_model
from .op_builds import skip_unused_ops, stale_build_locks
from .seeding import seed_everything
from .probe import write_probe
from . import progress
from .resume import resume_point
from .tokenizer import load_tokenizer
from .worker_plan import WorkerPlan


class Worker:
    def __init__(self, plan: WorkerPlan, storage_options: dict):
        self.plan = plan
        self.cfg = cfg = plan.run_config(storage_options)
        t = cfg.train
        ctx = ray.train.get_context()
        self.rank, self.world = rank, world = ctx.get_world_rank(), ctx.get_world_size()
        # seeded before the model is built: its initial weights come from this seed
        seed_everything(cfg.seed + rank, t.deterministic)
        if not cfg.scale.use_gpu:
            torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
        self.device = training_device(cfg.scale.use_gpu)
        tokenizer = load_tokenizer(os.path.join(cfg.run_dir, "tokenizer"))
        progress.connect(plan.progress if rank == 0 else None)  # rank 0 tells the driver (progress.py)

        resume_from, universal, self.taken = resume_point(plan.storage, rank, world, cfg.storage_options)
        # the group's size is Ray Train's (elastic runs: anywhere in MIN..MAX); the global batch
        # stays the plan's and the gradient accumulation adapts to it (elastic.py)
        self.ds_config = for_world_size(plan.deepspeed, world)
        self.engine = _engine(cfg, self.ds_config, universal, self.device)
        # from here on every collective of the loop (and DeepSpeed's) is checked, if asked
        self.guard = CollectiveGuard(self.device).install() if t.check_collectives else None
        self.state, self.position = TrainState(world_size=world, zero_stage=t.zero_stage), DataPosition()
        if resume_from is not None:
            self.state, self.position = restore(self.engine, resume_from, rank, world, universal)
        self.last_saved = self.state.step if resume_from is not None else -1

        self.collate = Collate(tokenizer, t.batch_size, cfg.model.max_text_len, cfg.data.image.size,
                               cfg.data.audio.n_mels, cfg.data.audio.num_frames)
        self.shard = ray.train.get_dataset_shard(f"train_{rank}" if plan.per_rank_data else "train")
        self.clock = ray.get_actor(plan.clock)
        self.writer = MetricsWriter(cfg.run_dir, enabled=rank == 0)
        self.attempt = attempt_number(cfg.run_dir, rank, self.device)
        self.audit = AuditFile(cfg.run_dir, rank, self.attempt) if t.audit_samples else None
        progress.push("start", step=self.state.step, attempt=self.attempt,
                      resumed=os.path.basename(resume_from) if resume_from else None, **self.batch_shape())
        self.max_steps = t.max_steps or float("inf")  # with --epochs, the epochs alone end the run
        meter = EfficiencyMeter(cfg.model, self.device, t.peak_tflops, rank, head_everywhere=t.compile)
        self.window = MetricsWindow(meter, tuple(s.name for s in cfg.data.sources))  # its clock starts here: the first line's throughput counts from now
        self.run_config_json = cfg.to_json()
        self.hooks = []
        # one pass = several epochs served as one stream (see pipelines/ingest.py): state.epoch
        # is the pass's first epoch, `seen` the newest epoch trained on, for the metrics
        self.seen, self.epochs = self.state.epoch, None
        self.pass_end = self.state.epoch

    def batch_shape(self) -> dict:
        """This group's size and accumulation, and the global batch they make (in every
        metrics line, and said at each start)."""
        ds = self.ds_config
        return {"world_size": self.world, "grad_accum": ds["gradient_accumulation_steps"],
                "global_batch": ds["train_batch_size"]}

    def has_work_left(self) -> bool:
        return self.state.step < self.max_steps and self.state.epoch < self.cfg.train.epochs

    def start_pass(self):
        """Sets the epoch clock to this pass's epochs and returns this rank's batches of them."""
        t, state = self.cfg.train, self.state
        self.pass_end = _pass_end(state, t, self.ds_config["train_batch_size"], self.plan.epochs_per_pass,
                                  self.plan.samples_per_epoch)
        if self.rank == 0:
            consumed = {e: sorted(ids) for e, ids in self.position.consumed().items()}
            ray.get(self.clock.set.remote(state.epoch, self.pass_end, consumed))
        dist.barrier()
        # a shuffle buffer's contents at a checkpoint are not saved, so a resumed run would fill
        # it differently: deterministic runs shuffle by shard order alone
        buffer = 0 if t.deterministic else t.shuffle_buffer
        on_gpu = self.device.type == "cuda"
        batches = self.shard.iter_torch_batches(
            batch_size=t.batch_size, collate_fn=PinnedCollate(self.collate) if on_gpu else self.collate,
            prefetch_batches=t.prefetch_batches, local_shuffle_buffer_size=buffer or None,
            local_shuffle_seed=(self.cfg.seed * 1_000_003 + state.epoch * 1009 + self.rank) if buffer else None,
        )
        return on_device(batches, self.device)  # on GPU: pinned, the next batch's copy beside this step

    def train_on(self, batch: dict, waited: float) -> bool:
        """One micro-step; at a gradient-accumulation boundary also the optimizer step's
        bookkeeping, metrics line and checkpoint. True when an optimizer step was taken."""
        self.window.wait += waited
        # the rows' epochs stay a tensor (on the device, on GPU) until a log line reads them: no
        # host-device sync per micro-step
        ids, self.epochs = batch.pop("ids"), batch.pop("epoch")
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        out = self.engine(inputs)
        self.engine.backward(out["loss"])
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        self.position.add(ids)
        self.window.add(out, ids, inputs)
        if self.audit is not None and ids:
            self.audit.write(self.state.step + 1, ids)
        if boundary:
            self._stepped()
        return boundary

    def _stepped(self) -> None:
        state, t = self.state, self.cfg.train
        self.position.commit()
        state.step += 1
        if state.step % t.log_every == 0 or state.step == self.max_steps:
            self.log()
        if state.step % t.checkpoint_every == 0 and state.step < self.max_steps:
            self.save()
        for hook in self.hooks:
            hook.after_step(self)

    def end_pass(self) -> None:
        if self.state.step < self.max_steps:  # the stream ran out: every epoch of the pass was served
            self.state.epoch = self.pass_end + 1
            self.position.next_pass(self.state.epoch)

    def log(self) -> None:
        metrics = self.window.report(self.engine, self.world, self.device)
        self.state.samples += metrics["samples"]
        if self.epochs is not None:
            self.seen = max(self.seen, int(self.epochs.max()))
        self.writer.log(self.state.step, {**metrics, "epoch": self.seen, **self.batch_shape()})
        progress.push("step", step=self.state.step, epoch=self.seen,
                      **{k: metrics[k] for k in ("loss", "samples_per_s", "data_wait_frac")})

    def save(self) -> None:
        engine, state, position, rank, taken = self.engine, self.state, self.position, self.rank, self.taken
        run_config_json, run_dir = self.run_config_json, self.cfg.run_dir
        if self.audit is not None:
            self.audit.flush()
        with staged_checkpoint(engine, state, position, run_config_json, rank, run_dir) as d:
            for hook in self.hooks:
                hook.inside_save(self)
            ray.train.report({"step": state.step, "epoch": state.epoch},
                             checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=checkpoint_name(state.step, taken))
        self.last_saved = state.step

    def finish(self) -> None:
        """The last metrics line and checkpoint, if the last step has none yet, and the probe."""
        if self.window.micro:  # steps since the last log line (every rank has the same count)
            self.log()
        if self.last_saved != self.state.step:
            self.save()
        write_probe(self.engine, self.cfg, self.rank, self.device)
        self.writer.close()
        if self.audit is not None:
            self.audit.close()
        if self.guard is not None:
            self.guard.close()
            if self.rank == 0:
                progress.say(self.guard.summary())


def _engine(cfg, ds_config: dict, universal: bool, device: torch.device):
    """The DeepSpeed engine over a new model, on Ray Train's `device`; a universal checkpoint
    (the worker count changed) needs DeepSpeed told so before it loads."""
    if universal:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    model = build_model(cfg.model)
    # DeepSpeed takes its GPU from LOCAL_RANK unless given `device_rank`; Ray Train's device
    # (the GPU Ray assigned this worker) need not be the one at that index
    args = SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None
    skip_unused_ops()
    if ray.train.get_context().get_local_rank() == 0:
        for line in stale_build_locks():  # once per node
            print(line)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds_config, dist_init_required=False)
    if device.type == "cuda" and engine.device != device:
        raise RuntimeError(f"DeepSpeed placed the model on {engine.device}, Ray Train's device is {device}")
    if cfg.train.compile:
        # torch.compile of the module in place (its state dict keys stay), with the backend DeepSpeed
        # picks for the accelerator; the steps' shapes are static (every batch is padded to batch_size)
        engine.compile()
    return engine


def _pass_end(state, t, global_batch: int, epochs_per_pass: int, samples_per_epoch: int | None) -> int:
    """The last epoch of the pass starting at state.epoch: no further than --epochs, and with
    --max-steps no further than the steps left can reach, so a run stopped by its step count
    leaves at most the epoch it stopped in (and the next, begun by prefetch) partly served."""
    last = min(t.epochs, state.epoch + epochs_per_pass) - 1
    if t.max_steps and samples_per_epoch:
        samples_left = (t.max_steps - state.step) * global_batch
        last = min(last, state.epoch + math.ceil(samples_left / samples_per_epoch))
    return last
