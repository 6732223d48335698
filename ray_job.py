#!/usr/bin/env python
"""One command line for every step of the pipeline: each runs on an embedded local Ray, or on a
cluster when --address or RAY_ADDRESS names one. A user's error is one line on stderr with exit
code 2; anything else is a bug and keeps its traceback (exit code 1).

Thin by design: parse, build a config, call `pipelines/` or `mmtrain/`; a user's error is a `UserError`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import typing

from mmtrain import credentials
from mmtrain.inference.commands import CommandHelpers, add_use_commands
from mmtrain.look_commands import add_look_commands
from mmtrain.mlflow_tracking import log_output
from mmtrain.version import project_version
from pipelines import console
from pipelines.errors import UserError


def _storage_options(args) -> dict:
    if not getattr(args, "storage_options", None):
        return {}
    try:
        opts = json.loads(args.storage_options)
    except json.JSONDecodeError as e:
        raise UserError(f"--storage-options is not valid JSON ({e.msg}); pass e.g. '{{\"anon\": false}}'")
    if not isinstance(opts, dict):
        raise UserError("--storage-options must be a JSON object")
    return opts


def _set_address(args) -> None:
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address


# --- subcommands ------------------------------------------------------------------------

def cmd_make_corpus(args) -> int:
    from pipelines.corpus import make_corpus

    if args.samples < 1 or args.shards < 1:
        raise UserError("--samples and --shards must be at least 1")
    info = make_corpus(args.out, args.samples, args.shards, seed=args.seed, subjects=args.subjects,
                       defects=args.defects, storage_options=_storage_options(args), progress=True)
    planted = f", {len(info.get('defects', []))} planted defects" if args.defects else ""
    print(f"wrote {info['samples']} samples in {len(info['shards'])} shards to {args.out}{planted}")
    return 0


def cmd_preprocess(args) -> int:
    from pipelines.config import DataConfig
    from pipelines.preprocess import format_summary, preprocess
    from pipelines.retry import NOT_FOUND, store_error_kind, store_failure
    from pipelines.settings import read_config_file

    _set_address(args)
    cfg = DataConfig.from_dict(read_config_file(args.config)) if args.config else DataConfig()
    if args.image_size is not None:
        cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, size=args.image_size))
    if args.no_dedup:
        cfg = dataclasses.replace(cfg, dedup=False)
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.shard_retries < 0:
        raise UserError("--shard-retries must be 0 or more")
    try:
        stats = preprocess(args.inputs, args.output, cfg=cfg, workers=args.workers,
                           storage_options=_storage_options(args), progress=not args.quiet,
                           shard_retries=args.shard_retries, say=lambda line: print(line, file=sys.stderr))
    except OSError as e:
        # the output store failed in the driver (a 403, a 503 after retries, a disk error);
        # anything that is not a store failure keeps its traceback (a bug); "not found" is
        # main's one-line error as it is
        if store_error_kind(e) in (None, NOT_FOUND):
            raise
        raise UserError(str(store_failure(e, args.output))) from None
    print(format_summary(stats, args.output))
    return 0


def cmd_train(args) -> int:
    from mmtrain.config import load_run_config
    from mmtrain.trainer import train

    _set_address(args)
    overrides = _train_overrides(args)
    train_over = overrides.get("train") or {}
    if train_over.get("max_steps") is not None and train_over.get("epochs") is not None:
        raise UserError("pass either --max-steps or --epochs, not both")
    cfg = load_run_config(args.config, **overrides)
    console.setup(os.path.join(cfg.run_dir, "logs"), args.verbose)
    summary = train(cfg)
    print(f"trained {summary['steps']} steps on {summary['samples'] or '?'} samples in {summary['seconds']} s; "
          f"checkpoint: {summary['checkpoint']}")
    return 0


def _train_overrides(args) -> dict:
    """What `train`'s flags and --set say about the run config, as nested dicts (--set first,
    so that a flag wins over the generic form of the same setting)."""
    from mmtrain.config import merged
    from mmtrain.data_sources import data_overrides
    from pipelines.settings import parse_set, put

    sections = parse_set(args.set)
    if "storage_options" in sections:
        # --storage-options is where credentials are hidden from process lists and job records
        raise UserError("--set cannot give storage options: pass them with --storage-options JSON")
    for dest, value in vars(args).items():
        if "." in dest and value is not None:  # the generated flags' dest: SECTION.FIELD
            put(sections, dest, value)
    _gpus_set_use_gpu(args, sections)
    flags = {"run_dir": args.run_dir, "seed": args.seed, "preset": args.preset,
             "storage_options": _storage_options(args) or None, "checkpoint_storage": args.checkpoint_storage}
    return merged({**sections, **{name: value for name, value in flags.items() if value is not None}},
                  data_overrides(args.data))


def _gpus_set_use_gpu(args, sections: dict) -> None:
    """--gpus-per-worker G on the command line says where to train: G > 0 on GPUs (scale.use_gpu,
    so that a CPU config moves to GPUs with one flag), 0 on CPUs; 0 beside --use-gpu is refused."""
    gpus = getattr(args, "scale.gpus_per_worker")
    if gpus is None:
        return
    if gpus == 0 and getattr(args, "scale.use_gpu"):
        raise UserError("--use-gpu with --gpus-per-worker 0: give each worker a GPU, "
                        "or leave out --use-gpu to train on CPUs")
    sections.setdefault("scale", {})["use_gpu"] = gpus > 0


def cmd_audit(args) -> int:
    from mmtrain.audit import check_run, report_lines

    report = check_run(args.run_dir, args.data, _storage_options(args))
    if not report["rows"]:
        raise UserError(f"no audit in {args.run_dir}/audit: train with --audit-samples")
    print(json.dumps(report, indent=1) if args.json else report_lines(report))
    return 0 if report["exactly_once"] else 1


def cmd_export(args) -> int:
    from mmtrain.export import export

    info = export(args.run_dir, args.output, storage_options=_storage_options(args) or None)
    check = info["probe_max_abs_diff"]
    verified = f"; matches the training engine (max |diff| {check:.2e})" if check is not None else ""
    print(f"exported {info['parameters']:,} parameters from {info['checkpoint']} to {info['output']}{verified}")
    log_output(args.run_dir, info["output"], "model")  # into the run's MLflow run, if it has one
    return 0


def cmd_plot(args) -> int:
    from mmtrain.metrics import plot_run

    path = plot_run(args.run_dir, args.output)
    print(path)
    log_output(args.run_dir, path)  # into the run's MLflow run, if it has one
    return 0


def cmd_demo(args) -> int:
    from mmtrain.demo import run_demo

    _set_address(args)
    console.setup(os.path.join(args.workdir, "run", "logs"), args.verbose)
    run_demo(args.workdir, samples=args.samples, quick=args.quick)
    return 0


# --- cluster jobs (Ray Jobs API; the logic is in clusters/jobs.py; its errors are UserErrors) ---

def cmd_submit(args) -> int:
    from clusters import jobs

    argv = list(args.job_args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    # before parsing: argparse's own errors would echo a credential given to an unknown flag
    jobs.refuse_secrets(argv, args.env, args.name)
    parsed = None
    if argv and argv[0] not in jobs.NOT_ALLOWED_INSIDE:
        # check the step's own arguments here, before anything is uploaded (argparse exits 2 on a bad one)
        parsed = build_parser().parse_args(argv)
    return jobs.submit(argv, address=args.address, parsed=parsed, wait=args.wait, name=args.name,
                       env_vars=args.env, pip=args.pip, pip_project=args.pip_project, exclude=args.exclude,
                       entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
                       strict=args.strict, dry_run=args.dry_run)


def cmd_status(args) -> int:
    from clusters import jobs

    return jobs.status(args.job_id, address=args.address, as_json=args.json)


def cmd_logs(args) -> int:
    from clusters import jobs

    return jobs.logs(args.job_id, address=args.address, follow_logs=args.follow)


def cmd_stop(args) -> int:
    from clusters import jobs

    return jobs.stop(args.job_id, address=args.address, timeout=args.timeout)


def cmd_list(args) -> int:
    from clusters import jobs

    return jobs.list_jobs(address=args.address, as_json=args.json)


# --- parser -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray_job.py", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--version", action="version", version=f"%(prog)s {project_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in (_data_commands, _train_command, _run_commands):
        add_commands(sub)
    helpers = CommandHelpers(_common, _storage_options, _set_address)
    for add_commands in (add_use_commands, add_look_commands):
        add_commands(sub, helpers)
    _job_commands(sub)
    return p


def _common(sp, storage: bool = True) -> None:
    sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local embedded Ray)")
    if storage:
        sp.add_argument("--storage-options", metavar="JSON",
                        help="fsspec storage options, e.g. '{\"client_kwargs\": {\"endpoint_url\": ...}}'")


def _data_commands(sub) -> None:
    sp = sub.add_parser("make-corpus", help="write a synthetic image-text-audio corpus")
    sp.add_argument("out", help="folder or fsspec URL for the shards")
    sp.add_argument("--samples", type=int, required=True, help="samples in all")
    sp.add_argument("--shards", type=int, default=1, help="tar shards to spread them over (default 1)")
    sp.add_argument("--subjects", type=int, default=16, help="distinct subjects (default 16)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the content (default 0)")
    sp.add_argument("--defects", action="store_true", help="plant one of each kind of defect")
    _common(sp)
    sp.set_defaults(fn=cmd_make_corpus)

    sp = sub.add_parser("preprocess", help="clean, transform and re-shard a corpus")
    sp.add_argument("inputs", nargs="+", metavar="INPUT", help="shards, folders, globs, {a..b} patterns, URLs")
    sp.add_argument("--output", required=True, help="a new or empty folder or fsspec URL")
    sp.add_argument("--workers", type=int, help="concurrent shard tasks (default: all CPUs)")
    sp.add_argument("--config", help="JSON file with data settings (see pipelines/config.py)")
    sp.add_argument("--image-size", type=int,
                    help="output images are SIZE x SIZE (default: the --config file's image.size, else 224)")
    sp.add_argument("--no-dedup", action="store_true", help="keep samples whose raw content was already kept")
    sp.add_argument("--shard-retries", type=int, default=3, metavar="N",
                    help="run a shard again at most N times after its task's process dies (OOM kill, crash), "
                         "then quarantine it whole as shard_crashed (default 3)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(sp)
    sp.set_defaults(fn=cmd_preprocess)


def _train_command(sub) -> None:
    from mmtrain.train_config import ScaleConfig, TrainConfig  # torch-free: every command builds this parser

    sp = sub.add_parser("train", help="train the multimodal model with DeepSpeed on Ray Train")
    sp.add_argument("--data", nargs="+", metavar="DATA", help="preprocessed output or raw shards; NAME=PATH[:WEIGHT] "
                    "entries: a weighted mixture (default: the config's data.sources or data_paths)")
    sp.add_argument("--run-dir", required=True, help="checkpoints, metrics and logs go here; re-run to resume")
    sp.add_argument("--config", help="run config JSON (see configs/)")
    sp.add_argument("--preset", help="model size preset: tiny, small, base, large, xl")
    sp.add_argument("--seed", type=int, help="seed of the model init, data order and RNGs (default 0)")
    for section, cls in (("train", TrainConfig), ("scale", ScaleConfig)):
        _section_flags(sp, section, cls)
    sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="any other run config setting, e.g. --set train.lr=3e-4 --set model.dropout=0.1 "
                         "--set data.image.size=160 (VALUE is JSON, or else a string); repeatable")
    sp.add_argument("--checkpoint-storage", metavar="URL",
                    help="keep checkpoints here (a shared path or an fsspec URL such as s3://bucket/run, reached "
                         "with --storage-options) instead of RUN; later commands on the run find it in RUN")
    console.add_verbose_flag(sp)
    _common(sp)
    sp.set_defaults(fn=cmd_train)


# where the field's name does not say the form
METAVARS = {"profile_steps": "A:B", "gpus_per_worker": "G", "mlflow": "URI", "workers": "N|MIN-MAX"}


def _section_flags(sp, section: str, cls) -> None:
    """A flag for each field of a config section marked flag=True: --NAME-WITH-DASHES, its help
    from the field's metadata, stored as SECTION.FIELD (None when not given: the config decides)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag"):
            continue
        kind = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        about = f.metadata["help"] + ("" if f.default in (None, False) else f" (default {f.default})")
        kw = {"help": about.replace("%", "%%"), "dest": f"{section}.{f.name}", "default": None}
        if kind[0] is bool:
            kw["action"] = "store_true"
        else:
            choices = f.metadata.get("choices")
            kw.update(type=f.metadata.get("flag_type") or kind[0], choices=choices,
                      metavar=None if choices else METAVARS.get(f.name, f.name.upper()))
        sp.add_argument("--" + f.name.replace("_", "-"), **kw)


