"""The commands that look at what the pipeline made, without changing it: `show RUN` (one
screen about a training run) and `inspect OUT` (a preprocessed output's counts, quarantine
reasons, distributions and a contact sheet). Parser blocks and `cmd_X(args, h)` here, as in
`inference/commands.py`; torch-free at import (every command line builds this parser).
"""
from __future__ import annotations

import functools
import json


def add_look_commands(sub, h) -> None:
    for add in (_show_command, _inspect_command):
        add(sub, h)


def _storage(sp) -> None:
    # no --address: these read files, and start no Ray
    sp.add_argument("--storage-options", metavar="JSON",
                    help="fsspec storage options for a URL, e.g. '{\"client_kwargs\": {\"endpoint_url\": ...}}'")


# --- show ---------------------------------------------------------------------------------

def _show_command(sub, h) -> None:
    sp = sub.add_parser("show", help="one screen about a training run: config, progress, checkpoints, "
                                     "restarts, audit, evaluation")
    sp.add_argument("run", metavar="RUN", help="the run directory (local, or a URL with --storage-options)")
    sp.add_argument("--json", action="store_true", help="the same as one JSON object")
    _storage(sp)
    sp.set_defaults(fn=functools.partial(cmd_show, h=h))


def cmd_show(args, h) -> int:
    from .run_overview import format_overview, run_overview

    overview = run_overview(args.run, storage_options=h.storage_options(args))
    print(json.dumps(overview, indent=1, sort_keys=True) if args.json else format_overview(overview))
    return 0


# --- inspect ------------------------------------------------------------------------------

def _inspect_command(sub, h) -> None:
    sp = sub.add_parser("inspect", help="a preprocessed output's counts, quarantine reasons with example keys, "
                                        "size and length distributions, and a contact sheet")
    sp.add_argument("out", metavar="OUT", help="a `preprocess` output folder (or URL with --storage-options)")
    sp.add_argument("--sheet", metavar="FILE.png",
                    help="write a contact sheet: kept samples (image and caption) and quarantined ones that "
                         "still have a viewable image, labelled with their reason")
    sp.add_argument("--n", type=int, default=16, metavar="N", help="kept samples on the sheet, at most 1024 (default 16)")
    sp.add_argument("--examples", type=int, default=3, metavar="K",
                    help="example keys listed per quarantine reason (default 3)")
    sp.add_argument("--json", action="store_true", help="the report as one JSON object")
    _storage(sp)
    sp.set_defaults(fn=functools.partial(cmd_inspect, h=h))


def cmd_inspect(args, h) -> int:
    from pipelines.inspect_output import contact_sheet, format_inspection, inspect_output

    opts = h.storage_options(args)
    report = inspect_output(args.out, storage_options=opts, examples=args.examples)
    if args.sheet:
        report["sheet"] = contact_sheet(args.out, args.sheet, n=args.n, storage_options=opts)
    print(json.dumps(report, indent=1, sort_keys=True) if args.json else format_inspection(report))
    return 0
