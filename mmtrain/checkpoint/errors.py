"""What reading a checkpoint can fail with, each shown by the CLI as one line (exit 2).

A read has three outcomes, kept apart on purpose: complete; incomplete, with a reason (the run
falls back to the previous complete checkpoint); and unreadable (`CheckpointUnreadable`): the
store or filesystem failed (403, 503 after retries, NFS ESTALE), so nothing is known about the
checkpoint and the resume stops, deleting nothing: an outage must never turn good checkpoints
into abandoned ones. `guarded` is where a store failure becomes that error.
"""
from __future__ import annotations

from typing import Callable

from pipelines.errors import UserError
from pipelines.retry import ReadRetriesExhausted, is_transient


class CheckpointUnreadable(UserError, ValueError):
    """A checkpoint file could not be read for a reason other than its absence: the store or
    filesystem failed, so the checkpoint's state is unknown."""


class CheckpointDamaged(UserError, ValueError):
    """A checkpoint's files do not match its done records."""


class UnsafeKey(UserError, ValueError):
    """An object whose key would land outside the folder it is copied into."""


def unreadable(url: str, e: BaseException) -> CheckpointUnreadable:
    what = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
    return CheckpointUnreadable(f"cannot read {url} ({what}); the checkpoint may be fine, so nothing was "
                                f"deleted or skipped: re-run when the storage answers (check credentials, "
                                f"permissions and --storage-options)")


def guarded(url: str, fn: Callable, *args):
    """fn(*args), with a failure of the store or filesystem (not a missing file) raised as
    CheckpointUnreadable naming `url`."""
    try:
        return fn(*args)
    except (FileNotFoundError, UnsafeKey):
        raise
    except (OSError, ReadRetriesExhausted) as e:
        raise unreadable(url, e) from None
    except Exception as e:
        if is_transient(e):
            raise unreadable(url, e) from None
        raise
