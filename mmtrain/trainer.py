"""The driver side of training: resolve data, tokenizer and DeepSpeed config, then run a
Ray Train TorchTrainer (scaling, storage, failure and checkpoint configs) and resume from
the run's latest complete checkpoint (in the run directory or its checkpoint storage) when
there is one."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

from ray.train import DataConfig

from pipelines.console import keep_worker_logs
from pipelines.dataset import check_preprocessed, shard_counts
from pipelines.shards import expand_shards
from pipelines.storage import join

from .checkpoint import CheckpointStore, location
from .config import ConfigError, RunConfig
from .data_sources import plan_mixture, record_counts, source_shards
from .deepspeed_config import build_deepspeed_config, total_steps
from .fault_injection import FaultPause
from .mlflow_tracking import tracked
from .progress import ProgressDisplay, board_name, progress_board
from .run_lock import RunLock
from .tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from .worker_plan import WorkerPlan


def prepare_tokenizer(cfg: RunConfig, shards: list[str], preprocessed: bool):
    directory = os.path.join(cfg.run_dir, "tokenizer")
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return load_tokenizer(directory)
    texts = None
    if cfg.tokenizer == "bpe":
        from pipelines.ingest import captions

        # BPE learns from the captions as training reads them, those of the first 64 shards
        texts = captions(shards[:64], cfg.data, preprocessed=preprocessed, storage_options=cfg.storage_options)
    tok = build_tokenizer(cfg.tokenizer, texts=texts, vocab_size=cfg.bpe_vocab_size)
    save_tokenizer(tok, directory)
    return tok


class ExactSplit(DataConfig):
    """Ray Train's default split (`streaming_split(equal=True)`) may drop rows to give every
    worker the same count; exactly-once needs every row, and the training loop's lockstep
    already copes with unequal splits."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i][name] = split
        return output