def _run_commands(sub) -> None:
    sp = sub.add_parser("audit", help="check a run's --audit-samples record: every sample once per epoch")
    sp.add_argument("--run-dir", required=True, help="the run to check")
    sp.add_argument("--data", nargs="*", metavar="DATA",
                    help="the preprocessed folders trained on: also report samples never served")
    sp.add_argument("--json", action="store_true", help="the report as JSON")
    _common(sp)
    sp.set_defaults(fn=cmd_audit)

    sp = sub.add_parser("export", help="the latest checkpoint as one safetensors file (into the run's MLflow run too, if any)")
    sp.add_argument("--run-dir", required=True, help="the run to export")
    sp.add_argument("--output", required=True, help="the safetensors file to write")
    sp.add_argument("--storage-options", metavar="JSON",
                    help="fsspec options for the run's checkpoint storage (default: those it was trained with)")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("plot", help="loss and throughput of a run as a PNG (into the run's MLflow run too, if any)")
    sp.add_argument("--run-dir", required=True, help="the run to plot")
    sp.add_argument("--output", help="PNG path (default RUN/training.png)")
    sp.set_defaults(fn=cmd_plot)

    sp = sub.add_parser("demo", help="the whole flow on a synthetic corpus, on a local Ray")
    sp.add_argument("--workdir", default="demo_out", help="where the corpus, data and run go (default demo_out)")
    sp.add_argument("--samples", type=int, default=640, help="corpus size (default 640)")
    sp.add_argument("--quick", action="store_true", help="a tiny run that only shows the flow works")
    sp.add_argument("--address", help="Ray cluster address (default: a local embedded Ray)")
    console.add_verbose_flag(sp)
    sp.set_defaults(fn=cmd_demo)


