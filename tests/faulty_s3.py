"""A real, misbehaving S3 endpoint for tests: a loopback HTTP reverse proxy in front of the moto
server that forwards every request and, on object GETs, injects the transient faults a real
S3-compatible store produces under load:

- `503 SlowDown` with S3's XML error body (what S3 answers when throttling),
- a response whose headers and part of the body arrive, then the connection closes
  (a mid-body drop, as when a load balancer restarts or a connection is reset).

Faults are deterministic: the proxy numbers object GETs (1, 2, ...) and every
`slowdown_every`-th answers 503, every `cut_every`-th is cut mid-body. That fault then repeats
for the next `burst - 1` GETs of the same object (an outage that outlasts a few retries), and
the GET after a burst always passes, so progress never depends on how concurrent readers
interleave. `counts` and `faulted` tell a test which faults were really injected, so a test
that injected none can fail.

Writes (PUT, POST: one-shot uploads and every step of a multipart upload) to objects that
match a glob can be made to fail or to hang:
- `fail_writes(glob, after=N)`: after the first N matching writes, every one answers 503
  SlowDown (a store that goes down in the middle of an upload);
- `hold_writes(glob, after=N)`: after the first N, every matching write is held: `held` is set,
  and the request is never forwarded; when the test calls `release()` (or stops the proxy)
  its connection closes without an answer. A process killed meanwhile has therefore uploaded
  exactly the first N, whatever its threads were doing.
`down = True` answers every request (listings and HEADs included) with 503 SlowDown: the whole
store is down. `heal()` ends every fault, bursts in progress included (the store is back).

Stdlib only (http.server + http.client), so the fault is on the wire, not a mock in the client.
"""
from __future__ import annotations

import fnmatch
import http.client
import socket
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

# headers that describe one hop, not the message: never forwarded as they are
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
               "upgrade", "expect", "content-length"}
# a GET on an object with only these query parameters is a GetObject (others are sub-resources
# such as ?tagging or ?uploadId=..., which we leave alone)
_GET_OBJECT_PARAMS = {"x-id", "versionId", "partNumber"}

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message>"
                 b"<RequestId>faulty-s3-proxy</RequestId><HostId>faulty-s3-proxy</HostId></Error>")


class FaultyS3Proxy:
    def __init__(self, upstream: str, *, slowdown_every: int = 0, cut_every: int = 0, burst: int = 1,
                 cut_fraction: float = 0.5):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.slowdown_every = slowdown_every
        self.cut_every = cut_every
        self.burst = burst
        self.cut_fraction = cut_fraction
        self.counts: Counter = Counter()  # requests, object_gets, slowdown, cut
        self.faulted: list[tuple[str, str]] = []  # (fault, "bucket/key") in order
        self.storage_options: dict = {}  # fsspec options that point at the proxy (the fixture sets them)
        self._lock = threading.Lock()
        self._bursts: dict[str, list] = {}  # object -> [fault, GETs of it still to fault]
        self._write_rule: tuple[str, str, int] | None = None  # (fault, glob, matching writes left to pass)
        self.down = False  # every request answers 503
        self.held = threading.Event()  # set when the first write is held
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> "FaultyS3Proxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def fail_writes(self, pattern: str, after: int = 0) -> None:
        with self._lock:
            self._write_rule = ("slowdown", pattern, after)

    def hold_writes(self, pattern: str, after: int = 0) -> None:
        with self._lock:
            self._write_rule = ("hold", pattern, after)
            self.held.clear()
            self._release.clear()

    def release(self) -> None:
        """Held writes end (their connections close, nothing forwarded); later ones pass."""
        with self._lock:
            self._write_rule = None
        self._release.set()

    def heal(self) -> None:
        """No more faults of any kind: the store is back."""
        with self._lock:
            self.slowdown_every = self.cut_every = 0
            self.down = False
            self._bursts.clear()
            self._write_rule = None
        self._release.set()

    def _decide_write(self, method: str, path: str) -> str | None:
        obj = _written_object(method, path)
        if obj is None or self._write_rule is None:
            return None
        fault, pattern, left = self._write_rule
        if not fnmatch.fnmatchcase(obj, pattern):
            return None
        if left > 0:
            self._write_rule = (fault, pattern, left - 1)
            return None
        self.counts[f"write_{fault}"] += 1
        self.faulted.append((f"write_{fault}", obj))
        return fault

    def decide(self, method: str, path: str) -> str | None:
        """'slowdown', 'cut', 'hold' or None for this request; counts it."""
        with self._lock:
            self.counts["requests"] += 1
            if self.down:
                self.counts["down"] += 1
                return "slowdown"
            write_fault = self._decide_write(method, path)
            if write_fault is not None:
                return write_fault
            obj = _object_of(method, path)
            if obj is None:
                return None
            self.counts["object_gets"] += 1
            n = self.counts["object_gets"]
            fault = None
            if obj in self._bursts:  # inside a burst on this object
                fault, left = self._bursts[obj]
                if left == 0:  # the burst is over: this GET passes, whatever n is
                    del self._bursts[obj]
                    return None
                self._bursts[obj][1] -= 1
            elif self.slowdown_every and n % self.slowdown_every == 0:
                fault = "slowdown"
            elif self.cut_every and n % self.cut_every == 0:
                fault = "cut"
            if fault is None:
                return None
            self._bursts.setdefault(obj, [fault, self.burst - 1])
            self.counts[fault] += 1
            self.faulted.append((fault, obj))
            return fault


