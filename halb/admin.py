"""The node's admin API: `GET /status` (JSON), `GET /metrics` (Prometheus), `GET /healthz`, and `/api/...`.

How this works: a deliberately small asyncio HTTP/1.1 server (one request per connection, `Connection:
close`), separate from the proxy so it stays up while the data plane is busy or draining. It binds
`node.admin` (loopback by default). Heads are limited in size and time; anything malformed gets a 400.

`/api/...` is the cluster's configuration API (JSON in, JSON out), handed to an `ApiHandler` (the node's
cluster layer; none without `[cluster]`). `GET /api/config` is open like `/status`. Every other method
(POST/PUT/DELETE) mutates and needs `Authorization: Bearer <cluster.token>`: without the header the
answer is 401, with a wrong token 403 (compared in constant time), each with a JSON body saying so.
Bodies need a Content-Length (at most 64 KiB) and must arrive within the head timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable
from typing import Any, Protocol

from halb import metrics
from halb.config_model import HostPort

log = logging.getLogger("halb.admin")
MAX_HEAD = 16384
MAX_BODY = 65536
HEAD_TIMEOUT = 5.0
REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
MUTATING = ("POST", "PUT", "DELETE", "PATCH")


class StatusSource(Protocol):
    state: str

    def status(self) -> dict[str, Any]: ...


class ApiHandler(Protocol):
    """The cluster's configuration API; `body` is the decoded JSON object (None for no body)."""

    def handle(self, method: str, path: str, body: Any) -> Awaitable[tuple[int, dict[str, Any]]]: ...


class AdminServer:
    def __init__(
        self,
        bind: HostPort,
        node: StatusSource,
        api: ApiHandler | None = None,
        token: str | None = None,
    ) -> None:
        self.bind = bind
        self.node = node
        self.api = api
        self.token = token
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
            extra = ""
            if self._is_api(head):
                status, doc = await self._api(head, reader)
                content_type, body = "application/json", json.dumps(doc, indent=1).encode() + b"\n"
                if status == 401:
                    extra = 'WWW-Authenticate: Bearer realm="halb"\r\n'
            else:
                status, content_type, body = self.route(head)
            writer.write(
                f"HTTP/1.1 {status} {REASONS.get(status, 'OK')}\r\nContent-Type: {content_type}\r\n"
                f"{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
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

    @staticmethod
    def _is_api(head: bytes) -> bool:
        line = head.split(b"\r\n", 1)[0].split(b" ")
        return len(line) == 3 and (line[1].startswith(b"/api/") or line[1] == b"/api")

    async def _api(self, head: bytes, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        """An `/api/...` request: authorise, read the JSON body, hand it to the cluster layer."""
        try:
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _version = request_line.split(" ")
        except ValueError:
            self.bad_requests_total += 1
            return 400, {"error": "bad request line"}
        path = target.split("?", 1)[0]
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method in MUTATING and self.api is None:
            return 409, {
                "error": "this node has no [cluster] table: configuration changes at run time need "
                "the cluster (Raft)"
            }
        if method in MUTATING:
            denied = self._authorise(headers.get("authorization"))
            if denied is not None:
                return denied
        elif method not in ("GET", "HEAD"):
            return 405, {"error": f"method {method} is not supported"}
        body: Any = None
        length_text = headers.get("content-length")
        if method in ("POST", "PUT", "PATCH") and length_text is None:
            return 411, {"error": "a Content-Length header is required"}
        if length_text is not None:
            if not length_text.isdigit():
                return 400, {"error": "bad Content-Length"}
            length = int(length_text)
            if length > MAX_BODY:
                return 413, {"error": f"the body is larger than {MAX_BODY} bytes"}
            try:
                raw = await asyncio.wait_for(reader.readexactly(length), HEAD_TIMEOUT)
            except (asyncio.IncompleteReadError, TimeoutError):
                self.bad_requests_total += 1
                return 400, {"error": "the body did not arrive in full"}
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    return 400, {"error": f"the body is not JSON: {exc}"}
        if self.api is None:
            return 404, {"error": "no [cluster] table on this node; try /status"}
        try:
            return await self.api.handle(method, path, body)
        except Exception:
            log.exception("admin API %s %s failed", method, path)
            return 500, {"error": "internal error (see the node's log)"}

    def _authorise(self, header: str | None) -> tuple[int, dict[str, Any]] | None:
        """None when the bearer token matches; else (401 or 403, JSON body)."""
        scheme, _, presented = (header or "").partition(" ")
        if not header or scheme.lower() != "bearer" or not presented.strip():
            return 401, {
                "error": "authentication required: send 'Authorization: Bearer <token>' "
                "(halb CLI: --token or HALB_TOKEN; the token is cluster.token)"
            }
        if self.token is None or not hmac.compare_digest(presented.strip().encode(), self.token.encode()):
            return 403, {"error": "invalid token (it must equal cluster.token on this node)"}
        return None

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
