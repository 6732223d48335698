#!/usr/bin/env python
"""The result tables of `benchmarks/README.md`, generated from the committed result files.

A table in the README sits between two markers that name its source and its renderer:

    <!-- table: results/preprocess.json via preprocess -->
    ... generated, never edited by hand ...
    <!-- end table -->

`results/NAME.json` is a file under `benchmarks/results/` (a benchmark's `--out`, committed);
`preprocess` is the benchmark module whose `render(results: dict, part: str) -> str` turns it into
markdown (`via preprocess:memory` passes `part="memory"`, for scripts with several tables).

    python benchmarks/tables.py            # rewrite every table in place
    python benchmarks/tables.py --check    # exit 1 if a table differs from its result file

`tests/test_benchmark_tables.py` runs the check, so a table typed by hand, or a result file
changed without regenerating, fails the suite.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
MARK = re.compile(r"<!-- table: (?P<src>\S+) via (?P<mod>[\w.]+)(?::(?P<part>\w+))? -->\n(?P<body>.*?)<!-- end table -->",
                  re.S)


def render_block(src: str, mod: str, part: str | None) -> str:
    path = os.path.normpath(os.path.join(HERE, src))
    if not path.startswith(os.path.join(HERE, "results") + os.sep):
        raise SystemExit(f"table source {src!r} is not under benchmarks/results/")
    with open(path) as f:
        results = json.load(f)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    module = importlib.import_module(mod)
    text = module.render(results, part or "")
    return text.rstrip("\n") + "\n"


def regenerate(readme_text: str) -> str:
    def one(m: re.Match) -> str:
        head = m.group(0)[: m.start("body") - m.start()]
        return head + render_block(m.group("src"), m.group("mod"), m.group("part")) + "<!-- end table -->"

    return MARK.sub(one, readme_text)


def differing(readme_text: str) -> list[str]:
    """The markers (`results/X.json via MODULE[:PART]`) whose table is not what the renderer makes."""
    return [f"{m.group('src')} via {m.group('mod')}" + (f":{m.group('part')}" if m.group("part") else "")
            for m in MARK.finditer(readme_text)
            if m.group("body") != render_block(m.group("src"), m.group("mod"), m.group("part"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a table differs from its result file")
    ap.add_argument("--readme", default=README)
    args = ap.parse_args()
    with open(args.readme) as f:
        old = f.read()
    new = regenerate(old)
    n = len(MARK.findall(old))
    if args.check:
        stale = differing(old)
        if stale:
            print(f"{args.readme}: generated tables differ from their result files: {', '.join(stale)}; "
                  f"run `python benchmarks/tables.py`", file=sys.stderr)
            return 1
        print(f"{n} table(s) match their result files")
        return 0
    if new != old:
        with open(args.readme, "w") as f:
            f.write(new)
    print(f"{n} table(s) regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
