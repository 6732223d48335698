"""The code's shape stays readable: no product file over 450 lines, no function over 60 lines
without a comment that says why it is long, and one way from a URL to a filesystem. Reads the
source only (no Ray, no imports of the product): fast.

A long function says why with the words "long because" in a comment inside it or in its
docstring, e.g. `# long because: one straight pass over a tar header, easier to check whole`.
"""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("pipelines", "mmtrain", "clusters", "benchmarks")
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60
WHY_LONG = "long because"
STORAGE = "pipelines/storage.py"  # the one module that turns a URL into a filesystem


def product_files() -> list[Path]:
    files = [p for d in PRODUCT for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(files) + [ROOT / "ray_job.py"]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def comment_lines(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    return {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def long_functions_without_why(path: Path) -> list[str]:
    source = path.read_text()
    comments = comment_lines(source)
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        if length <= MAX_FUNCTION_LINES:
            continue
        said = [ast.get_docstring(node) or ""] + [comments.get(n, "") for n in range(node.lineno, node.end_lineno + 1)]
        if not any(WHY_LONG in text.lower() for text in said):
            found.append(f"{rel(path)}:{node.lineno} {node.name} ({length} lines)")
    return found


def url_to_fs_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        named = (isinstance(node, ast.Attribute) and node.attr == "url_to_fs") \
            or (isinstance(node, ast.Name) and node.id == "url_to_fs") \
            or (isinstance(node, ast.ImportFrom) and any(a.name == "url_to_fs" for a in node.names))
        if named:
            found.append((node.lineno, f"{rel(path)}:{node.lineno}"))
    return [f for _, f in sorted(found)]


def test_no_product_file_is_over_450_lines():
    over = [f"{rel(p)} ({n} lines)" for p in product_files()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not over, "split these files:\n" + "\n".join(over)


def test_every_long_function_says_why_it_is_long():
    found = [f for p in product_files() for f in long_functions_without_why(p)]
    assert not found, (f"functions over {MAX_FUNCTION_LINES} lines without a '{WHY_LONG}' comment or "
                       "docstring:\n" + "\n".join(found))


def test_only_the_storage_module_turns_a_url_into_a_filesystem():
    found = [f for p in product_files() if rel(p) != STORAGE for f in url_to_fs_calls(p)]
    assert not found, "use pipelines.storage.filesystem instead of fsspec's url_to_fs:\n" + "\n".join(found)