def train(cfg: RunConfig, *, log=print) -> dict:
    """Runs (or resumes) the run, holding its directory's lock throughout (run_lock.py)."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    with RunLock(cfg.run_dir, log=log), tracked(cfg, log=log) as cfg:  # tracked: --mlflow (mlflow_tracking.py)
        return _train(cfg, log=log)


def _train(cfg: RunConfig, *, log=print) -> dict:
    """Settle storage -> resolve data -> count samples -> plan epochs and steps -> write run
    files -> say where it resumes -> plan the workers -> build the Ray Train trainer -> fit.
    Ray starts once the data is resolved: counting raw shards is already a Ray Data job."""
    import ray

    from pipelines.ingest import epoch_clock
    from pipelines.runtime import init_ray

    cfg, checkpoints = _settle_storage(cfg)
    cfg, shards, dataset_kwargs = _resolve_data(cfg)
    init_ray(num_cpus=local_cpus(cfg))
    _check_gpus_exist(cfg)
    _check_cpus_left_for_data(cfg)
    n_samples = _count_samples(cfg, shards, dataset_kwargs, log)
    cfg, schedule = _plan_epochs(cfg, n_samples, log)
    ds_config = build_deepspeed_config(cfg, cfg.scale.workers, schedule.steps, on_gpu=cfg.scale.use_gpu)
    _write_run_files(cfg, ds_config)
    latest = _say_resume(cfg, checkpoints, log)
    _say_elastic(cfg, log)

    clock_name = f"epoch-clock-{abs(hash(os.path.abspath(cfg.run_dir)))}-{time.time_ns()}"
    clock, board = epoch_clock(clock_name), progress_board(board_name(clock_name))
    plan = WorkerPlan(run=cfg, deepspeed=ds_config, clock=clock_name, storage=checkpoints,
                      per_rank_data=cfg.train.deterministic, epochs_per_pass=schedule.per_pass,
                      samples_per_epoch=n_samples, fault=FaultPause.from_environment(),
                      progress=board_name(clock_name))
    started = time.time()
    try:
        epochs = None if cfg.train.max_steps else cfg.train.epochs
        with ProgressDisplay(board, schedule.steps, epochs=epochs, log=log):
            result = _fit(_torch_trainer(cfg, plan, shards, dataset_kwargs))
    finally:
        ray.kill(clock)
        ray.kill(board)
        keep_worker_logs(os.path.join(cfg.run_dir, "logs"))
    done = (result.metrics or {}).get("step", schedule.steps)
    return {"steps": done, "scheduled_steps": schedule.steps, "steps_per_epoch": schedule.steps_per_epoch,
            "samples": n_samples, "resumed_from": latest,
            "seconds": round(time.time() - started, 1),
            "checkpoint": join(checkpoints, os.path.basename(result.checkpoint.path))
            if result.checkpoint else None}


def _settle_storage(cfg: RunConfig) -> tuple[RunConfig, str]:
    """The run directory made absolute (workers run in other directories, and on other nodes)
    and created, and the checkpoint storage root, checked writable before anything runs."""
    cfg = cfg.replace(run_dir=os.path.abspath(cfg.run_dir))
    os.makedirs(cfg.run_dir, exist_ok=True)
    cfg = cfg.replace(checkpoint_storage=location.settled(cfg.run_dir, cfg.checkpoint_storage))
    checkpoints = location.checkpoint_root(cfg.run_dir, cfg.checkpoint_storage)
    CheckpointStore.writable(checkpoints, cfg.storage_options)
    return cfg, checkpoints


def _resolve_data(cfg: RunConfig) -> tuple[RunConfig, list[str], dict]:
    """The shards, their kind and counts, and the tokenizer (its vocabulary sizes the model):
    the run config completed, the shards, and the keywords that build their dataset."""
    by_source = source_shards(cfg)  # a mixture: each source's shards; else None
    shards = [s for group in by_source.values() for s in group] if by_source else \
        expand_shards(list(cfg.data_paths), cfg.storage_options)
    preprocessed = check_preprocessed(shards, cfg.data, cfg.storage_options)
    tokenizer = prepare_tokenizer(cfg, shards, preprocessed)
    cfg = cfg.replace(model={"vocab_size": tokenizer.vocab_size,
                             "gradient_checkpointing": cfg.train.activation_checkpointing,
                             "contrastive_loss": cfg.train.contrastive_loss, "attention": cfg.train.attention})
    counts = shard_counts(shards, cfg.storage_options)
    # a mixture is planned once the samples are counted (_count_samples): until then, its shards
    dataset_kwargs = dict(seed=cfg.seed, preprocessed=preprocessed, storage_options=cfg.storage_options,
                          shard_counts=counts, mixture=by_source)
    return cfg, shards, dataset_kwargs


def _count_samples(cfg: RunConfig, shards: list[str], dataset_kwargs: dict, log) -> int | None:
    """Samples per epoch: from the manifests, else counted by reading the shards when the run
    is given in epochs (None with --max-steps: the step count alone schedules the run)."""
    from pipelines.ingest import build_dataset

    counts = dataset_kwargs["shard_counts"]
    if dataset_kwargs["mixture"] is not None:
        if counts is None:
            log("counting the sources' samples (raw shards carry no manifest; preprocess them to skip this)...")
            counts = dataset_kwargs["shard_counts"] = record_counts(shards, cfg.data, cfg.storage_options)
        mixture = dataset_kwargs["mixture"] = plan_mixture(cfg, dataset_kwargs["mixture"], counts)
        for line in mixture.describe():
            log(f"source {line}")
        return mixture.samples_per_epoch
    n_samples = sum(counts.values()) if counts else None
    if n_samples is None and cfg.train.max_steps is None:
        log("counting samples (raw shards carry no manifest; preprocess them to skip this)...")
        n_samples = build_dataset(shards, cfg.data, **dataset_kwargs).count()
    return n_samples


@dataclass(frozen=True)
class Schedule:
    per_pass: int                  # epochs served as one stream
    steps_per_epoch: int | None    # None: the epoch's size is unknown
    steps: int                     # optimizer steps the learning-rate schedule spans


def _plan_epochs(cfg: RunConfig, n_samples: int | None, log) -> tuple[RunConfig, Schedule]:
    from pipelines.ingest import epochs_per_pass

    world = cfg.scale.workers
    per_pass = cfg.train.epochs_per_pass or epochs_per_pass(n_samples)
    buffer = n_samples // world // 4 if n_samples else None
    if per_pass > 1 and buffer is not None and not cfg.train.deterministic and cfg.train.shuffle_buffer > buffer:
        # a pass streams epoch after epoch, and the shuffle buffer mixes rows across the boundary:
        # kept to a quarter of a worker's epoch, epochs overlap only near their ends
        log(f"shuffle buffer {cfg.train.shuffle_buffer} -> {buffer} rows (a quarter of each worker's "
            f"{n_samples // world}-sample epoch, so epochs overlap only at their boundaries)")
        cfg = cfg.replace(train={"shuffle_buffer": buffer})
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    steps_per_epoch = math.ceil(math.ceil(n_samples / world) / per_step) if n_samples else None
    return cfg, Schedule(per_pass, steps_per_epoch, total_steps(cfg, n_samples, world, per_pass))


def _write_run_files(cfg: RunConfig, ds_config: dict) -> None:
    with open(os.path.join(cfg.run_dir, "run_config.json"), "w") as f:
        f.write(cfg.to_json())
    with open(os.path.join(cfg.run_dir, "deepspeed_config.json"), "w") as f:
        json.dump(ds_config, f, indent=1)


def _say_resume(cfg: RunConfig, checkpoints: str, log) -> str | None:
    """The checkpoint the run will resume from, said to the user; a change of ZeRO stage is
    refused here. Ray Train finds the run's checkpoints itself (its snapshot next to them) and
    the workers check them (resume.resume_point): this only tells the user what will happen."""
    world = cfg.scale.workers
    store = CheckpointStore(checkpoints, cfg.storage_options)
    latest = store.latest_complete(log=log)
    if latest:
        saved = store.saved_state(latest)
        if saved.zero_stage != cfg.train.zero_stage:
            raise ConfigError(f"{latest} was written with ZeRO stage {saved.zero_stage}; resume with "
                              f"--zero-stage {saved.zero_stage} (changing the stage of a run is not supported)")
        log(f"resuming from {latest}" + (f" (written by {saved.world_size} workers, now {cfg.scale.described}: "
                                          f"elastic resume)" if saved.world_size != world or cfg.scale.elastic else ""))
    return latest


def _say_elastic(cfg: RunConfig, log) -> None:
    """What an elastic run will do with its global batch on each group size."""
    from .elastic import accumulation, global_batch, inexact_counts

    s, t = cfg.scale, cfg.train
    if s.elastic:
        counts = list(range(s.fewest, s.workers + 1))
        each = ", ".join(f"{accumulation(t, s, w)} on {w}" for w in counts[:8]) + (", ..." if len(counts) > 8 else "")
        log(f"elastic: {s.fewest} to {s.workers} workers, as the cluster gives them; global batch "
            f"{global_batch(t, s)} (gradient accumulation {each})")
        inexact = inexact_counts(t, s)
        if inexact:
            w = inexact[0]
            log(f"elastic: on {len(inexact)} of the {len(counts)} worker counts the global batch does not divide into "
                f"micro batches of {t.batch_size} and is the nearest below (e.g. {w} workers: "
                f"{accumulation(t, s, w) * t.batch_size * w}); choose batch_size, grad_accum and MIN-MAX to keep it "
                f"exact on the counts your nodes give")


def _datasets(cfg: RunConfig, clock_name: str, shards: list[str], dataset_kwargs: dict) -> tuple[dict, DataConfig]:
    """Ray Train's datasets and their split over the workers."""
    from pipelines.ingest import build_dataset

    world = cfg.scale.workers
    if cfg.train.deterministic:
        # a reproducible split: rank r reads the shards at r, r+W, ... of the epoch's order, in
        # order, so a resumed rank is served exactly the rest of what it would have read
        datasets = {f"train_{r}": build_dataset(shards, cfg.data, clock_name=clock_name, rank=r, world=world,
                                                notices=board_name(clock_name),
                                                **dataset_kwargs) for r in range(world)}
        options = DataConfig.default_ingest_options()
        options.preserve_order = True
        return datasets, DataConfig(datasets_to_split=[], execution_options=options)
    datasets = {"train": build_dataset(shards, cfg.data, clock_name=clock_name, notices=board_name(clock_name),
                                       **dataset_kwargs)}
    return datasets, ExactSplit(datasets_to_split=["train"])


