"""Frozen settings dataclasses that check themselves: the base of every config section (data,
model, train, scale, run).

A field's metadata (`setting(...)`) carries its help text and its allowed values; those and
the class's own `checks()` (bounds with `at_least`, rules across fields) run at construction,
so an impossible config never exists and a bad value is one line (`ConfigError`). `from_dict`
builds a section from plain JSON, nested sections included, refusing unknown keys and values of
the wrong type: a typo in a config file fails loudly instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from typing import Any, ClassVar

from .errors import ConfigError


def setting(default: Any = dataclasses.MISSING, *, help: str, choices: Iterable | None = None,
            flag: bool = False, factory: Any = dataclasses.MISSING, flag_type: Any = None) -> Any:
    """A config field with its help text; `choices` are checked at construction; `flag` also
    makes it a flag of the `train` command (its name with dashes), whose text `flag_type` reads
    when the field's type does not say how (default: the field's type)."""
    metadata = {"help": help, "flag": flag, "flag_type": flag_type}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


class Settings:
    """Mixin of the frozen config dataclasses: validation at construction, JSON in and out."""

    LABEL: ClassVar[str] = "config"  # how `from_dict` names this section in an unknown-key error

    def __post_init__(self) -> None:
        self.validate()

    def checks(self) -> Iterable[tuple[bool, str]]:
        """The section's rules, as (holds, the one line to show if not); the first failure wins."""
        return ()

    def validate(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if "choices" in meta and value not in meta["choices"]:
                raise ConfigError(f"{f.name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        for holds, message in self.checks():
            if not holds:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None):
        return build(cls, d, cls.LABEL)


def at_least(config, bound: float, *names: str) -> Iterable[tuple[bool, str]]:
    """A check for each named field of `config`: at least `bound` (None passes: not set)."""
    for name in names:
        value = getattr(config, name)
        yield value is None or value >= bound, f"{name} must be at least {bound}, got {value}"


def parse_set(items: Iterable[str]) -> dict:
    """`--set SECTION.KEY=VALUE` items as nested dicts; VALUE is JSON, or else a string (so
    `train.precision=bf16` needs no quotes)."""
    tree: dict = {}
    for item in items:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set {item}: expected SECTION.KEY=VALUE, e.g. --set train.lr=3e-4")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        put(tree, path, value)
    return tree


def put(tree: dict, path: str, value) -> None:
    """tree[a][b][c] = value for the dotted path a.b.c, making the sections on the way."""
    *sections, key = path.split(".")
    for name in sections:
        tree = tree.setdefault(name, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: {name} is given both a value and settings inside it")
    tree[key] = value


def read_config_file(path: str) -> dict:
    """The JSON object in the config file `path`, or ConfigError in one line."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return d


def build(cls, d: dict | None, label: str, path: str = ""):
    """`cls` from plain JSON: nested sections built the same way, lists made tuples where the
    field is a tuple; unknown keys and wrongly typed values raise ConfigError naming their path."""
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError(f"{path.rstrip('.') or label} must be a JSON object, got {d!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {label} key(s): {', '.join(path + k for k in unknown)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _typed(hints[name], value, label, path + name) for name, value in d.items()})


_NOUNS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object"}


def _typed(tp, value, label: str, path: str):
    """`value` as the field's type `tp` wants it, or ConfigError."""
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, label, path + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _typed(tp, value, label, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (Ellipsis not in args and len(value) != len(args)):
            size = "" if Ellipsis in args else f" of {len(args)}"
            raise ConfigError(f"{path} must be a list{size}, got {value!r}")
        items = args[:1] * len(value) if Ellipsis in args else args
        return tuple(_typed(t, v, label, f"{path}[{i}]") for i, (t, v) in enumerate(zip(items, value)))
    expected = origin or tp
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{path} must be {_NOUNS.get(expected, expected.__name__)}, got {value!r}")
    return value
