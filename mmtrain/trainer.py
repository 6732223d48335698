"""The driver side of training: resolve data, tokenizer and DeepSpeed config, then run a
Ray Train TorchTrainer (scaling, storage, failure and checkpoint configs) and resume from
the run's latest complete checkpoint (in the run directory or its checkpoint storage) when
there is one."""
from __future__ import annotations

import json
import math
import os
import time

import fsspec
from ray.train import DataConfig

from pipelines.retry import open_retrying, read_parquet_retrying, with_retry_defaults
from pipelines.shards import expand_shards
from pipelines.storage import join

from .checkpoint import CheckpointStore, location
from .config import ConfigError, RunConfig
from .deepspeed_config import build_deepspeed_config, total_steps
from .run_lock import RunLock
from .tokenizer import build_tokenizer, load_tokenizer, save_tokenizer


def shard_counts(shards: list[str], storage_options: dict | None) -> dict[str, int] | None:
    """Samples per shard from the preprocess manifests next to the shards, if every shard has
    one (raw shards have none: their size is only known by reading them)."""
    counts: dict[str, int] = {}
    folders = sorted({s.rsplit("/", 1)[0] for s in shards})
    for folder in folders:
        fs, path = fsspec.core.url_to_fs(folder, **with_retry_defaults(folder, storage_options))
        manifest = f"{path}/_manifest.parquet"
        if not fs.exists(manifest):
            return None
        table = read_parquet_retrying(fs, manifest, columns=["output_shard"])
        for row in table.group_by("output_shard").aggregate([("output_shard", "count")]).to_pylist():
            counts[f"{folder}/{row['output_shard']}"] = row["output_shard_count"]
    return {s: counts.get(s, 0) for s in shards}


def check_preprocessed(shards: list[str], cfg: RunConfig) -> bool:
    """True if the shards are our preprocess output (all of them), False if raw (all of them).
    Preprocessed shards carry their transform settings; they must match the run's."""
    kinds = set()
    for folder in sorted({s.rsplit("/", 1)[0] for s in shards}):
        fs, path = fsspec.core.url_to_fs(folder, **with_retry_defaults(folder, cfg.storage_options))
        has_stats = fs.exists(f"{path}/_stats.json")
        kinds.add(has_stats)
        if not has_stats:
            continue
        with open_retrying(fs, f"{path}/_stats.json") as f:
            data = json.load(f).get("data", {})
        theirs, ours = data.get("image", {}).get("size"), cfg.data.image.size
        if theirs is not None and theirs != ours:
            raise ConfigError(f"{folder} was preprocessed at image size {theirs}, the run uses {ours}; "
                              f"set data.image.size to {theirs} or preprocess again")
        audio = {k: data.get("audio", {}).get(k) for k in ("sample_rate", "seconds", "n_mels", "hop_ms", "win_ms")}
        mine = {k: getattr(cfg.data.audio, k) for k in audio}
        if any(v is not None and v != mine[k] for k, v in audio.items()):
            raise ConfigError(f"{folder} was preprocessed with audio settings {audio}, the run uses {mine}")
    if len(kinds) > 1:
        raise ConfigError("--data mixes preprocessed output and raw shards; train on one kind at a time")
    return kinds == {True}


def prepare_tokenizer(cfg: RunConfig, shards: list[str]):
    directory = os.path.join(cfg.run_dir, "tokenizer")
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return load_tokenizer(directory)
    texts = None
    if cfg.tokenizer == "bpe":
        from pipelines.source import iter_tar_samples

        texts = [raw.members["txt"].decode("utf-8", "replace")
                 for s in shards[:64] for raw in iter_tar_samples(s, storage_options=cfg.storage_options)
                 if raw.error is None and "txt" in raw.members]
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
    with RunLock(cfg.run_dir, log=log):
        return _train(cfg, log=log)


