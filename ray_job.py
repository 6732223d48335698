#!/usr/bin/env python
"""One command line for every step: runs on an embedded local Ray, or on a cluster when
`--address` / RAY_ADDRESS names one. Thin by design: parse, build a config, call
`pipelines/` or `mmtrain/`. Errors are one line on stderr with a non-zero exit."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from mmtrain import credentials


class CliError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


def _storage_options(args) -> dict:
    if not getattr(args, "storage_options", None):
        return {}
    try:
        opts = json.loads(args.storage_options)
    except json.JSONDecodeError as e:
        raise CliError(f"--storage-options is not valid JSON ({e.msg}); pass e.g. '{{\"anon\": false}}'")
    if not isinstance(opts, dict):
        raise CliError("--storage-options must be a JSON object")
    return opts


def _set_address(args) -> None:
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address


# --- subcommands ------------------------------------------------------------------------

def cmd_make_corpus(args) -> int:
    from pipelines.corpus import make_corpus

    if args.samples < 1 or args.shards < 1:
        raise CliError("--samples and --shards must be at least 1")
    info = make_corpus(args.out, args.samples, args.shards, seed=args.seed, subjects=args.subjects,
                       defects=args.defects, storage_options=_storage_options(args), progress=True)
    planted = f", {len(info.get('defects', []))} planted defects" if args.defects else ""
    print(f"wrote {info['samples']} samples in {len(info['shards'])} shards to {args.out}{planted}")
    return 0


def cmd_preprocess(args) -> int:
    from pipelines.config import DataConfig
    from pipelines.preprocess import format_summary, preprocess
    from pipelines.retry import NOT_FOUND, StoreError, store_error_kind, store_failure

    _set_address(args)
    cfg = DataConfig.from_dict(_load_json_file(args.config)) if args.config else DataConfig()
    overrides = {}
    if args.image_size is not None:
        overrides["image"] = {**cfg.to_dict()["image"], "size": args.image_size}
    if args.no_dedup:
        overrides["dedup"] = False
    if overrides:
        cfg = DataConfig.from_dict({**cfg.to_dict(), **overrides})
    if args.workers is not None and args.workers < 1:
        raise CliError("--workers must be at least 1")
    if args.shard_retries < 0:
        raise CliError("--shard-retries must be 0 or more")
    try:
        stats = preprocess(args.inputs, args.output, cfg=cfg, workers=args.workers,
                           storage_options=_storage_options(args), progress=not args.quiet,
                           shard_retries=args.shard_retries, say=lambda line: print(line, file=sys.stderr))
    except StoreError as e:  # the store refused access or stayed down: not the data's fault
        raise CliError(str(e)) from None
    except OSError as e:
        # the output store failed in the driver (a 403, a 503 after retries, a disk error);
        # anything that is not a store failure keeps its traceback (a bug); "not found" is
        # main's one-line error as it is
        if store_error_kind(e) in (None, NOT_FOUND):
            raise
        raise CliError(str(store_failure(e, args.output))) from None
    print(format_summary(stats, args.output))
    return 0


def _load_json_file(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CliError(f"config file {path} does not exist")
    except json.JSONDecodeError as e:
        raise CliError(f"config file {path} is not valid JSON: {e.msg} at line {e.lineno}")


def cmd_train(args) -> int:
    from mmtrain.config import load_run_config
    from mmtrain.trainer import train

    _set_address(args)
    if args.max_steps is not None and args.epochs is not None:
        raise CliError("pass either --max-steps or --epochs, not both")
    train_over = {k: v for k, v in {
        "zero_stage": args.zero_stage, "max_steps": args.max_steps, "epochs": args.epochs,
        "batch_size": args.batch_size, "checkpoint_every": args.checkpoint_every,
        "deterministic": True if args.deterministic else None,
        "audit_samples": True if args.audit_samples else None, "precision": args.precision,
        "max_failures": args.max_failures,
    }.items() if v is not None}
    cfg = load_run_config(
        args.config, data_paths=list(args.data), run_dir=args.run_dir, seed=args.seed,
        storage_options=_storage_options(args) or None, checkpoint_storage=args.checkpoint_storage,
        preset=args.preset, train=train_over or None,
        scale={"workers": args.workers} if args.workers is not None else None,
    )
    summary = train(cfg)
    print(f"trained {summary['steps']} steps on {summary['samples'] or '?'} samples in {summary['seconds']} s; "
          f"checkpoint: {summary['checkpoint']}")
    return 0


def cmd_audit(args) -> int:
    from mmtrain.audit import check, manifest_ids

    expected = manifest_ids(args.data, _storage_options(args)) if args.data else None
    report = check(args.run_dir, expected)
    if not report["rows"]:
        raise CliError(f"no audit in {args.run_dir}/audit: train with --audit-samples")
    print(json.dumps(report, indent=1) if args.json else _audit_lines(report))
    return 0 if report["exactly_once"] else 1


def _audit_lines(report: dict) -> str:
    lines = [f"{report['rows']} audit rows from {report['attempts']} attempt(s); "
             f"{report['superseded_rows']} superseded (steps run again after a restart)"]
    for epoch, e in report["epochs"].items():
        lines.append(f"epoch {epoch}: {e['samples']} samples, {e['served_twice']} served twice, "
                     f"{e['never_served']} never served" + (f"  e.g. {e['examples'][0]}" if e["examples"] else ""))
    lines.append("exactly once: " + ("yes" if report["exactly_once"] else "NO"))
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from mmtrain.evaluate import evaluate

    _set_address(args)
    result = evaluate(args.run_dir, args.data, output=args.output, batch_size=args.batch_size,
                      storage_options=_storage_options(args))
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def cmd_export(args) -> int:
    from mmtrain.export import export

    info = export(args.run_dir, args.output, storage_options=_storage_options(args) or None)
    check = info["probe_max_abs_diff"]
    verified = f"; matches the training engine (max |diff| {check:.2e})" if check is not None else ""
    print(f"exported {info['parameters']:,} parameters from {info['checkpoint']} to {info['output']}{verified}")
    return 0


def cmd_plot(args) -> int:
    from mmtrain.metrics import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


def cmd_demo(args) -> int:
    from mmtrain.demo import run_demo

    _set_address(args)
    run_demo(args.workdir, samples=args.samples, quick=args.quick)
    return 0


# --- cluster jobs (Ray Jobs API; the logic is in clusters/jobs.py) -----------------------

def _job_call(fn, *a, **kw) -> int:
    from clusters.jobs import JobCommandError

    try:
        return fn(*a, **kw)
    except JobCommandError as e:
        raise CliError(str(e)) from None


def cmd_submit(args) -> int:
    from clusters import jobs

    argv = list(args.job_args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    # before parsing: argparse's own errors would echo a credential given to an unknown flag
    _job_call(jobs.refuse_secrets, argv, args.env, args.name)
    parsed = None
    if argv and argv[0] not in jobs.NOT_ALLOWED_INSIDE:
        # check the step's own arguments here, before anything is uploaded (argparse exits 2 on a bad one)
        parsed = build_parser().parse_args(argv)
    return _job_call(jobs.submit, argv, address=args.address, parsed=parsed, wait=args.wait, name=args.name,
                     env_vars=args.env, pip=args.pip, pip_project=args.pip_project, exclude=args.exclude,
                     entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
                     strict=args.strict, dry_run=args.dry_run)


def cmd_status(args) -> int:
    from clusters import jobs

    return _job_call(jobs.status, args.job_id, address=args.address, as_json=args.json)


def cmd_logs(args) -> int:
    from clusters import jobs

    return _job_call(jobs.logs, args.job_id, address=args.address, follow_logs=args.follow)


def cmd_stop(args) -> int:
    from clusters import jobs

    return _job_call(jobs.stop, args.job_id, address=args.address, timeout=args.timeout)


def cmd_list(args) -> int:
    from clusters import jobs

    return _job_call(jobs.list_jobs, address=args.address, as_json=args.json)


# --- parser -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray_job.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, storage=True):
        sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local embedded Ray)")
        if storage:
            sp.add_argument("--storage-options", metavar="JSON",
                            help="fsspec storage options, e.g. '{\"client_kwargs\": {\"endpoint_url\": ...}}'")

    sp = sub.add_parser("make-corpus", help="write a synthetic image-text-audio corpus")
    sp.add_argument("out")
    sp.add_argument("--samples", type=int, required=True)
    sp.add_argument("--shards", type=int, default=1)
    sp.add_argument("--subjects", type=int, default=16)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--defects", action="store_true", help="plant one of each kind of defect")
    common(sp)
    sp.set_defaults(fn=cmd_make_corpus)

    sp = sub.add_parser("preprocess", help="clean, transform and re-shard a corpus")
    sp.add_argument("inputs", nargs="+", metavar="INPUT", help="shards, folders, globs, {a..b} patterns, URLs")
    sp.add_argument("--output", required=True)
    sp.add_argument("--workers", type=int, help="concurrent shard tasks (default: all CPUs)")
    sp.add_argument("--config", help="JSON file with data settings (see pipelines/config.py)")
    sp.add_argument("--image-size", type=int)
    sp.add_argument("--no-dedup", action="store_true")
    sp.add_argument("--shard-retries", type=int, default=3, metavar="N",
                    help="run a shard again at most N times after its task's process dies (OOM kill, crash), "
                         "then quarantine it whole as shard_crashed (default 3)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    common(sp)
    sp.set_defaults(fn=cmd_preprocess)

    sp = sub.add_parser("train", help="train the multimodal model with DeepSpeed on Ray Train")
    sp.add_argument("--data", nargs="+", required=True, metavar="DATA", help="preprocessed output or raw shards")
    sp.add_argument("--run-dir", required=True, help="checkpoints, metrics and logs go here; re-run to resume")
    sp.add_argument("--config", help="run config JSON (see configs/)")
    sp.add_argument("--preset", help="model size preset: tiny, small, base, large, xl")
    sp.add_argument("--workers", type=int)
    sp.add_argument("--zero-stage", type=int)
    sp.add_argument("--max-steps", type=int)
    sp.add_argument("--epochs", type=int)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--checkpoint-every", type=int)
    sp.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    sp.add_argument("--seed", type=int)
    sp.add_argument("--deterministic", action="store_true", help="reproducible data order, RNG and kernels")
    sp.add_argument("--audit-samples", action="store_true", help="write RUN/audit/*.jsonl: sample ids per step")
    sp.add_argument("--max-failures", type=int, help="automatic restarts after a worker or node dies "
                                                     "(default 3; -1: unlimited)")
    sp.add_argument("--checkpoint-storage", metavar="URL",
                    help="keep checkpoints here (a shared path or an fsspec URL such as s3://bucket/run, reached "
                         "with --storage-options) instead of RUN; later commands on the run find it in RUN")
    common(sp)
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("audit", help="check a run's --audit-samples record: every sample once per epoch")
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--data", nargs="*", metavar="DATA",
                    help="the preprocessed folders trained on: also report samples never served")
    sp.add_argument("--json", action="store_true")
    common(sp)
    sp.set_defaults(fn=cmd_audit)

    sp = sub.add_parser("evaluate", help="retrieval recall@k and caption loss of a run's latest checkpoint")
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--data", nargs="+", required=True, metavar="DATA")
    sp.add_argument("--output", help="write the results JSON here")
    sp.add_argument("--batch-size", type=int, default=64)
    common(sp)
    sp.set_defaults(fn=cmd_evaluate)

    sp = sub.add_parser("export", help="consolidate the latest checkpoint into one safetensors file")
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--output", required=True)
    sp.add_argument("--storage-options", metavar="JSON",
                    help="fsspec options for the run's checkpoint storage (default: those it was trained with)")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("plot", help="loss and throughput of a run as a PNG")
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--output", help="PNG path (default RUN/training.png)")
    sp.set_defaults(fn=cmd_plot)

    sp = sub.add_parser("demo", help="the whole flow on a synthetic corpus, on a local Ray")
    sp.add_argument("--workdir", default="demo_out")
    sp.add_argument("--samples", type=int, default=640)
    sp.add_argument("--quick", action="store_true", help="a tiny run that only shows the flow works")
    sp.add_argument("--address", help="Ray cluster address (default: a local embedded Ray)")
    sp.set_defaults(fn=cmd_demo)

    def job_address(sp):
        sp.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                                          "else RAY_ADDRESS if it is an http:// URL)")

    sp = sub.add_parser("submit", help="run a step on a Ray cluster as a job (Ray Jobs API)",
                        description="Run `ray_job.py SUBCOMMAND ARGS` on a cluster: the project folder is uploaded as "
                                    "the job's working dir; the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                                    "~/.ray/auth_token) is sent. Paths must be absolute on shared storage or URLs.",
                        usage="ray_job.py submit [options] -- SUBCOMMAND ARGS...")
    job_address(sp)
    sp.add_argument("--wait", action="store_true", help="stream the logs; exit 0 only if the job succeeds")
    sp.add_argument("--name", help="a name for the job (its id becomes NAME-xxxxxxxx)")
    sp.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment variable for the job")
    sp.add_argument("--pip", action="append", default=[], metavar="REQ",
                    help="install a requirement (or a requirements .txt) into a per-job virtualenv on every node; "
                         "default: nothing is installed, the nodes' environment is used as is")
    sp.add_argument("--pip-project", action="store_true",
                    help="also install the project's dependencies from pyproject.toml (all but ray)")
    sp.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                    help="leave more out of the uploaded working dir (gitignore syntax)")
    sp.add_argument("--entrypoint-num-cpus", type=float, default=0,
                    help="CPUs reserved for the job's driver (default 0: the driver only orchestrates, and runs "
                         "on the head node)")
    sp.add_argument("--entrypoint-num-gpus", type=float, default=0)
    sp.add_argument("--strict", action="store_true", help="refuse relative paths instead of warning")
    sp.add_argument("--dry-run", action="store_true", help="print the entrypoint and runtime_env; submit nothing")
    sp.add_argument("job_args", nargs=argparse.REMAINDER, metavar="-- SUBCOMMAND ARGS")
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("status", help="a cluster job's status")
    sp.add_argument("job_id")
    job_address(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("logs", help="a cluster job's logs")
    sp.add_argument("job_id")
    job_address(sp)
    sp.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 only if it succeeded")
    sp.set_defaults(fn=cmd_logs)

    sp = sub.add_parser("stop", help="stop a cluster job and wait until it has stopped")
    sp.add_argument("job_id")
    job_address(sp)
    sp.add_argument("--timeout", type=float, default=60)
    sp.set_defaults(fn=cmd_stop)

    sp = sub.add_parser("list", help="the cluster's jobs")
    job_address(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_list)
    return p


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
    from pipelines.retry import StoreError, is_transient

    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except StoreError as e:
        # the store refused access or stayed down. Raised in a Ray task, it arrives as Ray's
        # RayTaskError, whose text is the worker's traceback: the cause's one line is the message
        print(f"error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        return 2
    except (CliError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
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
