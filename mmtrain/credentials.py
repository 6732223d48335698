"""What counts as a secret, in one place: storage options (fsspec/s3fs/gcsfs/adlfs keys at any
depth), command-line arguments, environment assignments and URLs. Every part of the project that
stores, shows or ships options, arguments or variables asks here: the saved run config and
checkpoints (`without_secrets`), the training workers' config (credentials travel as an object
reference, see mmtrain/worker_plan.py), `ray_job.py`'s process title (which Ray records as a driver's
entrypoint) and `submit`'s refusal (clusters/job_package.py: its command line, `--env` and `--name`).

Two questions decide: is the name one that holds credentials (`is_secret_name`), does the value
look like one (`looks_like_secret`). A flag or variable named like a credential is one whatever
its value; a storage option is one unless its value names an access mechanism (token="anon").

Deliberately without Ray, torch or fsspec imports: the job client imports it too.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter

# option names that hold credentials: s3fs (key/secret/token, username/password aliases),
# botocore (aws_access_key_id, aws_secret_access_key, aws_session_token), gcsfs (token,
# credentials), adlfs (account_key, sas_token, connection_string, client_secret), HTTP
# (headers' Authorization, auth), anything named like a password, signature or private key, and
# Ray's own auth variables (RAY_AUTH_MODE too: a job must not change how its cluster checks tokens)
_SECRET_NAME = re.compile(
    r"secret|passw|pwd|token|credential|private|signature|api[_-]?key|access[_-]?key|account[_-]?key"
    r"|connection[_-]?string|authori[sz]ation|cookie|session|^auth$|^key$|[_-]key$|^username$|^ray_auth", re.I)
# values of such names that name a mechanism, not a credential (gcsfs's token="anon", ...): only
# storage options have them, and dropping one would change how the store is reached
_NOT_SECRET_VALUES = {"anon", "google_default", "cloud", "browser", "cache", "none", "false", ""}

_VALUE_PATTERNS = [
    re.compile(r"(?<![A-Z0-9])(AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])"),  # AWS key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY"),                                              # PEM keys
    re.compile(r"eyJ[\w-]{8,}\.eyJ[\w-]{8,}\."),                                               # JWTs
    re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{30,}|xox[abprs]-[\w-]{10,}|ya29\.[\w-]{20,}"
               r"|AIza[\w-]{35}|sk-[A-Za-z0-9_-]{20,})"),                                       # vendor tokens
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),                                                     # user:password@ in a URL
    re.compile(r"[?&](x-amz-signature|x-amz-security-token|x-amz-credential|x-goog-signature|x-goog-credential"
               r"|sig|signature|token|access_token|password)=", re.I),                         # signed URLs
]
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9+/]{30,}={0,2}$")
_WORD = re.compile(r"[a-z]{7}")

REDACTED = "<redacted>"


def is_secret_name(name) -> bool:
    """An option, flag or variable name that holds a credential (`secret`, `aws_session_token`,
    `--aws-secret-access-key`, `AWS_SECRET_ACCESS_KEY`, ...)."""
    return bool(_SECRET_NAME.search(str(name).lstrip("-")))


def looks_like_secret(value) -> bool:
    """A string that is a credential whatever it is called: an AWS access key id, a PEM private
    key, a JWT or vendor token, a URL with a password or a signature, or a long random token
    (an AWS secret access key: 40 base64 characters). Paths, URLs and hex digests are not."""
    if not isinstance(value, str) or len(value) < 16:
        return False
    if any(p.search(value) for p in _VALUE_PATTERNS):
        return True
    return _random_token(value)


def _random_token(value: str) -> bool:
    # base64 (AWS secret access keys, Azure account keys) with every character class, no word of
    # 7+ lowercase letters (under 60 characters: longer random base64 often has one), and the entropy of random bytes: random base64 of 30-40 characters
    # has 4.5-4.8 bits a character (95% above 4.2), CamelCase names about 4.1-4.3, hex digests at
    # most 4.0. Names with separators (_ - .) and paths are never taken for one: vendor tokens
    # that have separators are matched by their prefixes above.
    if not _TOKEN_CHARS.match(value) or value[0] == "/" or (len(value) < 60 and _WORD.search(value)):
        return False
    if not (re.search(r"[A-Z]", value) and re.search(r"[a-z]", value) and re.search(r"[0-9]", value)):
        return False
    counts = Counter(value)
    entropy = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
    return entropy >= 4.2


def _secret_entry(name, value) -> bool:
    if isinstance(value, (dict, list, tuple)):
        return False  # decided entry by entry inside
    if is_secret_name(name):
        return value is not None and value is not False and str(value).strip().lower() not in _NOT_SECRET_VALUES
    return looks_like_secret(value)


def secret_paths(options, prefix: str = "") -> list[str]:
    """Dotted paths of the entries of (nested) options that are credentials, e.g.
    ["key", "secret", "client_kwargs.aws_session_token"]: never their values."""
    found: list[str] = []
    if isinstance(options, dict):
        for k, v in options.items():
            path = f"{prefix}{k}"
            if isinstance(v, (dict, list, tuple)):
                found += secret_paths(v, path + ".")
            elif _secret_entry(k, v):
                found.append(path)
    elif isinstance(options, (list, tuple)):
        for i, v in enumerate(options):
            found += secret_paths(v, f"{prefix}{i}.") if isinstance(v, (dict, list, tuple)) else (
                [f"{prefix}{i}"] if looks_like_secret(v) else [])
    return found


def without_secrets(options):
    """`options` minus every entry `secret_paths` names, at any depth (a copy)."""
    if isinstance(options, dict):
        return {k: without_secrets(v) for k, v in options.items() if not _secret_entry(k, v)}
    if isinstance(options, (list, tuple)):
        return [without_secrets(v) for v in options if not looks_like_secret(v)]
    return options


def redacted(options):
    """`options` with every credential's value replaced by REDACTED (for messages and titles)."""
    if isinstance(options, dict):
        return {k: REDACTED if _secret_entry(k, v) else redacted(v) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [REDACTED if looks_like_secret(v) else redacted(v) for v in options]
    return options


def secret_variables(assignments: list[str]) -> list[str]:
    """The NAME=VALUE environment assignments that carry credentials, described without their
    values: a name like a credential's counts whatever its value (a variable has no mechanism
    values like a storage option's token="anon"), and so does a value that looks like one."""
    found = []
    for item in assignments:
        name, _, value = item.partition("=")
        if is_secret_name(name):
            found.append(f"{name} (named like a credential)")
        elif looks_like_secret(value):
            found.append(f"{name} (its value looks like a credential)")
    return found


def _secret_setting(item: str) -> bool:
    """Whether a `--set PATH=VALUE` item carries a credential: a path through the storage
    options or through a name like a credential's, or a value that looks like one (JSON values
    searched at any depth)."""
    path, _, value = item.partition("=")
    parts = path.split(".")
    if parts[0] == "storage_options" or any(is_secret_name(p) for p in parts):
        return True
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return looks_like_secret(value)
    return bool(secret_paths(parsed)) if isinstance(parsed, (dict, list)) else looks_like_secret(value)


def secret_arguments(argv: list[str]) -> list[str]:
    """The arguments of a command line that carry credentials, described without their values:
    `--storage-options key, secret`, `--aws-secret-access-key`, `argument 5 (looks like a
    credential)`. A flag named like a secret counts whatever its value; JSON option values
    (`--storage-options`) are searched at any depth."""
    found: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg.startswith("--") and is_secret_name(flag):
            found.append(flag)
            i += 1 if eq or i + 1 >= len(argv) or argv[i + 1].startswith("--") else 2
            continue
        if flag == "--storage-options":
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                paths = secret_paths(json.loads(value))
            except (json.JSONDecodeError, TypeError):
                paths = ["(not JSON)"] if looks_like_secret(value) else []
            if paths:
                found.append(f"--storage-options {', '.join(paths)}")
            i += 1 if eq else 2
            continue
        if flag == "--set":
            item = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if _secret_setting(item):
                found.append(f"--set {item.partition('=')[0]}")
            i += 1 if eq else 2
            continue
        value = inline if eq else arg
        if looks_like_secret(value):
            found.append(f"{flag} (its value looks like a credential)" if eq
                         else f"argument {i + 1} (looks like a credential)")
        i += 1
    return found


def redacted_argv(argv: list[str]) -> list[str]:
    """The command line with credentials replaced by REDACTED: what may be shown or recorded."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        takes_value = not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if arg.startswith("--") and is_secret_name(flag):
            out += [f"{flag}={REDACTED}"] if eq else ([flag, REDACTED] if takes_value else [flag])
            i += 1 if eq or not takes_value else 2
            continue
        if flag == "--storage-options" and (eq or i + 1 < len(argv)):
            value = inline if eq else argv[i + 1]
            try:
                shown = json.dumps(redacted(json.loads(value)))
            except (json.JSONDecodeError, TypeError):
                shown = REDACTED if looks_like_secret(value) else value
            out += [f"{flag}={shown}"] if eq else [flag, shown]
            i += 1 if eq else 2
            continue
        if flag == "--set" and (eq or i + 1 < len(argv)):
            item = inline if eq else argv[i + 1]
            shown = f"{item.partition('=')[0]}={REDACTED}" if _secret_setting(item) else item
            out += [f"{flag}={shown}"] if eq else [flag, shown]
            i += 1 if eq else 2
            continue
        value = inline if eq else arg
        out.append((f"{flag}={REDACTED}" if eq else REDACTED) if looks_like_secret(value) else arg)
        i += 1
    return out
