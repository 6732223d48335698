"""The one base of every error that is the user's to fix (a bad flag, a missing input, a store
that refuses access): the CLI prints its message as one line and exits 2. Any other exception is
a bug and keeps its traceback (exit 1)."""
from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for or gave us; the message is one line saying what to do."""


class ConfigError(UserError, ValueError):
    """A config that cannot work; the message is one line saying what to change. Also a
    ValueError: callers of the config constructors catch impossible values as one."""
