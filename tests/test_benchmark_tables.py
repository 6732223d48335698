"""The result tables in benchmarks/README.md are generated from the committed result files
(benchmarks/tables.py), never typed: each table matches what its renderer makes of its file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_generated_table_matches_its_result_file() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr + run.stdout


def test_a_table_edited_by_hand_is_caught(tmp_path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tables

    readme = (ROOT / "benchmarks" / "README.md").read_text()
    marks = list(tables.MARK.finditer(readme))
    assert marks, "benchmarks/README.md has no generated table"
    body = marks[0].group("body")
    edited = readme.replace(body, body.replace("|", "| 1", 1), 1)
    assert tables.regenerate(edited) != edited  # the check would fail on it
    assert tables.regenerate(edited) == tables.regenerate(readme)