def _job_address(sp) -> None:
    sp.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                                      "else RAY_ADDRESS if it is an http:// URL)")


def _job_commands(sub) -> None:
    sp = sub.add_parser("submit", help="run a step on a Ray cluster as a job (Ray Jobs API)",
                        description="Run `ray_job.py SUBCOMMAND ARGS` on a cluster: the project folder is uploaded as "
                                    "the job's working dir; the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                                    "~/.ray/auth_token) is sent. Paths must be absolute on shared storage or URLs.",
                        usage="ray_job.py submit [options] -- SUBCOMMAND ARGS...")
    _job_address(sp)
    sp.add_argument("--wait", action="store_true", help="stream the logs; exit 0 only if the job succeeds")
    sp.add_argument("--name", help="a name for the job (its id becomes NAME-xxxxxxxx)")
    sp.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="an environment variable for the job; repeatable")
    sp.add_argument("--pip", action="append", default=[], metavar="REQ",
                    help="install a requirement (or a requirements .txt) into a per-job virtualenv on every node; "
                         "repeatable (default: none, the nodes' environment is used as is)")
    sp.add_argument("--pip-project", action="store_true",
                    help="also install the project's dependencies from pyproject.toml (all but ray)")
    sp.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                    help="leave more out of the uploaded working dir (gitignore syntax); repeatable")
    sp.add_argument("--entrypoint-num-cpus", type=float, default=0,
                    help="CPUs reserved for the job's driver (default 0: the driver only orchestrates, and runs "
                         "on the head node)")
    sp.add_argument("--entrypoint-num-gpus", type=float, default=0, help="GPUs reserved for the job's driver (default 0)")
    sp.add_argument("--strict", action="store_true", help="refuse relative paths instead of warning")
    sp.add_argument("--dry-run", action="store_true", help="print the entrypoint and runtime_env; submit nothing")
    sp.add_argument("job_args", nargs=argparse.REMAINDER, metavar="-- SUBCOMMAND ARGS",
                    help="the step to run and its arguments")
    sp.set_defaults(fn=cmd_submit)

    for name, about, fn in (("status", "a cluster job's status", cmd_status),
                            ("logs", "a cluster job's logs", cmd_logs),
                            ("stop", "stop a cluster job and wait until it has stopped", cmd_stop)):
        sp = sub.add_parser(name, help=about)
        sp.add_argument("job_id", help="the id `submit` printed")
        _job_address(sp)
        sp.set_defaults(fn=fn)
        if name == "status":
            sp.add_argument("--json", action="store_true", help="the status as JSON")
        elif name == "logs":
            sp.add_argument("--follow", action="store_true",
                            help="stream until the job ends; exit 0 only if it succeeded")
        else:
            sp.add_argument("--timeout", type=float, default=60, help="seconds to wait for it to stop (default 60)")

    sp = sub.add_parser("list", help="the cluster's jobs")
    _job_address(sp)
    sp.add_argument("--json", action="store_true", help="the jobs as JSON")
    sp.set_defaults(fn=cmd_list)


