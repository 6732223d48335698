"""train_loop_per_worker: what each Ray Train worker runs. Reads top to bottom:
set up -> restore -> for each pass of epochs: set the epoch clock, stream batches in
lockstep, step, log, checkpoint -> final checkpoint."""
from __future__ import annotations

import json
import math
import os
import time

import deepspeed
import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from .batch import Collate
from .checkpoint import (CheckpointStore, TrainState, checkpoint_name, fetch, restore, say_incomplete,
                         staged_checkpoint, step_of)
from .config import RunConfig
from .data_position import DataPosition
from .metrics import MetricsWriter
from .model import build_model
from .seeding import seed_everything
from .tokenizer import load_tokenizer

LOSS_KEYS = ("loss", "loss_image_text", "loss_image_audio", "loss_text_audio", "loss_caption")


def lockstep(batches, empty_batch):
    """Yields (batch, is_real, seconds blocked on the data) until every rank has run out.

    Ranks get unequal numbers of rows (a dynamic split, or ids filtered on resume). A rank
    that runs out keeps stepping on an empty batch (loss 0, no samples) so collectives stay
    matched, until all ranks are done: no rank hangs, and no rank drops its last rows.
    """
    it = iter(batches)
    while True:
        started = time.perf_counter()
        batch = next(it, None)
        waited = time.perf_counter() - started  # not the all-reduce below: that is waiting for peers
        flag = torch.tensor([0 if batch is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return
        yield (batch, True, waited) if batch is not None else (empty_batch(), False, waited)


def train_loop_per_worker(config: dict) -> None:
    # the config without credentials; they come as an object reference (see trainer.train)
    cfg = RunConfig.from_dict({**config["run"], "storage_options": ray.get(config["storage_options"])})
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed + rank, t.deterministic)
    if not cfg.scale.use_gpu:
        torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.scale.use_gpu else torch.device("cpu")

    tokenizer = load_tokenizer(os.path.join(cfg.run_dir, "tokenizer"))
    resume_from, universal, taken = _resume_point(config["storage"], rank, world, cfg.storage_options)
    ds_config = config["deepspeed"]
    if universal:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    model = build_model(cfg.model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad],
                                           config=ds_config, dist_init_required=False)
    state, position = TrainState(world_size=world, zero_stage=t.zero_stage), DataPosition()
    if resume_from is not None:
        state, position = restore(engine, resume_from, rank, world, universal)

    collate = Collate(tokenizer, t.batch_size, cfg.model.max_text_len, cfg.data.image.size,
                      cfg.data.audio.n_mels, cfg.data.audio.num_frames)
    shard = ray.train.get_dataset_shard(f"train_{rank}" if config["per_rank_data"] else "train")
    clock = ray.get_actor(config["clock"])
    writer = MetricsWriter(cfg.run_dir, enabled=rank == 0)
    attempt = _attempt_number(cfg.run_dir, rank)
    audit = _audit_file(cfg, rank, attempt) if t.audit_samples else None
    max_steps = t.max_steps or float("inf")      # with --epochs, the epochs alone end the run
    window = _Window()
    run_config_json = cfg.to_json()
    fault = config.get("fault_pause")
    last_saved = state.step if resume_from is not None else -1

    # one pass = several epochs served as one stream (see pipelines/ingest.py); state.epoch is
    # the pass's first epoch, `seen` the newest epoch trained on, for the metrics
    seen = state.epoch
    while state.step < max_steps and state.epoch < t.epochs:
        last = _pass_end(state, t, world, config["epochs_per_pass"], config["samples_per_epoch"])
        if rank == 0:
            consumed = {e: sorted(ids) for e, ids in position.consumed().items()}
            ray.get(clock.set.remote(state.epoch, last, consumed))
        dist.barrier()
        # a shuffle buffer's contents at a checkpoint are not saved, so a resumed run would fill
        # it differently: deterministic runs shuffle by shard order alone
        buffer = 0 if t.deterministic else t.shuffle_buffer
        batches = shard.iter_torch_batches(
            batch_size=t.batch_size, collate_fn=collate, prefetch_batches=t.prefetch_batches,
            local_shuffle_buffer_size=buffer or None,
            local_shuffle_seed=(cfg.seed * 1_000_003 + state.epoch * 1009 + rank) if buffer else None,
        )
        for batch, _, waited in lockstep(batches, collate.empty):
            window.wait += waited
            ids = batch.pop("ids")
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = engine(inputs)
            engine.backward(out["loss"])
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            position.add(ids)
            window.add(out, ids, inputs)
            seen = max([seen] + [e for _, _, e in ids])
            if audit is not None and ids:
                audit.write(json.dumps({"attempt": attempt, "step": state.step + 1, "rank": rank,
                                        "ids": [list(i) for i in ids]}) + "\n")
            if boundary:
                position.commit()
                state.step += 1
                if state.step % t.log_every == 0 or state.step == max_steps:
                    _log(window, engine, world, state, writer, seen)
                if state.step % t.checkpoint_every == 0 and state.step < max_steps:
                    _save(engine, state, position, run_config_json, rank, audit, cfg.run_dir, attempt, fault, taken)
                    last_saved = state.step
                _fault_pause(fault, "step", state.step, rank, attempt)
                if state.step >= max_steps:
                    break
        if state.step < max_steps:  # the stream ran out: every epoch of the pass was served
            state.epoch = last + 1
            position.next_pass(state.epoch)
    if window.micro:  # steps since the last log line (every rank has the same count)
        _log(window, engine, world, state, writer, seen)
    if last_saved != state.step:
        _save(engine, state, position, run_config_json, rank, audit, cfg.run_dir, attempt, fault, taken)
    _write_probe(engine, cfg, rank, device)
    writer.close()
    if audit is not None:
        audit.close()


