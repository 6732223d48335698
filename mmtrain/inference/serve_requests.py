"""What an HTTP request to `serve` may say, checked before the model sees a byte of it.

A body is one JSON object naming its input by modality, `{"text": "..."}`, `{"image":
"<base64>"}` or `{"audio": "<base64>"}`, plus the endpoint's options. Everything here is
refused with a `RequestError` (its HTTP status and one line): a body over the cap (decided from
Content-Length, or while streaming, before anything is decoded), a body that is not a JSON
object, an unknown field, a missing input or one too many, base64 that does not decode, an
option of the wrong type or out of range. What is left (an image that is not one, an empty
caption) is `inputs.rows_from_items`'s to refuse, the way a hostile shard member is.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

MODALITIES = ("image", "text", "audio")
MAX_BODY_BYTES = 16 * 1024 * 1024  # a base64 image or clip of up to ~12 MB
MAX_K = 100
DEFAULT_K = 5
MAX_LABELS = 256
MAX_LABEL_CHARS = 200
MAX_BEAMS = 8
# the modality a query searches by default: a caption finds pictures, a picture or a sound its captions
DEFAULT_TARGET = {"text": "image", "image": "text", "audio": "text"}


class RequestError(ValueError):
    """A request the server refuses: `status` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(one_line(message))
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    inputs: tuple[str, ...]   # the modalities it takes
    options: tuple[str, ...]  # the other fields it takes
    one_input: bool           # exactly one modality (a query), else one or more (embed, caption)


ENDPOINTS = {
    "embed": Endpoint(MODALITIES, (), one_input=False),
    "search": Endpoint(MODALITIES, ("k", "target"), one_input=True),
    "classify": Endpoint(MODALITIES, ("labels", "template"), one_input=True),
    # the caption decoder reads the fused image and audio tokens: a caption is not an input to it
    "caption": Endpoint(("image", "audio"), ("max_len", "beams"), one_input=False),
}


@dataclass
class ParsedRequest:
    item: dict                # modality -> str (text) or bytes (decoded image / audio)
    options: dict = field(default_factory=dict)

    @property
    def modality(self) -> str:
        """The query's modality (endpoints that take exactly one)."""
        return next(m for m in MODALITIES if m in self.item)


def one_line(text: str, limit: int = 300) -> str:
    """`text` on one line, control characters escaped, at most `limit` characters: error
    messages quote what a client sent."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def quoted(value, limit: int = 40) -> str:
    """A client's value as JSON, cut to `limit` characters: for error messages. A list or an
    object shows as its type only: re-serializing a client's deeply nested value could recurse
    past the limit that parsing it just stayed under."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    text = one_line(json.dumps(value, ensure_ascii=True))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _utf8(text: str) -> bool:
    """False for a lone surrogate ("\\ud800" in JSON parses to one): the answer, which
    echoes labels, could not be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def too_large(cap: int) -> str:
    return (f"request body over the cap of {cap:,} bytes ({cap / 2**20:.1f} MiB): send a smaller "
            f"image or audio clip")


def check_declared_length(content_length: str | None, cap: int) -> None:
    """Refuse a body from its Content-Length header, before reading any of it."""
    if content_length is None:
        return  # chunked: counted while it streams (`read_capped`)
    if not (content_length.isascii() and content_length.strip().isdigit()):
        raise RequestError(400, "Content-Length is not a number")
    if int(content_length) > cap:
        raise RequestError(413, too_large(cap))


async def read_capped(chunks, cap: int) -> bytes:
    """The body from an async iterator of chunks, refused as soon as it passes `cap`."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > cap:
            raise RequestError(413, too_large(cap))
        parts.append(chunk)
    return b"".join(parts)