def _torch_trainer(cfg: RunConfig, plan: WorkerPlan, shards: list[str], dataset_kwargs: dict):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .loop import train_loop_per_worker

    datasets, dataset_config = _datasets(cfg, plan.clock, shards, dataset_kwargs)
    # the controller polls workers every 2 s by default, which stalls each checkpoint report
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if cfg.scale.elastic:
        # Ray 2.60's elastic policy sizes a restart from the AutoscalingCoordinator's view of the
        # nodes, refreshed every 20 s (TICK_INTERVAL_S; ElasticScalingPolicy asks without
        # recompute): right after a node is lost it still counts that node, asks for MAX workers,
        # and waits out this timeout (default 60 s) before it decides again with a fresh view.
        # Past 20 s the view is fresh, so waiting longer only delays the smaller group.
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "25")
    # the credentials reach the workers as an object reference (see WorkerPlan), owned by this
    # driver, so it resolves for every worker group Ray Train starts while the run lives
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.to_loop_config(ray.put(cfg.storage_options)),
        torch_config=TorchConfig(backend="nccl" if cfg.scale.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            # elastic: Ray Train starts with what the cluster holds (>= MIN), restarts the group
            # smaller after a node is lost and larger once its resize check finds room (elastic.py)
            num_workers=(cfg.scale.fewest, cfg.scale.workers) if cfg.scale.elastic else cfg.scale.workers,
            elastic_resize_monitor_interval_s=cfg.scale.resize_check_s, use_gpu=cfg.scale.use_gpu,
            resources_per_worker={"CPU": cfg.scale.cpus_per_worker,
                                  **({"GPU": cfg.scale.gpus_per_worker} if cfg.scale.use_gpu else {}),
                                  **cfg.scale.resources_per_worker}),
        run_config=RayRunConfig(
            **location.ray_storage(cfg.run_dir, cfg.checkpoint_storage, cfg.storage_options),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def _fit(trainer):
    try:
        return trainer.fit()  # raises Ray Train's report when the run fails
    except Exception as e:
        user = _user_error(e)
        if user is None:
            raise
        raise user from e


def local_cpus(cfg: RunConfig) -> int:
    """Logical CPUs for an embedded Ray: the train workers' plus 2 for the data tasks. On a
    laptop the workers would otherwise take every CPU and starve the data pipeline. Call
    init_ray with it before anything else starts Ray in the process (see demo.py)."""
    need = int(math.ceil(cfg.scale.workers * cfg.scale.cpus_per_worker)) + 2
    return max(os.cpu_count() or 1, need)


def _check_cpus_left_for_data(cfg: RunConfig) -> None:
    """Ray Data's tasks need CPUs the training workers do not hold; without any, the first
    batch never comes and the run waits forever. Say so instead. Only on an embedded Ray:
    a cluster may be autoscaling from zero worker nodes, and will grow to what is asked."""
    import ray

    from pipelines.runtime import is_embedded

    if not is_embedded():
        return
    # an elastic run's group grows to the most workers that fit (scale.workers): count those
    total = ray.cluster_resources().get("CPU", 0)
    held = cfg.scale.workers * cfg.scale.cpus_per_worker
    if total - held < 0.5:
        raise ConfigError(f"Ray has {total:g} CPUs and the {cfg.scale.workers} training workers hold {held:g}: "
                          f"none is left for the data pipeline; lower --workers or scale.cpus_per_worker, or give "
                          f"Ray more CPUs")


def _check_gpus_exist(cfg: RunConfig) -> None:
    """Training workers that ask for more GPUs than an embedded Ray has would wait forever to be
    placed (on a machine without GPUs, or with fewer than --workers x --gpus-per-worker). Say so
    instead; only on an embedded Ray, for the same reason as the CPU check below."""
    import ray

    from pipelines.runtime import is_embedded

    if not cfg.scale.use_gpu or not is_embedded():
        return
    # an elastic run starts with what there is, so only its fewest workers must fit
    total = ray.cluster_resources().get("GPU", 0)
    need = cfg.scale.fewest * cfg.scale.gpus_per_worker
    if total < need:
        raise ConfigError(f"the training workers need {need:g} GPUs ({cfg.scale.fewest} x gpus_per_worker "
                          f"{cfg.scale.gpus_per_worker:g}) and Ray found {total:g} on this machine; train on CPUs "
                          f"(leave out --use-gpu, or --gpus-per-worker 0), or lower --workers")


def _user_error(error: BaseException) -> BaseException | None:
    """A worker's UserError (a store failure, an unreadable checkpoint, a bad setting), found
    in Ray Train's report of the failed workers: the CLI shows it as the one-line error it is.
    Anything else keeps Ray Train's full report (a bug's traceback)."""
    from pipelines.errors import UserError

    for failure in getattr(error, "worker_failures", {}).values():
        seen, e = 0, failure
        while e is not None and seen < 16:  # Ray Data and Ray wrap a read task's error
            if isinstance(e, UserError):
                cause = getattr(e, "cause", None)  # Ray's RayTaskError is also an instance of its cause
                return cause if isinstance(cause, UserError) else e
            e, seen = getattr(e, "cause", None) or e.__cause__ or e.__context__, seen + 1
    return None