def _pass_end(state, t, world: int, epochs_per_pass: int, samples_per_epoch: int | None) -> int:
    """The last epoch of the pass starting at state.epoch: no further than --epochs, and with
    --max-steps no further than the steps left can reach, so a run stopped by its step count
    leaves at most the epoch it stopped in (and the next, begun by prefetch) partly served."""
    last = min(t.epochs, state.epoch + epochs_per_pass) - 1
    if t.max_steps and samples_per_epoch:
        samples_left = (t.max_steps - state.step) * t.batch_size * t.grad_accum * world
        last = min(last, state.epoch + math.ceil(samples_left / samples_per_epoch))
    return last


def _log(window, engine, world, state, writer, epoch: int) -> None:
    metrics = window.report(engine, world)
    state.samples += metrics["samples"]
    writer.log(state.step, {**metrics, "epoch": epoch})


def probe_batch(cfg: RunConfig, n: int = 4) -> dict:
    """A fixed synthetic batch: the engine's outputs on it are saved with the run, and the
    exported weights must reproduce them (see export.verify_probe)."""
    g = torch.Generator().manual_seed(1234)
    size, mels, frames = cfg.data.image.size, cfg.data.audio.n_mels, cfg.data.audio.num_frames
    ids = torch.randint(3, min(cfg.model.vocab_size, 200), (n, cfg.model.max_text_len), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    return {"image": torch.randn(n, 3, size, size, generator=g), "image_present": torch.ones(n, dtype=torch.bool),
            "text_ids": ids, "text_present": torch.ones(n, dtype=torch.bool),
            "mel": torch.randn(n, mels, frames, generator=g), "mel_frames": torch.full((n,), frames),
            "audio_present": torch.ones(n, dtype=torch.bool)}


def _write_probe(engine, cfg: RunConfig, rank: int, device) -> None:
    """Every rank runs it (ZeRO-3 gathers parameters collectively); rank 0 writes it."""
    batch = probe_batch(cfg)
    engine.module.eval()
    with torch.no_grad():
        out = engine.module.encode({k: v.to(device) for k, v in batch.items()})
    engine.module.train()
    if rank == 0:
        torch.save({"batch": batch, "encode": {k: v.float().cpu() for k, v in out.items()}},
                   os.path.join(cfg.run_dir, "probe.pt"))


def _resume_point(storage: str, rank: int, world: int, storage_options: dict
                  ) -> tuple[str | None, bool, frozenset[str]]:
    """Rank 0 picks the checkpoint (Ray Train's latest if complete, else the previous complete
    one) and converts it to DeepSpeed's universal format if the worker count changed; every
    rank then fetches and checks (sizes and hashes) the files it will load, and a problem on
    any rank falls back to the previous complete checkpoint. Then rank 0 empties folders of
    abandoned saves after the one chosen (none when there is none: a run that finds no
    complete checkpoint starts over beside the others and deletes nothing). Returns, on every
    rank, the checkpoint, whether it is universal, and the folder names saves must not reuse."""
    path, store = None, CheckpointStore(storage, storage_options)
    if rank == 0:
        registered = ray.train.get_checkpoint()
        # Ray's path is on its own filesystem object, without the URL scheme: name it by ours
        path = store.select(f"{storage}/{os.path.basename(registered.path)}" if registered is not None else None)
    while True:
        choice = [(path, rank == 0 and path is not None and store.needs_universal(path, world))]
        dist.broadcast_object_list(choice, src=0)
        path, universal = choice[0]
        if path is None:
            break
        why = store.ensure_universal(path) if universal and rank == 0 else None
        dist.barrier()  # the universal copy, if any, is in storage
        why = why or fetch(store, path, rank, universal)
        reasons = [None] * world
        dist.all_gather_object(reasons, why)
        found = next((f"rank {r}: {w}" for r, w in enumerate(reasons) if w is not None), None)
        if found is None:
            break
        if rank == 0:
            print(f"rank 0: {say_incomplete(path, found)}")
            path = store.latest_complete(before=path)
    taken = [frozenset()]
    if rank == 0:
        store.discard_newer(step_of(path) if path is not None else None)
        if path is not None:
            print(f"rank 0: resuming from {path}" + (" (universal, new worker count)" if universal else ""))
        taken = [frozenset(store.folders())]
    dist.broadcast_object_list(taken, src=0)
    return path, universal, taken[0]


def _save(engine, state, position, run_config_json, rank, audit, run_dir, attempt, fault, taken) -> None:
    if audit is not None:
        audit.flush()
    with staged_checkpoint(engine, state, position, run_config_json, rank, run_dir) as d:
        _fault_pause(fault, "save", state.step, rank, attempt)
        ray.train.report({"step": state.step, "epoch": state.epoch},
                         checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint_name(state.step, taken))


def _fault_pause(spec: str | None, where: str, step: int, rank: int, attempt: int) -> None:
    """Fault injection for tests and benchmarks (MMTRAIN_FAULT_PAUSE="WHERE@STEP:SECONDS" in
    the driver's environment): holds every rank of the run's first attempt either inside the
    save of STEP (its files written, not yet uploaded: WHERE=save) or after step STEP and its
    checkpoint (WHERE=step), so that a kill can be aimed at that moment."""
    if attempt == 0 and spec and spec.startswith(f"{where}@") and int(spec[len(where) + 1:].split(":")[0]) == step:
        if rank == 0:
            print(f"fault injection: pausing {'inside the save of' if where == 'save' else 'after'} step {step}",
                  flush=True)
        time.sleep(float(spec.split(":")[1]))


def _attempt_number(run_dir: str, rank: int) -> int:
    """How many times workers started on this run before (driver re-runs and automatic
    restarts alike): rank 0 counts in RUN/attempts.json and tells the others."""
    n = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        path = os.path.join(run_dir, "attempts.json")
        before = json.load(open(path))["started"] if os.path.exists(path) else 0
        with open(path + ".tmp", "w") as f:
            json.dump({"started": before + 1}, f)
        os.replace(path + ".tmp", path)
        n[0] = before
    dist.broadcast(n, src=0)
    return int(n.item())


def _audit_file(cfg: RunConfig, rank: int, attempt: int):
    directory = os.path.join(cfg.run_dir, "audit")
    os.makedirs(directory, exist_ok=True)
    return open(os.path.join(directory, f"attempt_{attempt:03d}.rank_{rank:05d}.jsonl"), "a")


class _Window:
    """Sums over the steps since the last log line; reduced over ranks when reported."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = {k: 0.0 for k in LOSS_KEYS}
        self.micro, self.samples, self.tokens, self.wait = 0, 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, out: dict, ids: list, inputs: dict) -> None:
        for k in LOSS_KEYS:
            self.sums[k] += float(out[k].detach())
        self.micro += 1
        self.samples += len(ids)
        present = inputs["text_present"].bool()
        self.tokens += int((inputs["text_ids"][present] > 0).sum())

    def report(self, engine, world: int) -> dict:
        elapsed = time.perf_counter() - self.start
        vec = torch.tensor([*self.sums.values(), self.micro, self.samples, self.tokens, self.wait, elapsed],
                           dtype=torch.float64)
        dist.all_reduce(vec)
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
        self.reset()
        return values
