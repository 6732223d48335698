"""The Ray cluster token: where this machine keeps it, and the header that carries it.

Ray 2.60 clusters here run with token authentication (RAY_AUTH_MODE=token). The token is found in
Ray's own order: RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token; `clusters.local start --token-file F` puts its flag first. The job client
sends it with every request; `clusters.local` hands its location to the nodes it starts. A named
file that cannot be read or is empty is a one-line error, never a silent fallback to another
token. The token itself is never printed, logged or put into anything a job stores: messages and
state name only where it came from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pipelines.errors import UserError

HOME_FILE = "~/.ray/auth_token"
LOOKED_IN = f"RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and {HOME_FILE}"


class TokenError(UserError):
    """A token file that is named but cannot be read or holds nothing (one line, exit 2)."""


@dataclass(frozen=True)
class TokenPlace:
    """Where the token is: `source` is what named it ("--token-file", "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token", or "generated" by clusters.local) and `path` the
    file that holds it, None for the RAY_AUTH_TOKEN variable."""

    source: str
    path: str | None = None

    def read(self) -> str:
        if self.path is None:
            token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
            if not token:
                raise TokenError("RAY_AUTH_TOKEN is not set")
            return token
        try:
            with open(self.path) as f:
                token = f.read().strip()
        except OSError as e:
            raise TokenError(f"{self.source} {self.path} cannot be read ({e.strerror}); it must hold the "
                             "cluster's token") from None
        if not token:
            raise TokenError(f"{self.source} {self.path} is empty; it must hold the cluster's token")
        return token

    def __str__(self) -> str:
        return self.source if self.path is None else f"{self.source} ({self.path})"


def locate(token_file: str | None = None) -> TokenPlace | None:
    """Where the token is, in Ray's order after `token_file`; None when nowhere. Every file on the
    way that exists must hold a token (TokenError otherwise): a broken token file is a mistake to
    report, not a reason to use another token or start without one."""
    def file(source: str, path: str) -> TokenPlace:
        place = TokenPlace(source, os.path.abspath(os.path.expanduser(path)))
        place.read()
        return place

    if token_file:
        return file("--token-file", token_file)
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return TokenPlace("RAY_AUTH_TOKEN")
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return file("RAY_AUTH_TOKEN_PATH", os.environ["RAY_AUTH_TOKEN_PATH"])
    if os.path.isfile(os.path.expanduser(HOME_FILE)):
        return file(HOME_FILE, HOME_FILE)
    return None


def client_token() -> tuple[str | None, str]:
    """(the token or None, where it was read from or looked for), for a client of a cluster."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "nowhere (RAY_AUTH_MODE=disabled here)"
    place = locate()
    if place is None:
        return None, LOOKED_IN
    return place.read(), str(place)


def auth_header(token: str | None) -> dict[str, str]:
    """The HTTP header that carries the token (none without one). Sent on every request whatever
    this process's RAY_AUTH_MODE says: Ray's client adds it only when RAY_AUTH_MODE=token is set
    here too, which is easy to forget."""
    return {"Authorization": f"Bearer {token}"} if token else {}