def _hide_credentials_from_process_title() -> None:
    """Ray records a driver's command line (from /proc, not sys.argv) as its job's entrypoint,
    which `list`, `status` and the dashboard show, and `ps` shows it to every local user: with
    credentials in it (--storage-options '{"secret": ...}'), the process title is rewritten with
    them redacted before Ray starts. Ray's own setproctitle (it titles its workers with it)."""
    if not credentials.secret_arguments(sys.orig_argv):
        return
    import ray._raylet

    ray._raylet.setproctitle(shlex.join(credentials.redacted_argv(sys.orig_argv)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")):
        from pipelines.runtime import local_mode_env

        local_mode_env()
    if args.command not in ("submit", "status", "logs", "stop", "list"):
        _hide_credentials_from_process_title()  # imports ray: after local_mode_env
    from pipelines.retry import is_transient

    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, PermissionError) as e:
        # a UserError, or a path the user named that is missing or denied. Raised in a Ray task
        # or worker, it arrives as Ray's RayTaskError, an instance of its cause whose text is the
        # remote traceback: the cause's message is the line
        cause = getattr(e, "cause", None)
        print(f"error: {cause if isinstance(cause, BaseException) else e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_transient(e):
            raise
        # a store call of this process (listing the input, the output's job files) still failing
        # after botocore's and s3fs's retries: an outage, not a problem with the data
        print(f"error: the store kept failing ({type(e).__name__}: {e}); it is unreachable or throttling, "
              f"try again later".replace("\n", " "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
