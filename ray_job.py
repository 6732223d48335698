#!/usr/bin/env python
"""One command line for every step: runs on an embedded local Ray, or on a cluster when
`--address` / RAY_ADDRESS names one. Thin by design: parse, build a config, call
`pipelines/` or `mmtrain/`. Errors are one line on stderr with a non-zero exit."""
from __future__ import annotations

import argparse
import json
import os
import sys


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
    stats = preprocess(args.inputs, args.output, cfg=cfg, workers=args.workers,
                       storage_options=_storage_options(args), progress=not args.quiet)
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
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    common(sp)
    sp.set_defaults(fn=cmd_preprocess)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
