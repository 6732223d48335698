"""`ray_job.py --help` tells the whole truth: every flag of every command says what it is and,
where it has a default worth knowing, what that default is; the top-level description is whole;
`--version` prints the project's version; the README's command list and the parser agree.
Parser only (no Ray): fast."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import ray_job

ROOT = Path(__file__).resolve().parent.parent
# commands that the parser has and the README's command list leaves out on purpose: none today
NOT_IN_README: set[str] = set()


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _every_action(parser: argparse.ArgumentParser, path: str = "ray_job.py"):
    """(command path, action) of every action in the parser tree, nested subparsers included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _every_action(sub, f"{path} {name}")
        else:
            yield path, action


def _flags():
    return [(path, a) for path, a in _every_action(ray_job.build_parser())
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_the_walk_reaches_every_command_and_the_generated_train_flags():
    seen = {(path, opt) for path, a in _flags() for opt in a.option_strings}
    # a walk that missed the subcommands would make every test below pass on nothing
    for expected in [("ray_job.py", "--version"), ("ray_job.py submit", "--pip"), ("ray_job.py stop", "--timeout"),
                     ("ray_job.py train", "--zero-stage"), ("ray_job.py serve", "--port")]:
        assert expected in seen


def test_every_argument_has_help_text():
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in _every_action(ray_job.build_parser())
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and not re.sub(r"\(default[^)]*\)", "", a.help or "").strip()]
    assert not missing, f"no help text that says what it is, not only its default: {missing}"


def test_a_flag_with_a_default_says_it_once():
    wrong = []
    for path, a in _flags():
        about = a.help or ""
        name = f"{path} {'/'.join(a.option_strings)}"
        if about.count("(default") > 1:
            wrong.append(f"{name}: says its default twice: {about!r}")
        if isinstance(a, argparse._AppendAction):
            # the default is the empty list: none given, none used; the help says the flag repeats
            if "repeatable" not in about:
                wrong.append(f"{name}: a repeatable flag whose help does not say so")
            continue
        if a.default is None or isinstance(a.default, bool) or isinstance(a, argparse._VersionAction):
            continue  # no default (the config or the command decides, and the help says how), or a switch
        said = (f"default {a.default}", f"default '{a.default}'", f"default: {a.default}")
        if not any(s in about for s in said):
            wrong.append(f"{name}: default {a.default!r} not in its help: {about!r}")
    assert not wrong, "\n".join(wrong)


def test_the_generated_train_flags_say_the_config_default():
    train = _commands(ray_job.build_parser())["train"]
    about = {a.option_strings[0]: a.help for a in train._actions if a.option_strings}
    # from TrainConfig / ScaleConfig: the flag's own default is None (the config decides), so the
    # help carries the field's default instead
    assert about["--batch-size"].endswith("(default 32)") and about["--workers"].endswith("(default 2)")
    assert "(default" not in about["--max-steps"] and "(default" not in about["--deterministic"]


def _doc_first_paragraph() -> str:
    return " ".join(ray_job.__doc__.split("\n\n")[0].split())


def test_the_top_level_description_is_the_docstring_s_whole_first_paragraph():
    parser = ray_job.build_parser()
    assert parser.description == _doc_first_paragraph()
    assert parser.description.endswith(".") and parser.description.count(".") >= 2  # sentences, none cut
    assert "exit code 2" in parser.description and "(exit code 1)." in parser.description
    assert parser.description in " ".join(parser.format_help().split())


def test_version_prints_the_pyproject_version():
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "--version"], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"ray_job.py {expected}\n", "")


def _readme_commands() -> dict[str, str]:
    """Subcommand -> its usage text (continuation lines joined, comments left out) in the README's
    code block under "## Command line"."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    commands: dict[str, str] = {}
    name = None
    for line in block.splitlines()[1:]:  # the first is the fence's language tag (empty)
        usage = re.sub(r"\s+#\s.*$", "", line)
        start = re.match(r"python ray_job\.py (\S+)(.*)", usage)
        if start:
            name = start.group(1)
            commands[name] = start.group(2)
        elif name and usage.strip():
            commands[name] += " " + usage.strip()
    return commands


def test_the_readme_command_list_and_the_parser_agree():
    readme = _readme_commands()
    parser = _commands(ray_job.build_parser())
    assert len(readme) >= 10  # the block was found and read
    assert sorted(set(readme) - set(parser)) == [], "README lists commands the parser does not have"
    assert sorted(set(parser) - set(readme) - NOT_IN_README) == [], "commands missing from the README's list"
    unknown = []
    for name, usage in readme.items():
        flags = {opt for a in parser[name]._actions for opt in a.option_strings}
        unknown += [f"{name} {flag}" for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", usage)
                    if flag not in flags]
    assert not unknown, f"README flags that the parser does not have: {unknown}"
