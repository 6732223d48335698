"""A loopback S3 proxy (faulty_s3.py's, in front of moto) that also answers S3's own
`403 AccessDenied` for the requests a test picks, and can hold object reads until a test lets
them through: a credential refused or expiring mid-read, and a store slow enough that a job is
surely still running while a test looks at it. Stdlib only: the answers are on the wire."""
from __future__ import annotations

import threading

import pytest

from faulty_s3 import FaultyS3Proxy, _handler_for

ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                 b"<Message>Access Denied</Message><RequestId>test</RequestId><HostId>test</HostId></Error>")


class AccessProxy(FaultyS3Proxy):
    """`deny(method, path)` picks requests answered 403 (after `allow_first` of them passed);
    `hold(method, path)` picks requests that wait until `gate` is set. `denied` and `held`
    count what really happened."""

    def __init__(self, upstream: str):
        super().__init__(upstream)
        self.deny = lambda method, path: False
        self.hold = lambda method, path: False
        self.allow_first = 0
        self.denied = self.held = 0
        self.gate = threading.Event()
        proxy, base = self, _handler_for(self)

        class Handler(base):
            def _forward(self):
                if proxy.hold(self.command, self.path):
                    with proxy._lock:
                        proxy.held += 1
                    proxy.gate.wait()
                if proxy.deny(self.command, self.path):
                    with proxy._lock:
                        proxy.allow_first -= 1
                        refuse = proxy.allow_first < 0
                        proxy.denied += refuse
                    if refuse:
                        self._request_body()
                        return self._reply(403, [("Content-Type", "application/xml")], ACCESS_DENIED)
                return super()._forward()

            # the base class binds these names to its own _forward
            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server.RequestHandlerClass = Handler

    def stop(self) -> None:
        self.gate.set()  # never leave a held request (and its client) hanging
        super().stop()


def on_object(bucket: str, key: str, method: str | None = None):
    """A predicate for the requests on one object (optionally of one method)."""
    return lambda m, path: path.split("?")[0] == f"/{bucket}/{key}" and method in (None, m)


@pytest.fixture()
def access_proxy(s3_server):
    p = AccessProxy(s3_server["endpoint"]).start()
    base = s3_server["storage_options"]
    p.storage_options = {**base, "client_kwargs": {**base["client_kwargs"], "endpoint_url": p.endpoint}}
    yield p
    p.stop()