def _train(cfg: RunConfig, *, log=print) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ingest import build_dataset, epoch_clock, epochs_per_pass
    from pipelines.runtime import init_ray

    from .loop import train_loop_per_worker

    # workers run in other directories (and on other nodes): every path they get is absolute
    cfg = cfg.replace(run_dir=os.path.abspath(cfg.run_dir))
    os.makedirs(cfg.run_dir, exist_ok=True)
    cfg = cfg.replace(checkpoint_storage=location.settled(cfg.run_dir, cfg.checkpoint_storage))
    checkpoints = location.checkpoint_root(cfg.run_dir, cfg.checkpoint_storage)
    store = CheckpointStore.writable(checkpoints, cfg.storage_options)
    shards = expand_shards(list(cfg.data_paths), cfg.storage_options)
    preprocessed = check_preprocessed(shards, cfg)
    tokenizer = prepare_tokenizer(cfg, shards)
    cfg = cfg.replace(model={"vocab_size": tokenizer.vocab_size,
                             "gradient_checkpointing": cfg.train.activation_checkpointing})
    counts = shard_counts(shards, cfg.storage_options)
    init_ray(num_cpus=local_cpus(cfg))
    _check_cpus_left_for_data(cfg)
    dataset_kwargs = dict(seed=cfg.seed, preprocessed=preprocessed, storage_options=cfg.storage_options,
                          shard_counts=counts)
    n_samples = sum(counts.values()) if counts else None
    if n_samples is None and cfg.train.max_steps is None:
        log("counting samples (raw shards carry no manifest; preprocess them to skip this)...")
        n_samples = build_dataset(shards, cfg.data, **dataset_kwargs).count()
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
    steps = total_steps(cfg, n_samples, world, per_pass)
    ds_config = build_deepspeed_config(cfg, world, steps, on_gpu=cfg.scale.use_gpu)
    with open(os.path.join(cfg.run_dir, "run_config.json"), "w") as f:
        f.write(cfg.to_json())
    with open(os.path.join(cfg.run_dir, "deepspeed_config.json"), "w") as f:
        json.dump(ds_config, f, indent=1)

    # Ray Train finds the run's checkpoints itself (its snapshot next to them) and the workers
    # check them (loop._resume_point); this tells the user what will happen
    latest = store.latest_complete(log=log)
    if latest:
        saved = store.saved_state(latest)
        if saved.zero_stage != cfg.train.zero_stage:
            raise ConfigError(f"{latest} was written with ZeRO stage {saved.zero_stage}; resume with "
                              f"--zero-stage {saved.zero_stage} (changing the stage of a run is not supported)")
        log(f"resuming from {latest}" + (f" (written by {saved.world_size} workers, now {world}: elastic resume)"
                                         if saved.world_size != world else ""))
    # the controller polls workers every 2 s by default, which stalls each checkpoint report
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    clock_name = f"epoch-clock-{abs(hash(os.path.abspath(cfg.run_dir)))}-{time.time_ns()}"
    clock = epoch_clock(clock_name)
    if cfg.train.deterministic:
        # a reproducible split: rank r reads the shards at r, r+W, ... of the epoch's order, in
        # order, so a resumed rank is served exactly the rest of what it would have read
        datasets = {f"train_{r}": build_dataset(shards, cfg.data, clock_name=clock_name, rank=r, world=world,
                                                **dataset_kwargs) for r in range(world)}
        options = DataConfig.default_ingest_options()
        options.preserve_order = True
        dataset_config = DataConfig(datasets_to_split=[], execution_options=options)
    else:
        datasets = {"train": build_dataset(shards, cfg.data, clock_name=clock_name, **dataset_kwargs)}
        dataset_config = ExactSplit(datasets_to_split=["train"])
    # Ray Train's dashboard (Train state API) serves train_loop_config to every token holder: the
    # credentials in the storage options reach the workers as an object reference instead (owned
    # by this driver, so it resolves for every worker group Ray Train starts while the run lives)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.to_public_dict(), "storage_options": ray.put(cfg.storage_options),
                           "deepspeed": ds_config, "clock": clock_name,
                           "storage": checkpoints, "per_rank_data": cfg.train.deterministic,
                           "epochs_per_pass": per_pass, "samples_per_epoch": n_samples,
                           "fault_pause": os.environ.get("MMTRAIN_FAULT_PAUSE")},
        torch_config=TorchConfig(backend="nccl" if cfg.scale.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=world, use_gpu=cfg.scale.use_gpu,
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
    started = time.time()
    try:
        result = trainer.fit()  # raises Ray Train's report when the run fails
    except Exception as e:
        user = _user_error(e)
        if user is None:
            raise
        raise user from e
    finally:
        ray.kill(clock)
    done = (result.metrics or {}).get("step", steps)
    return {"steps": done, "scheduled_steps": steps, "steps_per_epoch": steps_per_epoch, "samples": n_samples,
            "resumed_from": latest,
            "seconds": round(time.time() - started, 1),
            "checkpoint": join(checkpoints, os.path.basename(result.checkpoint.path))
            if result.checkpoint else None}


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
    total = ray.cluster_resources().get("CPU", 0)
    held = cfg.scale.workers * cfg.scale.cpus_per_worker
    if total - held < 0.5:
        raise ConfigError(f"Ray has {total:g} CPUs and the {cfg.scale.workers} training workers hold {held:g}: "
                          f"none is left for the data pipeline; lower --workers or scale.cpus_per_worker, or give "
                          f"Ray more CPUs")


def _user_error(error: BaseException) -> BaseException | None:
    """A worker's store failure (a refused credential, a store that stays down) or unreadable
    checkpoint, found in Ray Train's report of the failed workers: the CLI shows it as the
    one-line error it is. Anything else keeps Ray Train's full report (a bug's traceback)."""
    from pipelines.retry import StoreError

    from .checkpoint import CheckpointUnreadable

    for failure in getattr(error, "worker_failures", {}).values():
        seen, e = 0, failure
        while e is not None and seen < 16:  # Ray Data and Ray wrap a read task's error
            if isinstance(e, (StoreError, CheckpointUnreadable)):
                cause = getattr(e, "cause", None)  # Ray's RayTaskError is also an instance of its cause
                return cause if isinstance(cause, (StoreError, CheckpointUnreadable)) else e
            e, seen = getattr(e, "cause", None) or e.__cause__ or e.__context__, seen + 1
    return None