def parse_body(body: bytes) -> dict:
    if not body.strip():
        raise RequestError(400, 'empty body: send a JSON object such as {"text": "a red circle"}')
    try:
        value = json.loads(body)
    except RecursionError:  # nesting deep enough to exhaust the parser's stack
        raise RequestError(400, "body is not JSON we can read (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError of a body that is not UTF-8
        raise RequestError(400, f"body is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise RequestError(400, f"body must be a JSON object, got a JSON {type(value).__name__}")
    return value


def parse_request(body: bytes, endpoint: str, *, max_len: int) -> ParsedRequest:
    """The body of a POST to `endpoint` as its input item (decoded) and options (checked;
    defaults filled in). `max_len`: the model's longest caption."""
    spec = ENDPOINTS[endpoint]
    doc = parse_body(body)
    _check_fields(doc, endpoint, spec)
    item = {m: _decode_input(m, doc[m]) for m in spec.inputs if m in doc}
    return ParsedRequest(item, _OPTION_PARSERS[endpoint](doc, max_len))


def _check_fields(doc: dict, endpoint: str, spec: Endpoint) -> None:
    known = set(spec.inputs) | set(spec.options)
    unknown = [k for k in doc if k not in known]
    if unknown:
        if endpoint == "caption" and unknown == ["text"]:
            raise RequestError(400, "caption takes an image and/or audio, not text")
        names = ", ".join(quoted(k) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise RequestError(400, f"unknown field(s) {names}: /{endpoint} takes {', '.join(sorted(known))}")
    given = [m for m in spec.inputs if m in doc]
    if not given:
        raise RequestError(400, f"no input: /{endpoint} needs one of {', '.join(spec.inputs)}")
    if spec.one_input and len(given) > 1:
        raise RequestError(400, f"/{endpoint} takes one input, got {' and '.join(given)}")


def _decode_input(modality: str, value) -> str | bytes:
    if modality == "text":
        if not isinstance(value, str):
            raise RequestError(400, "text must be a string")
        return value  # empty or too long: rows_from_items refuses it, as preprocessing would
    if not isinstance(value, str):
        raise RequestError(400, f"{modality} must be a base64 string")
    # a data URL's header and line breaks (`base64` wraps at 76 columns) are not data
    text = value.partition(",")[2] if value.startswith("data:") else value
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):  # ValueError: characters outside ASCII
        raise RequestError(400, f"{modality} is not valid base64") from None


def _int_option(doc: dict, name: str, default: int, low: int, high: int) -> int:
    value = doc.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(400, f"{name} must be an integer from {low} to {high}, got {quoted(value)}")
    return value


def _search_options(doc: dict, max_len: int) -> dict:
    target = doc.get("target")
    if target is not None and target not in MODALITIES:
        raise RequestError(400, f"target must be one of {', '.join(MODALITIES)}, got {quoted(target)}")
    return {"k": _int_option(doc, "k", DEFAULT_K, 1, MAX_K), "target": target}


def _classify_options(doc: dict, max_len: int) -> dict:
    labels = doc.get("labels")
    if not isinstance(labels, list) or not 2 <= len(labels) <= MAX_LABELS:
        raise RequestError(400, f"labels must be a list of 2 to {MAX_LABELS} strings")
    if not all(isinstance(x, str) and x.strip() and len(x) <= MAX_LABEL_CHARS and _utf8(x) for x in labels):
        raise RequestError(400, f"every label must be a non-empty string of at most {MAX_LABEL_CHARS} characters "
                                f"(valid Unicode: labels come back in the answer)")
    if len(set(labels)) != len(labels):
        raise RequestError(400, "labels must be distinct")
    options = {"labels": labels}
    if "template" in doc:
        template = doc["template"]
        # exactly one "{}" and no other brace: str.format would otherwise reach attributes
        # ("{0.__class__}") or index out of range
        if not isinstance(template, str) or len(template) > MAX_LABEL_CHARS \
                or template.count("{}") != 1 or "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
            raise RequestError(400, 'template must be a string with one "{}" where the label goes, '
                                    'e.g. "a photo of {}"')
        options["template"] = template
    return options


def _caption_options(doc: dict, max_len: int) -> dict:
    return {"max_len": _int_option(doc, "max_len", max_len, 2, max_len),
            "beams": _int_option(doc, "beams", 1, 1, MAX_BEAMS)}


_OPTION_PARSERS = {"embed": lambda doc, max_len: {}, "search": _search_options,
                   "classify": _classify_options, "caption": _caption_options}
