"""The node's admin API: `GET /status` (JSON), `GET /metrics` (Prometheus), `GET /healthz`.

How this works: a deliberately small asyncio HTTP/1.1 server (one request per connection, `Connection:
close`), separate from the proxy so it stays up while the data plane is busy or draining. It binds
`node.admin` (loopback by default). Heads are limited in size and time; anything malformed gets a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Protocol

from halb import metrics
from halb.config_model import HostPort

log = logging.getLogger("halb.admin")
MAX_HEAD = 16384
HEAD_TIMEOUT = 5.0
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class StatusSource(Protocol):
    state: str

    def status(self) -> dict[str, Any]: ...


class AdminServer:
    def __init__(self, bind: HostPort, node: StatusSource) -> None:
        self.bind = bind
        self.node = node
        self._server: asyncio.Server | None = None
        self.bad_requests_total = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.bind.host, self.bind.port, reuse_address=True, limit=MAX_HEAD
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                self.bad_requests_total += 1
                return
            status, content_type, body = self.route(head)
            writer.write(
                f"HTTP/1.1 {status} {REASONS.get(status, 'OK')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        except Exception:  # never let one bad request take the admin API down
            log.exception("admin request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def route(self, head: bytes) -> tuple[int, str, bytes]:
        try:
            method, target, _version = head.split(b"\r\n", 1)[0].decode("ascii").split(" ")
        except (ValueError, UnicodeDecodeError):
            self.bad_requests_total += 1
            return 400, "text/plain", b"bad request line\n"
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET is supported here\n"
        if path == "/healthz":
            if self.node.state == "serving":
                return 200, "text/plain", b"ok\n"
            return 503, "text/plain", f"{self.node.state}\n".encode()
        if path == "/status":
            return 200, "application/json", json.dumps(self.node.status(), indent=1).encode() + b"\n"
        if path == "/metrics":
            return 200, metrics.CONTENT_TYPE, metrics.render(self.node.status)
        return 404, "text/plain", b"not found; try /status, /metrics or /healthz\n"