def _object_of(method: str, path: str) -> str | None:
    """'bucket/key' if this is a GetObject (path-style addressing, as botocore uses for an IP
    endpoint), else None."""
    if method != "GET":
        return None
    parts = urllib.parse.urlsplit(path)
    bucket, _, key = parts.path.lstrip("/").partition("/")
    params = set(urllib.parse.parse_qs(parts.query, keep_blank_values=True))
    if not bucket or not key or params - _GET_OBJECT_PARAMS:
        return None
    return f"{bucket}/{key}"


def _written_object(method: str, path: str) -> str | None:
    """'bucket/key' if this request writes an object (a PUT, or a multipart upload's POST)."""
    if method not in ("PUT", "POST"):
        return None
    bucket, _, key = urllib.parse.urlsplit(path).path.lstrip("/").partition("/")
    return f"{bucket}/{urllib.parse.unquote(key)}" if bucket and key else None


def _handler_for(proxy: FaultyS3Proxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real endpoint (clients pool connections)

        def log_message(self, *args):  # quiet
            pass

        def _request_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self):
            body = self._request_body()
            fault = proxy.decide(self.command, self.path)
            if fault == "slowdown":
                return self._reply(503, [("Content-Type", "application/xml")], SLOWDOWN_BODY)
            if fault == "hold":
                proxy.held.set()
                proxy._release.wait()
                self.close_connection = True  # no answer: the client sees the connection drop
                return
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            finally:
                conn.close()
            if fault == "cut" and len(data) > 1:
                return self._cut(resp.status, out, data)
            self._reply(resp.status, out, data, length=resp.getheader("Content-Length"))

        def _head(self, status, headers, length):
            self.send_response_only(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def _reply(self, status, headers, data, length=None):
            # a HEAD answer carries the object's length, without the body
            self._head(status, headers, length if self.command == "HEAD" and length else len(data))
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()

        def _cut(self, status, headers, data):
            """The full Content-Length is promised, part of the body is sent, then the
            connection goes away: the client sees the stream end early."""
            self._head(status, headers, len(data))
            self.wfile.write(data[: max(1, int(len(data) * proxy.cut_fraction))])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


@pytest.fixture()
def faulty_s3(s3_server):
    """A started proxy in front of the session's moto server; `proxy.storage_options` point
    fsspec/s3fs at it. By default every 3rd object GET answers 503 SlowDown and every other
    one is cut mid-body (two GETs in three fail); a test may change `slowdown_every`,
    `cut_every` and `burst` before it reads."""
    proxy = FaultyS3Proxy(s3_server["endpoint"], slowdown_every=3, cut_every=2).start()
    base = s3_server["storage_options"]
    proxy.storage_options = {**base, "client_kwargs": {**base["client_kwargs"], "endpoint_url": proxy.endpoint}}
    yield proxy
    proxy.stop()
