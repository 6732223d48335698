"""Frozen settings dataclasses that check themselves: the base of every config section (data,
model, train, scale, run).

A field's metadata (`setting(...)`) carries its help text, its allowed values and its lower
bound; those and the class's own cross-field `checks()` run at construction, so an impossible
config never exists and a bad value is one line (`ConfigError`). `from_dict` builds a section
from plain JSON, nested sections included, refusing unknown keys and values of the wrong type:
a typo in a config file fails loudly instead of being silently ignored.
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
            at_least: float | None = None, flag: bool = False, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text; `choices` and `at_least` are checked at construction;
    `flag` also makes it a flag of the `train` command (its name with dashes)."""
    metadata = {"help": help, "flag": flag}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if at_least is not None:
        metadata["at_least"] = at_least
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


class Settings:
    """Mixin of the frozen config dataclasses: validation at construction, JSON in and out."""

    LABEL: ClassVar[str] = "config"  # how `from_dict` names this section in an unknown-key error

    def __post_init__(self) -> None:
        self.validate()

    def checks(self) -> Iterable[tuple[bool, str]]:
        """Rules across fields, as (holds, the one line to show if not); first failure wins."""
        return ()

    def validate(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if "choices" in meta and value not in meta["choices"]:
                raise ConfigError(f"{f.name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
            if "at_least" in meta and value is not None and value < meta["at_least"]:
                raise ConfigError(f"{f.name} must be at least {meta['at_least']}, got {value}")
        for holds, message in self.checks():
            if not holds:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None):
        return build(cls, d, cls.LABEL)


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
