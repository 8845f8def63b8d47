"""The HTTP/1.1 reverse proxy: one `HttpConnection` (protocol + coroutine) per client connection.

How this works: `HttpListener` holds what one listener shares (config, pool, backend connection pool, stats,
the set of live connections). Each accepted connection is an `HttpConnection`, a `Channel` whose task loops:
read a request head (idle wait bounded by `client_timeout`, or `header_timeout` for the first request; once a
byte arrived the whole head must come within `header_timeout`, else 408), parse it strictly (`http_codec`),
find its pool (the listener's, or a route's: halb.proxy.routes; a `redirect_to_https` listener answers 301/308
here instead), pick a backend with `pool.choose()`, take a pooled keep-alive connection to it or connect
(connect failures are reported to the pool and retried on other backends, at most `retries` more), send the
rewritten head (hop-by-hop headers stripped; X-Forwarded-For appended, X-Forwarded-Proto set, X-Request-ID
kept or generated), then stream the request body from a helper task while the main task waits for the response
head (`timeout` seconds, counted from when the request was fully sent; else 504), forwards 1xx interim
responses, rewrites the final head and streams the response body. Bodies are never buffered whole: each side's
`Channel` stops reading past its high-water mark and the writer waits for the other side's transport to drain,
so a slow reader holds back the fast writer and memory stays bounded per connection. Requests are served
strictly in order; pipelined requests wait in the client buffer (which is bounded too).

Inline requests: while the task is parked waiting for the next request, a simple one (a complete head, no
body, a pooled backend connection, a whole Content-Length response) is served from the protocol callbacks
without waking the task (`_serve_inline`); whatever else happens is handed to the task at the stage the
callbacks reached, so the task remains the one place where errors, timeouts, bodies and retries are
handled. Requests to a pool with a sessions hook or a maxconn queue (both may wait) are never served inline.

Retries: a request is resent only (a) to another backend when the connect failed, nothing was sent yet;
(b) on a fresh connection to the same backend when a *reused* pooled connection turned out dead (write
failed or closed with no response byte) and the request is idempotent without a body (GET, HEAD, OPTIONS,
TRACE, PUT, DELETE without body). Nothing is retried after a fresh connection took request bytes.

Errors: no backend -> 503; every connect failed -> 503 (as HAProxy); backend closed or sent garbage
before a response head -> 502; no head in time -> 504; backend fails after the head went out -> the client
connection is aborted (the client sees a truncated response, never a wrong one). Bad requests are answered
(400, 408, 414, 431, 501, 505), counted by reason and the connection closed. The response to a request
whose body was not read completely says `Connection: close`.

Upgrades: a WebSocket handshake (`GET`, HTTP/1.1, `Connection: Upgrade`, `Upgrade: websocket`, no body) is
forwarded with `Upgrade: websocket` and `Connection: Upgrade`; when the backend answers `101 Switching
Protocols` with `Upgrade: websocket`, the 101 goes to the client and the two connections become a byte
tunnel (halb.proxy.tunnel) until both sides are done or it idles for the listener's `tunnel_timeout`.
Any other upgrade (h2c, which would carry HTTP/2 past the proxy's checks, or anything else) is stripped
and the backend answers a plain request; a 101 to a request that did not ask for WebSocket is a 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from halb.backend import Backend
from halb.balancing.base import Context
from halb.config_model import ListenerConfig, RouteConfig
from halb.errors import ProtocolError
from halb.pool import Pool
from halb.proxy.access_log import AccessLog
from halb.proxy.channel import Channel
from halb.proxy.flush import close_after_flush, write_eof_after_flush
from halb.proxy.http_codec import (
    IDEMPOTENT_METHODS,
    MAX_RESPONSE_HEAD,
    MAX_RESPONSE_LINE,
    BodyFramer,
    RequestHead,
    ResponseHead,
    find_head_end,
    header_tokens,
    parse_request_head,
    parse_response_head,
    request_framer,
    response_framer,
    simple_body_length,
)
from halb.proxy.limits import (
    BackendQueue,
    ListenerGate,
    NodeGate,
    QueueFull,
    QueueTimeout,
    free_slot,
    retry_after_connect_failure,
)
from halb.proxy.routes import PoolRoute, Router
from halb.proxy.stats import HttpListenerStats
from halb.proxy.tls import TlsTerminator
from halb.proxy.tunnel import TunnelBytes, relay_tunnel
from halb.proxy.upstream_pool import UpstreamPool

if TYPE_CHECKING:
    from halb.proxy.sessions_hook import ListenerHook, RequestSticky

log = logging.getLogger("halb.proxy.http")
T = TypeVar("T")

REASONS = {
    301: b"Moved Permanently",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}

# Request headers never forwarded as they came (hop-by-hop, or rewritten by the proxy).
_REQ_SPECIAL = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"upgrade",
        b"transfer-encoding",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-request-id",
    }
)
# Response headers dropped (hop-by-hop, or rewritten). Transfer-Encoding passes: bodies pass unchanged.
_RESP_DROP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade", b"content-length", b"x-request-id"}
)
# Connection-header tokens that may not remove end-to-end headers.
_PROTECTED = frozenset({b"host"})
# Connection-header tokens that name no other header to drop (the common case: the fast head copy).
# ("upgrade" names the Upgrade header, which the proxy drops or rewrites itself.)
_PLAIN_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})
_UPGRADE_WEBSOCKET = b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"

BODY_FLUSH_BYTES = 1 << 20  # report backend bytes at least every MiB of a long response
# After answering a request whose bytes were not all read (errors), keep reading and discarding for this
# long after shutting our side, so the client reads the answer instead of a reset.
LINGER_SECONDS = 2.0
REJECT_LINGER_SECONDS = 0.5  # the same for connections refused by a connection limit (they cost fds)
COALESCE_BYTES = 65536  # response body bytes copied behind the head to send both in one write


@dataclass(slots=True)
class _Inline:
    """A request the protocol callbacks started (`HttpConnection._serve_inline`), and how far they got:
    parsed (`framer` None), backend chosen (`framer` set, `up` None; `backend` None = no backend), or sent
    on the pooled connection `up` (its response being read: `resp` once its head is complete)."""

    req: RequestHead
    route: PoolRoute
    rid: bytes = b""
    out_head: bytes = b""
    framer: BodyFramer | None = None
    ctx: Context | None = None
    backend: Backend | None = None
    up: Channel | None = None
    received_before: int = 0  # up.received when the head went out
    resp: ResponseHead | None = None
    head_end: int = 0
    length: int = 0  # the response body's length


def _websocket_upgrade(req: RequestHead) -> bool:
    """A WebSocket handshake (RFC 6455 section 4.1): the only protocol switch the proxy tunnels."""
    return (
        req.upgrade is not None
        and req.method == b"GET"
        and req.minor == 1
        and b"upgrade" in req.connection_tokens
        and not req.has_body
        and b"websocket" in header_tokens(req.upgrade)
    )


def _switches_to_websocket(resp: ResponseHead) -> bool:
    """A 101 that switches to WebSocket (`Connection: Upgrade`, `Upgrade: websocket`)."""
    upgrades = [value for lname, value in resp.special if lname == b"upgrade"]
    return b"upgrade" in resp.connection_tokens and len(upgrades) == 1 and upgrades[0].lower() == b"websocket"


class SetHeaders:
    """A listener's `response_headers`: set on every response from a backend, replacing the backend's
    own fields of those names (HAProxy's `http-response set-header`)."""

    __slots__ = ("drop", "lines", "names")

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.lines = b"".join(
            b"%s: %s\r\n" % (name.encode(), value.encode("latin-1")) for name, value in pairs
        )
        self.names = frozenset(name.lower().encode() for name, _ in pairs)
        alternatives = b"|".join(re.escape(name.encode()) for name, _ in pairs)
        self.drop = re.compile(rb"\r\n(?:" + alternatives + rb"):[^\r]*+", re.IGNORECASE)


class _DeadReused(Exception):
    """A reused keep-alive connection was found closed before any response byte: resend on a fresh one."""


class _ClientGone(Exception):
    """The client closed inside its request body."""


class HttpListener:
    """State shared by the connections of one HTTP listener."""

    def __init__(
        self,
        config: ListenerConfig,
        pool: Pool,
        upstream: UpstreamPool,
        *,
        scheme: str = "http",
        loop: asyncio.AbstractEventLoop | None = None,
        gate: ListenerGate | None = None,
        queue: BackendQueue | None = None,
        tls: TlsTerminator | None = None,
        sessions: ListenerHook | None = None,
        access_log: AccessLog | None = None,
        routes: Sequence[tuple[RouteConfig, PoolRoute]] = (),
    ) -> None:
        self.config = config
        self.access_log = access_log  # one line per request (halb.proxy.access_log)
        self.upstream = upstream
        self.tls = tls
        self.scheme = b"https" if tls is not None else scheme.encode()
        self.loop = loop or asyncio.get_running_loop()
        self.stats = HttpListenerStats()
        self.gate = gate or ListenerGate.for_listener(NodeGate(0), config)
        self.connections: set[HttpConnection] = set()
        self.lingering: set[asyncio.Transport] = set()
        self.draining = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        # Fields set on every response from a backend (`response_headers`, e.g. HSTS), or None.
        self.set_headers = SetHeaders(config.response_headers) if config.response_headers else None
        # The pool of each request: the listener's own (`router.default`), or a route's (halb.proxy.routes).
        self.router = Router(PoolRoute(pool, queue, sessions), routes)
        self.inline_ok = self._inline_ok()
        # Bytes that end with the only CRLF CRLF in them and are no longer than this are one whole head
        # within the listener's limits (HttpConnection.data_received serves them without buffering).
        self.whole_head_limit = min(config.max_request_line, config.max_header_bytes)

    def _inline_ok(self) -> bool:
        """Requests may be served inline, in the protocol callbacks (see HttpConnection._serve_inline),
        unless a per-request hook of their pool may have to wait (the sessions hook, the maxconn queue)."""
        return not self.config.redirect_to_https and any(r.inline_ok for r in self.router.all)

    def set_queue(self, pool: Pool, queue: BackendQueue) -> None:
        """`pool` got a maxconn queue at run time (ProxyServer.pools_changed): every route to it uses it."""
        for route in self.router.all:
            if route.pool is pool:
                route.set_queue(queue)
        self.inline_ok = self._inline_ok()

    def protocol_factory(self) -> asyncio.Protocol:
        return HttpConnection(self)

    def count_rejected(self, reason: str) -> None:
        rejected = self.stats.rejected
        rejected[reason] = rejected.get(reason, 0) + 1

    # --- lifecycle -----------------------------------------------------------------------------------
    def connection_done(self, conn: HttpConnection) -> None:
        if conn.admitted:
            conn.admitted = False
            self.gate.release(conn.client_ip)
        if conn in self.connections:
            self.connections.discard(conn)
            self.stats.client_connections_active -= 1
        if not self.connections:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    def begin_drain(self) -> None:
        """Finish in-flight requests with `Connection: close`; close idle keep-alive connections now."""
        self.draining = True
        for conn in list(self.connections):
            if conn.idle and not conn.buf:
                conn.close()

    async def wait_idle(self) -> None:
        if not self.connections:
            return
        waiter = self.loop.create_future()
        self._idle_waiters.append(waiter)
        await waiter

    def tasks(self) -> list[asyncio.Task[None]]:
        """The tasks of live connections (for a clean shutdown)."""
        return [c.task for c in self.connections if c.task is not None and not c.task.done()]

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()
        for transport in list(self.lingering):
            transport.abort()
        self.lingering.clear()

    @property
    def buffered_bytes(self) -> int:
        return sum(conn.buffered + conn.upstream_buffered for conn in self.connections)


class HttpConnection(Channel):
    """One client connection: protocol callbacks feed the buffer, `_run()` serves requests in order."""

    def __init__(self, listener: HttpListener) -> None:
        super().__init__(listener.loop)
        self.listener = listener
        self.client_ip = ""
        self.client_port = 0
        self._forwarded_tail = b""
        self.proxied = False  # the client address came from a PROXY header (listener accept_proxy)
        self.admitted = False  # holds a slot of the listener's connection limits (released when done)
        self.connected = False  # connection_made ran (on a TLS listener: the handshake completed)
        self.in_queue = False  # waiting for a backend slot (maxconn)
        self.task: asyncio.Task[None] | None = None
        self.idle = True  # waiting for the next request's first byte
        self.finished = False
        self.upstream_channel: Channel | None = None
        self.route: PoolRoute = listener.router.default  # the pool of the current request (halb.proxy.routes)
        self._method = b"GET"
        self._linger = False  # close with a lingering close (the client may still be sending)
        self._discarding = False
        self._pump_sent = 0
        self._pump_done_at: float | None = None
        self._t0 = 0.0  # when the current request's head was parsed
        # For the access log line of the current request: its head, the backend that got it, the status
        # and bytes sent to the client, and when the response head came (-1: not yet / never).
        self._logreq: RequestHead | None = None
        self._logrid = b""
        self._logbackend: Backend | None = None
        self._log_status = -1
        self._log_bytes = 0
        self._log_tr = -1.0
        self.sticky: RequestSticky | None = None  # [state] hook: this request's sticky session, if any
        self._parked = False  # no task reads the buffer (none yet, or it waits): callbacks serve
        self._inline: _Inline | None = None  # the request the callbacks are serving
        self._inline_error: ProtocolError | None = None  # a bad head the callbacks found, for the task
        self._inline_closing = False  # the callbacks answered a request that ends the connection
        self._idle_deadline: float | None = None  # the idle deadline after the last inline response

    # --- protocol ------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected = True
        super().connection_made(transport)
        if not self.proxied:  # (else the acceptor set the address the PROXY header named)
            peer = transport.get_extra_info("peername")
            self.client_ip = str(peer[0]) if peer else ""
            self.client_port = int(peer[1]) if peer else 0
        client_ip = self.client_ip.encode()
        # What every request head sent upstream carries after "X-Forwarded-For: [earlier proxies, ]".
        self._forwarded_tail = b"%s\r\nX-Forwarded-Proto: %s\r\nX-Request-ID: " % (
            client_ip,
            self.listener.scheme,
        )
        listener = self.listener
        if not self.admitted:
            reason = listener.gate.admit(self.client_ip)
            if reason:
                listener.count_rejected(reason)
                self._reject(transport, reason)
                return
            self.admitted = True
        listener.connections.add(self)
        listener.stats.client_connections_active += 1
        listener.stats.client_connections_total += 1
        if listener.inline_ok:
            # No task until one is needed: the callbacks serve simple requests alone (_serve_inline); the
            # channel's timer closes the connection if no request comes within header_timeout.
            self._parked = True
            self.on_read_timeout = self._timeout_without_task
            self.move_read_deadline(self.loop.time() + listener.config.header_timeout)
        else:
            self.task = self.loop.create_task(self._run())

    def _reject(self, transport: asyncio.BaseTransport, reason: str) -> None:
        """Over a connection limit: answer 503 at once, then close without reading the request. A source
        address the listener does not allow gets no answer at all."""
        self.finished = True
        self._discarding = True
        if reason == "denied":
            transport.close()
            return
        self._linger = True
        self._send_error(503, f"too many connections ({reason})")
        self._close_client(linger_seconds=REJECT_LINGER_SECONDS)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._parked:  # the callbacks serve (the task is not reading): buffer without waking it
            if (
                self._inline is None
                and not self.buf
                and len(data) <= self.listener.whole_head_limit
                and data.find(b"\r\n\r\n") == len(data) - 4 >= 0
                and data[0] not in (10, 13)
                and self._inline_error is None
                and not self._inline_closing
                and not self.listener.draining
            ):
                # The common case: these bytes are exactly one request head (within the line and head
                # limits), nothing before or after it: no buffering, no search for the head's end.
                self.received += len(data)
                self._serve_head(data)
                return
            self.append(data)
            if self._inline is None:
                self._serve_inline()
            return
        super().data_received(data)

    def eof_received(self) -> bool:
        if self._discarding:
            return False  # lingering close done: let the transport close
        if self.in_queue and self.task is not None:
            self.task.cancel()  # (HAProxy's abortonclose) the client left while its request was queued
        keep_open = super().eof_received()
        if self.task is None:
            self._wake_task()  # the task handles a half-closed client
        return keep_open

    def on_lost(self) -> None:
        # The client is gone: stop whatever the connection's task waits for (a backend, a timer).
        task = self.task
        if task is None:
            if not self.finished:  # the callbacks were serving alone: clean up what the task would
                self.finished = True
                if not self.idle:
                    self.listener.stats.client_aborts_total += 1
                if self._inline is not None:
                    self._abandon_inline()
                    if self.listener.access_log is not None:
                        self._log_request()
                self.listener.connection_done(self)
            return
        if not self.finished and not task.done():
            task.cancel()

    @property
    def upstream_buffered(self) -> int:
        up = self.upstream_channel
        return up.buffered if up is not None else 0

    # --- the connection's task -----------------------------------------------------------------------
    async def _run(self) -> None:
        listener = self.listener
        self._parked = False  # (started late: the callbacks served alone until now) this task reads now
        try:
            first = True
            while not self.closed:
                head = await self._read_head(first)
                if head is None:
                    break
                first = False
                inline, self._inline = self._inline, None
                keep = await (self._exchange(head) if inline is None else self._resume(inline))
                if listener.access_log is not None:
                    self._log_request()
                if not keep or listener.draining:
                    break
        except ProtocolError as exc:
            listener.stats.count_bad_request(exc.reason)
            self._send_error(exc.status, str(exc))
        except asyncio.CancelledError:
            if (self.closed or self.eof) and not self.idle:
                listener.stats.client_aborts_total += 1  # the client left in the middle of a request
        except (OSError, TimeoutError, _ClientGone) as exc:
            listener.stats.client_aborts_total += 1
            log.debug("client %s: %r", self.client_ip, exc)
        except Exception:
            log.exception("unexpected error serving HTTP client %s", self.client_ip)
        finally:
            self.finished = True
            if self._inline is not None:
                self._abandon_inline()
            if listener.access_log is not None and (self._logreq is not None or self._log_status >= 0):
                self._log_request()  # a bad request (its error status), or one the client abandoned (-1)
            self._close_client()
            listener.connection_done(self)

    def _close_client(self, linger_seconds: float = LINGER_SECONDS) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.closed:
            return
        listener = self.listener
        if self._linger and not self.eof and transport.can_write_eof():
            # Lingering close: send our FIN after the answer, discard what the client still sends until
            # its FIN (the transport then closes) or LINGER_SECONDS pass.
            self._discarding = True
            self.buf = bytearray()
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            write_eof_after_flush(transport, self.loop)
            listener.lingering.add(transport)
            self.loop.call_later(linger_seconds, self._end_linger, transport)
            return
        if not transport.get_write_buffer_size():
            transport.close()
            return
        # Flush the rest of the response first (see halb.proxy.flush); a client that never reads it must
        # not pin the socket forever: aborted after client_timeout.
        lingering = listener.lingering
        lingering.add(transport)
        close_after_flush(
            transport, self.loop, listener.config.client_timeout, lambda: lingering.discard(transport)
        )

    def _end_linger(self, transport: asyncio.Transport) -> None:
        self.listener.lingering.discard(transport)
        if not self.closed:
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.listener.lingering.discard(self.transport)
        super().connection_lost(exc)

    async def _read_head(self, first: bool) -> RequestHead | None:
        listener = self.listener
        config = listener.config
        loop = self.loop
        # Idle: wait for the first byte of the next request (empty lines before it are skipped).
        self.idle = True
        self._method = b""
        deadline: float | None = None
        while True:
            # What the callbacks left while this task was parked (see _serve_inline):
            if self._inline is not None:  # a request they started and hand over
                self.idle = False
                self._method = self._inline.req.method
                return self._inline.req
            if self._inline_error is not None:
                error, self._inline_error = self._inline_error, None
                raise error  # a bad head they read
            if self._inline_closing:
                return None  # they answered a request that ends the connection
            buf = self.buf
            skip = 0
            while buf.startswith(b"\r\n", skip):
                skip += 2
            if skip:
                del buf[:skip]
            if buf:
                break
            if self.eof or self.closed or listener.draining:
                return None
            if deadline is None:
                deadline = loop.time() + (config.header_timeout if first else config.client_timeout)
            self._parked = listener.inline_ok
            try:
                await self.wait_more(deadline)
            except TimeoutError:
                if self._inline is None:
                    return None  # idle too long (else: a late response to an inline request: taken over)
            finally:
                self._parked = False
                if self._idle_deadline is not None:  # the callbacks served requests: idle since then
                    deadline, self._idle_deadline = self._idle_deadline, None
        self.idle = False
        # The head: complete within header_timeout of its first byte.
        deadline = None
        while True:
            end = find_head_end(self.buf, config.max_request_line, config.max_header_bytes)
            if end > 0:
                break
            if self.closed:
                return None
            if self.eof:
                raise ProtocolError("incomplete request head", 400, "incomplete")
            if deadline is None:
                deadline = loop.time() + config.header_timeout
            try:
                await self.wait_more(deadline)
            except TimeoutError:
                raise ProtocolError("request head not received in time", 408, "timeout") from None
        data = self.take(end)
        listener.stats.bytes_in += end
        return parse_request_head(data, config.max_request_line, config.max_header_bytes)

    # --- inline requests: served from the protocol callbacks while the task is parked ---------------------
    def _serve_inline(self) -> None:
        """Serve the request at the head of the buffer without waking the task, if it is a simple one.

        Called from `data_received` while the task waits for the next request (`_parked`). A complete
        head without a body, whose backend has a pooled keep-alive connection, is sent upstream here and
        its response is answered from that connection's callback (`_inline_response`) when it arrives
        whole: a head and a Content-Length body (or none). That saves two task switches and a coroutine
        chain per request, most of a small request's Python time. Anything else is handed to the task at
        the stage it reached (`_Inline`; the task's `_read_head` returns it and `_resume` serves it the
        usual way): a partial, bad or CRLF-led head, a body, no backend, no pooled connection, a 1xx,
        chunked, close-delimited, large or late response, an upstream error. The task's idle timer is
        the inline request's timer: it is moved to the response deadline and back to the idle deadline.
        """
        if self._inline is not None or self._inline_error is not None or self._inline_closing:
            return
        buf = self.buf
        if not buf:
            return
        listener = self.listener
        config = listener.config
        if buf[0] in (10, 13) or listener.draining:
            self._wake_task()
            return
        try:
            end = find_head_end(buf, config.max_request_line, config.max_header_bytes)
        except ProtocolError:
            end = -1  # the task reads the same and answers it
        if end < 0:
            self._wake_task()  # a partial head: the task times its completion (header_timeout)
            return
        self._serve_head(self.take(end))

    def _serve_head(self, data: bytes | bytearray) -> None:
        """`_serve_inline` for `data`, a whole request head just taken off the connection."""
        listener = self.listener
        config = listener.config
        stats = listener.stats
        stats.bytes_in += len(data)
        self.idle = False
        try:
            req = parse_request_head(data, config.max_request_line, config.max_header_bytes)
        except ProtocolError as exc:
            self._inline_error = exc
            self._wake_task()
            return
        route = self.route = listener.router.route(req)
        inline = self._inline = _Inline(req, route)
        framer = request_framer(req)
        if not framer.done or req.upgrade is not None or not route.inline_ok:
            # A body: the task streams it; an Upgrade: the task may tunnel; a pool whose sessions hook
            # or maxconn queue may have to wait: the task waits.
            self._wake_task()
            return
        stats.requests_total += 1
        self._method = req.method
        self._logreq = req
        inline.rid, inline.out_head = self._request_head(req)
        self._logrid = inline.rid
        inline.framer = framer
        self._t0 = now = self.loop.time()
        inline.ctx = ctx = Context(self.client_ip, route.hash_key(req) if route.keyed else "", now)
        pool = route.pool
        try:
            backend = pool.choose(ctx)
        except Exception:
            log.exception("pool %s: choosing a backend failed", pool.name)
            backend = None
        inline.backend = backend
        if backend is None:
            self._wake_task()
            return
        backend.on_connection_opened()
        up = listener.upstream.acquire(backend, now, idempotent=req.method in IDEMPOTENT_METHODS)
        if up is None:
            backend.on_connection_closed()  # the task connects (and counts the connection again)
            self._wake_task()
            return
        stats.in_flight += 1
        self.upstream_channel = up
        inline.up = up
        inline.received_before = up.received
        up.on_ready = self._inline_response
        up.on_chunk = self._inline_chunk
        self.move_read_deadline(now + pool.config.timeout)  # no whole response by then: the task takes over
        try:
            up.write(inline.out_head)
        except ConnectionError:
            self._escalate(up)

    def _inline_response(self) -> None:
        """`on_ready` of the upstream connection of an inline request: answer it when the response is
        whole, wait when it is not yet, hand it to the task when it is not simple."""
        inline = self._inline
        up = inline.up if inline is not None else None
        if inline is None or up is None:
            return
        buf = up.buf
        if inline.resp is None:
            head = self._inline_head(inline, buf)
            if head is None or (head is False and (up.eof or up.closed)):
                self._escalate(up)
                return
            if not head:
                return  # the head is not all here yet
        total = inline.head_end + inline.length
        if len(buf) < total:
            if up.eof or up.closed:
                self._escalate(up)
            return
        self._finish_inline(inline, up, up.take(total))

    def _inline_chunk(self, data: bytes) -> bool:
        """`on_chunk` of the upstream connection of an inline request: bytes from the backend while none
        are buffered. The common case, exactly one whole response with a simple body, is answered from
        them (True); anything else is buffered (False): for `_inline_response`, or for the task when the
        response is not for the callbacks."""
        inline = self._inline
        up = inline.up if inline is not None else None
        if inline is None or up is None or inline.resp is not None:
            return False
        head = self._inline_head(inline, data)
        if head is None:
            self._escalate(up)
            return False
        if not head or inline.head_end + inline.length != len(data):
            return False  # the head or the body is not all here yet (or more follows it)
        self._finish_inline(inline, up, data)
        return True

    def _inline_head(self, inline: _Inline, data: bytes | bytearray) -> bool | None:
        """Read the response head at the start of `data` (what the backend sent for this inline request)
        into `inline` (`resp`, `head_end`, `length`). True: read, with a body the callbacks can answer
        with; False: the head is not complete yet; None: not for the callbacks (a bad head, or a 1xx,
        chunked, close-delimited or large body): the task streams it."""
        try:
            end = data.find(b"\r\n\r\n") + 4  # (the parser checks the limits and rejects bare LFs)
            if end < 4:
                end = find_head_end(data, MAX_RESPONSE_LINE, MAX_RESPONSE_HEAD, status=(502, 502))
                if end < 0:
                    return False
            resp = parse_response_head(data[:end])
        except ProtocolError:
            return None
        length = simple_body_length(inline.req.method, resp)
        if not 0 <= length <= COALESCE_BYTES:
            return None
        inline.resp, inline.head_end, inline.length = resp, end, length
        return True

    def _finish_inline(self, inline: _Inline, up: Channel, data: bytes | bytearray) -> None:
        """Answer an inline request: `data` is the backend's whole response (head and body)."""
        listener = self.listener
        stats = listener.stats
        req = inline.req
        backend, resp = inline.backend, inline.resp
        assert backend is not None and resp is not None
        up.stop_callbacks()
        self._inline = None
        self.upstream_channel = None
        stats.in_flight -= 1
        now = self.loop.time()
        keep = req.keep_alive and not listener.draining
        out = self._response_head(
            resp,
            inline.rid,
            keep,
            req.minor,
            set_headers=listener.set_headers,
            body=data[inline.head_end :] if inline.length else b"",
        )
        try:
            if keep or listener.tls is not None:
                self.write(out)
            else:
                self._write_last(out)
        except ConnectionError:
            keep = False  # the client is gone; its connection_lost ends the connection
        else:
            stats.bytes_out += len(out)
            stats.inline_total += 1
            status = resp.status
            stats.responses["2xx" if 200 <= status < 300 else _status_class(status)] += 1
            self._log_status, self._log_bytes = status, len(out)
        if listener.access_log is not None:  # (status -1 when the answer could not be delivered)
            self._log_tr, self._logbackend = now - self._t0, backend
            self._log_request()
        backend.on_exchange(now - self._t0, len(inline.out_head), len(data), now)
        if resp.keep_alive and not up.buf and not up.eof and not up.closed:
            listener.upstream.release(backend, up, now)
        else:
            up.abort()
        self.idle = True
        if not keep:
            if self.task is None:
                self._end_without_task()
            else:
                self._inline_closing = True
                self.wake()
            return
        self._idle_deadline = deadline = now + listener.config.client_timeout
        self.move_read_deadline(deadline)
        if self.buf:
            self._serve_inline()

    def _write_last(self, data: bytes | bytearray) -> None:
        """Write the connection's last bytes (plain TCP; the close follows) and send the FIN at once.
        Corked (TCP_CORK) until the FIN, the answer and the FIN leave in one segment, as HAProxy sends
        them (MSG_MORE, then shutdown). The FIN goes by shutdown, not by the close alone: a close with
        unread client bytes is a reset, which would drop a still-corked answer. Not for TLS, which ends
        with a close_notify record."""
        transport = self.transport
        if transport is not None and not self.closed:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        self.write(data)  # (raises ConnectionResetError when the client is gone)
        assert transport is not None
        transport.write_eof()

    def _wake_task(self) -> None:
        """Hand over to the connection's task: wake it, or start it if the callbacks served alone so far."""
        if self.task is not None:
            self.wake()
        elif not self.finished:
            self.on_read_timeout = None
            self._idle_deadline = None
            self.task = self.loop.create_task(self._run())

    def _timeout_without_task(self) -> None:
        """The channel's deadline passed while no task exists: a late response (the task answers 504)
        or an idle connection (closed)."""
        if self._inline is not None:
            self._wake_task()
        else:
            self._end_without_task()

    def _end_without_task(self) -> None:
        """Close a connection the callbacks served alone (what the task's `finally` does)."""
        self.finished = True
        self.on_read_timeout = None
        self._close_client()
        self.listener.connection_done(self)

    def _escalate(self, up: Channel) -> None:
        """Hand the inline request to the task, which continues it where the callbacks stopped."""
        up.stop_callbacks()
        self._wake_task()

    async def _resume(self, inline: _Inline) -> bool:
        """Serve a request the callbacks started (`_serve_inline`) from the stage they reached."""
        if inline.up is not None:
            inline.up.stop_callbacks()  # from now on this task reads the backend connection
        if inline.framer is None:  # parsed (and routed) only
            return await self._exchange(inline.req, inline.route)
        assert inline.ctx is not None
        sent = (inline.up, inline.received_before) if inline.up is not None else None
        return await self._forward(
            inline.req, inline.ctx, inline.backend, inline.out_head, b"", inline.framer, inline.rid, sent
        )

    def _abandon_inline(self) -> None:
        """The task ends (the client left) with an inline request still at the backend: drop it."""
        inline, self._inline = self._inline, None
        if inline is None or inline.up is None or inline.backend is None:
            return
        self._logbackend = inline.backend  # (for the access log line of the abandoned request)
        up = inline.up
        up.stop_callbacks()
        up.abort()
        self.upstream_channel = None
        self.listener.stats.in_flight -= 1
        inline.backend.on_connection_closed()
        inline.backend.on_bytes(len(inline.out_head), up.received - inline.received_before, self.loop.time())

    async def _exchange(self, req: RequestHead, route: PoolRoute | None = None) -> bool:
        """Serve one request (`route`: its pool, when already chosen); True when the client connection
        may carry another one."""
        listener = self.listener
        stats = listener.stats
        route = self.route = route or listener.router.route(req)
        pool = route.pool
        stats.requests_total += 1
        self._method = req.method
        self._logreq = req
        rid, out_head = self._request_head(req)
        self._logrid = rid
        framer = request_framer(req)
        initial: bytes | bytearray = b""
        if not framer.done and self.buf:
            try:
                n = framer.feed(self.buf)
            except ProtocolError as exc:
                stats.count_bad_request(exc.reason)
                self._send_error(exc.status, str(exc), rid)
                return False
            initial = self.take(n)
            stats.bytes_in += n
        self._t0 = now = self.loop.time()
        if listener.config.redirect_to_https:
            return self._redirect_to_https(req, rid, framer.done)
        ctx = Context(self.client_ip, route.hash_key(req) if route.keyed else "", now)
        # --- Per-request hooks go here, before a backend is chosen: the place for sticky sessions and
        # rate limits (a hook may answer the request itself, e.g. 429 via self._fail(), or pick the
        # backend). Then the pool's policy chooses, through the maxconn queue when the pool has one.
        hook = route.sessions
        if hook is not None:  # [state] hook (halb.proxy.sessions_hook): rate limits, then sticky sessions
            refusal = await hook.before_choose(self, req, ctx)
            if refusal is not None:
                return self._fail(refusal.status, refusal.message, req, rid, framer.done, refusal.headers)
        queue = route.queue
        try:
            if self.sticky is not None:  # [state] hook: the session's backend replaces the policy's choice
                backend: Backend | None = self.sticky.backend
                if backend is not None and queue is not None:
                    await self._queued(queue, queue.acquire(backend))  # its maxconn: its own queue
            elif queue is None:
                backend = pool.choose(ctx)
            else:
                backend = await self._queued(queue, queue.choose(ctx))
        except (QueueFull, QueueTimeout) as exc:
            full = isinstance(exc, QueueFull)
            message = "all backends are busy and the queue is full" if full else "queue timeout"
            return self._fail(503, f'pool "{pool.name}": {message}', req, rid, framer.done)
        except Exception:
            log.exception("pool %s: choosing a backend failed", pool.name)
            backend = None
        return await self._forward(req, ctx, backend, out_head, initial, framer, rid)

    async def _queued(self, queue: BackendQueue, wait: Awaitable[T]) -> T:
        """A backend slot under per-backend maxconn (`queue.choose` or `queue.acquire`): may wait in a
        queue (counted)."""
        stats = self.listener.stats
        before = queue.queued_total
        stats.queued += 1
        self.in_queue = True
        try:
            return await wait
        except QueueFull:
            stats.queue_full_total += 1
            raise
        except QueueTimeout:
            stats.queue_timeouts_total += 1
            raise
        finally:
            self.in_queue = False
            stats.queued -= 1
            if queue.queued_total != before:
                stats.queued_total += 1

    async def _forward(
        self,
        req: RequestHead,
        ctx: Context,
        backend: Backend | None,
        out_head: bytes,
        initial: bytes | bytearray,
        framer: BodyFramer,
        rid: bytes,
        sent: tuple[Channel, int] | None = None,
    ) -> bool:
        """Forward a request to the chosen backend (503 when there is none) and relay the answer. `sent`:
        the head already went out on this pooled connection, which had received so many bytes before (an
        inline request, which counted itself in flight)."""
        listener = self.listener
        stats = listener.stats
        if backend is None:
            stats.no_backend_total += 1
            keep = req.keep_alive and not listener.draining and framer.done
            self._send_error(
                503, f'no healthy backend in pool "{self.route.pool.name}"', rid, keep=keep, minor=req.minor
            )
            return keep
        if sent is None:
            stats.in_flight += 1
        idempotent = req.method in IDEMPOTENT_METHODS
        may_resend = idempotent and framer.done and not initial
        tried: list[Backend] = []
        allow_reuse = True
        try:
            while True:
                if sent is not None:  # an inline request: the head went out on a pooled connection
                    got: tuple[Backend, Channel, bool] | None = (backend, sent[0], True)
                    received_before: int | None = sent[1]
                    sent = None
                else:
                    got = await self._connect(ctx, backend, tried, allow_reuse, idempotent)
                    received_before = None
                if got is None:
                    stats.backend_errors_total += 1
                    return self._fail(
                        503,  # as HAProxy: retries exhausted -> 503 (502 = a bad answer from a server)
                        f'no healthy backend in pool "{self.route.pool.name}" accepted a connection',
                        req,
                        rid,
                        framer.done,
                    )
                backend, up, reused = got
                self.upstream_channel = up
                self._logbackend = backend
                hook = self.route.sessions
                if self.sticky is not None and hook is not None:  # [state] hook: the mapping follows
                    hook.rehomed(self, backend)
                try:
                    return await self._relay(
                        req,
                        backend,
                        up,
                        reused and may_resend,
                        out_head,
                        initial,
                        framer,
                        rid,
                        received_before,
                    )
                except _DeadReused:
                    stats.reconnects_total += 1
                    allow_reuse = False
                finally:
                    free_slot(backend, self.route.queue)
        finally:
            stats.in_flight -= 1
            self.upstream_channel = None

    async def _connect(
        self, ctx: Context, backend: Backend, tried: list[Backend], allow_reuse: bool, idempotent: bool
    ) -> tuple[Backend, Channel, bool] | None:
        """A connection to `backend` (pooled if allowed) or, after connect failures, to another backend."""
        listener = self.listener
        route = self.route
        pool = route.pool
        config = pool.config
        while True:
            backend.on_connection_opened()
            if allow_reuse:
                up = listener.upstream.acquire(backend, ctx.now, idempotent=idempotent)
                if up is not None:
                    return backend, up, True
            try:
                up = await listener.upstream.connect(backend, config.connect_timeout)
            except (OSError, TimeoutError) as exc:
                nxt = retry_after_connect_failure(pool, route.queue, listener.stats, ctx, backend, tried, exc)
                if nxt is None:
                    return None
                backend = nxt
                continue
            except BaseException:
                free_slot(backend, route.queue)
                raise
            return backend, up, False

    async def _relay(
        self,
        req: RequestHead,
        backend: Backend,
        up: Channel,
        may_resend: bool,
        out_head: bytes,
        initial: bytes | bytearray,
        framer: BodyFramer,
        rid: bytes,
        sent_at: int | None = None,
    ) -> bool:
        """Send the request on `up` and stream the response back. True = client connection stays open.
        `sent_at`: the head was sent already, when `up` had received so many bytes (an inline request)."""
        listener = self.listener
        stats = listener.stats
        loop = self.loop
        timeout = self.route.pool.config.timeout
        sent = len(out_head) + len(initial)
        received = 0
        flushed_sent = flushed_received = 0
        reusable = False
        tunnel_closed = False  # a WebSocket tunnel ended cleanly and closed its backend side
        pump: asyncio.Task[None] | None = None
        self._pump_sent = 0
        self._pump_done_at = None
        received_before = up.received if sent_at is None else sent_at
        t0 = self._t0
        try:
            try:
                if sent_at is None:
                    up.write(out_head + initial if initial else out_head)
            except ConnectionError:
                if may_resend:
                    raise _DeadReused from None
                stats.backend_errors_total += 1
                return self._fail(502, f"backend {backend.name} closed the connection", req, rid, framer.done)
            if not framer.done:
                pump = loop.create_task(self._pump(framer, up))

            # --- the response head (after any 1xx interim responses)
            deadline = t0 + timeout
            while True:
                if up.buf:
                    try:
                        end = find_head_end(up.buf, MAX_RESPONSE_LINE, MAX_RESPONSE_HEAD, status=(502, 502))
                        resp = parse_response_head(up.take(end)) if end > 0 else None
                    except ProtocolError as exc:
                        stats.backend_errors_total += 1
                        return self._fail(
                            502,
                            f"backend {backend.name} sent an invalid response: {exc}",
                            req,
                            rid,
                            framer.done,
                        )
                    if resp is not None:
                        received += end
                        if resp.status >= 200:
                            break
                        if resp.status == 101:
                            if _websocket_upgrade(req) and _switches_to_websocket(resp):
                                moved = TunnelBytes()
                                try:
                                    tunnel_closed = await self._tunnel(backend, resp, up, moved)
                                finally:
                                    sent += moved.up
                                    received += moved.down
                                return False
                            stats.backend_errors_total += 1
                            return self._fail(
                                502, f"backend {backend.name} switched protocols", req, rid, framer.done
                            )
                        if req.minor == 1:
                            interim = self._response_head(resp, b"", True, 1, interim=True)
                            self.write(interim)
                            stats.bytes_out += len(interim)
                        deadline = loop.time() + timeout
                        continue
                if up.eof or up.closed:
                    err = _pump_error(pump)
                    if err is not None:
                        return self._pump_failed(err, rid)
                    if may_resend and up.received == received_before:
                        raise _DeadReused
                    stats.backend_errors_total += 1
                    return self._fail(
                        502, f"backend {backend.name} closed the connection", req, rid, framer.done
                    )
                try:
                    await up.wait_more(deadline)
                except TimeoutError:
                    now = loop.time()
                    if pump is not None:
                        if not pump.done():
                            deadline = now + timeout  # still uploading: the clock starts when it is sent
                            continue
                        done_at = self._pump_done_at
                        if done_at is not None and done_at + timeout > now:
                            deadline = done_at + timeout
                            continue
                    stats.backend_errors_total += 1
                    stats.backend_timeouts_total += 1
                    return self._fail(
                        504,
                        f"backend {backend.name} did not answer within {timeout:g}s",
                        req,
                        rid,
                        framer.done,
                    )

            self._log_tr = loop.time() - t0  # (t0: when the request head arrived)
            backend.on_response(self._log_tr)
            rframer = response_framer(req.method, resp)
            keep = (
                req.keep_alive
                and framer.done  # else the backend answered before the whole request body was read
                and not listener.draining
                and not rframer.close_delimited
                and (req.minor == 1 or not resp.chunked)
            )
            head = self._response_head(resp, rid, keep, req.minor, set_headers=listener.set_headers)
            if self.sticky is not None and self.sticky.cookie:  # [state] hook: a new session's cookie
                head = head[:-2] + self.sticky.cookie + b"\r\n"
            out_bytes = len(head)
            if up.buf and not rframer.done:
                # Body bytes that came with the head leave in the same write (one syscall less).
                try:
                    n = rframer.feed(up.buf)
                except ProtocolError as exc:
                    stats.backend_errors_total += 1
                    msg = f"backend {backend.name} sent an invalid response body: {exc}"
                    return self._fail(502, msg, req, rid, framer.done)
                if n:
                    body = up.take(n)
                    received += n
                    out_bytes += n
                    if n <= COALESCE_BYTES:
                        head += body
                    else:
                        self.write(head)
                        head = body
            self.write(head)
            status = self._log_status = resp.status
            stats.responses["2xx" if 200 <= status < 300 else _status_class(status)] += 1

            # --- the response body
            client_timeout = listener.config.client_timeout
            try:
                while not rframer.done:
                    buf = up.buf
                    if buf:
                        n = rframer.feed(buf)
                        if n:
                            self.write(up.take(n))
                            received += n
                            out_bytes += n
                            if received - flushed_received >= BODY_FLUSH_BYTES:
                                sent += self._pump_sent
                                self._pump_sent = 0
                                backend.on_bytes(
                                    sent - flushed_sent, received - flushed_received, loop.time()
                                )
                                flushed_sent, flushed_received = sent, received
                            if self.write_paused:
                                await self.drain(loop.time() + client_timeout)
                        continue
                    if up.eof:
                        rframer.eof()  # ProtocolError unless the body ends at close
                        break
                    if up.closed:
                        raise ConnectionResetError("backend connection lost inside the response")
                    await up.wait_more(loop.time() + timeout)
            except (ProtocolError, ConnectionError, OSError, TimeoutError) as exc:
                # The head went out already: the only honest signal left is to abort the client connection.
                log.debug("response from %s to %s aborted: %r", backend.name, self.client_ip, exc)
                if not self.closed:
                    stats.backend_errors_total += 1
                self.abort()
                return False
            finally:
                stats.bytes_out += out_bytes
                self._log_bytes = out_bytes

            if not framer.done or (pump is not None and _pump_error(pump) is not None):
                # The request body was not read to its end: the client stream is out of sync.
                keep = False
                self._linger = True
            reusable = (
                resp.keep_alive
                and not rframer.close_delimited
                and framer.done
                and (pump is None or (pump.done() and _pump_error(pump) is None))
                and not up.buf
                and not up.eof
                and not up.closed
            )
            return keep
        finally:
            if pump is not None:
                if not pump.done():
                    pump.cancel()
                elif not pump.cancelled():
                    pump.exception()  # retrieved; its outcome was handled above
            sent += self._pump_sent
            self._pump_sent = 0
            now = loop.time()
            if reusable:
                listener.upstream.release(backend, up, now)
            elif not tunnel_closed:
                up.abort()
            backend.on_bytes(sent - flushed_sent, received - flushed_received, now)

    async def _tunnel(self, backend: Backend, resp: ResponseHead, up: Channel, moved: TunnelBytes) -> bool:
        """The backend switched to WebSocket: send the 101 on, then relay bytes both ways (halb.proxy.tunnel)
        until both sides are done (True: both connections closed cleanly), one is lost or it idles for
        `tunnel_timeout` (both are cut: False). Frames that came with the 101 or behind the handshake
        request are relayed first."""
        listener = self.listener
        stats = listener.stats
        head = self._response_head(resp, b"", True, 1, interim=True)[:-4] + _UPGRADE_WEBSOCKET
        self.write(head)
        stats.bytes_out += len(head)
        stats.count_response(101)
        self._log_status = 101
        stats.tunnels_total += 1
        stats.tunnels_active += 1
        try:
            await relay_tunnel(self, up, listener.config.tunnel_timeout, moved)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("tunnel %s <-> %s cut: %r", self.client_ip, backend.name, exc)
            self.abort()
            return False
        finally:
            stats.tunnels_active -= 1
            stats.bytes_in += moved.up
            stats.bytes_out += moved.down
            self._log_bytes = len(head) + moved.down
        if up.transport is not None:
            close_after_flush(up.transport, self.loop, listener.config.client_timeout)
        return True

    async def _pump(self, framer: BodyFramer, up: Channel) -> None:
        """Forward the rest of the request body to the backend, beside the response reader."""
        listener = self.listener
        loop = self.loop
        stats = listener.stats
        client_timeout = listener.config.client_timeout
        timeout = self.route.pool.config.timeout
        try:
            while not framer.done:
                if self.buf:
                    n = framer.feed(self.buf)
                    data = self.take(n)
                    stats.bytes_in += n
                    self._pump_sent += n
                    try:
                        up.write(data)
                        if up.write_paused:
                            await up.drain(loop.time() + timeout)
                    except ConnectionError:
                        return  # the backend is gone; the response side reports it
                    except TimeoutError:
                        up.abort()  # the backend stopped reading: the response side reports it
                        return
                    continue
                if self.closed or self.eof:
                    raise _ClientGone("client closed inside the request body")
                await self.wait_more(loop.time() + client_timeout)
            self._pump_done_at = loop.time()
        except BaseException:
            up.abort()  # wakes the response side, which looks at this task's outcome
            raise

    def _pump_failed(self, err: BaseException, rid: bytes) -> bool:
        stats = self.listener.stats
        if isinstance(err, ProtocolError):
            stats.count_bad_request(err.reason)
            self._send_error(err.status, str(err), rid)
        elif isinstance(err, TimeoutError):
            stats.count_bad_request("body_timeout")
            self._send_error(408, "request body not received in time", rid)
        else:
            log.debug("client %s: request body: %r", self.client_ip, err)
        return False

    # --- heads ---------------------------------------------------------------------------------------
    def _request_head(self, req: RequestHead) -> tuple[bytes, bytes]:
        """The request id, and the head sent upstream.

        The client's field lines are copied as they came, as slices of the raw head, except the ones the
        proxy rewrites or drops (hop-by-hop, framing, forwarding headers: `req.special`, found by the codec
        in one regex pass). Headers named by a `Connection` token are dropped too (a rare, slower path).
        """
        raw = req.raw
        tokens = req.connection_tokens
        if tokens and not tokens <= _PLAIN_CONNECTION_TOKENS:
            return self._request_head_slow(req)
        out = [
            raw[: req.fields_start]
            if req.line_ok
            else b"%s %s %s\r\n" % (req.method, req.target, req.version)
        ]
        pos = req.fields_start
        xff: bytes | None = None
        rid: bytes | None = None
        for lname, value, start, end in req.special:
            if lname not in _REQ_SPECIAL:
                continue  # e.g. Host, Expect: forwarded as they are
            out.append(raw[pos:start])
            pos = end
            if lname == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif lname == b"x-request-id":
                if rid is None and value:
                    rid = value
            elif lname == b"te" and value.lower() == b"trailers":
                out.append(raw[start:end])
        out.append(raw[pos:-2])
        return self._request_head_tail(req, out, xff, rid)

    def _request_head_slow(self, req: RequestHead) -> tuple[bytes, bytes]:
        out = [req.method, b" ", req.target, b" ", req.version, b"\r\n"]
        tokens = req.connection_tokens
        xff: bytes | None = None
        rid: bytes | None = None
        for name, value in req.headers:
            lname = name.lower()
            if lname in _REQ_SPECIAL:
                if lname == b"x-forwarded-for":
                    xff = value if xff is None else xff + b", " + value
                elif lname == b"x-request-id":
                    if rid is None and value:
                        rid = value
                elif lname == b"te" and value.lower() == b"trailers":
                    out += (name, b": ", value, b"\r\n")
                continue
            if tokens and lname in tokens and lname not in _PROTECTED:
                continue
            out += (name, b": ", value, b"\r\n")
        return self._request_head_tail(req, out, xff, rid)

    def _request_head_tail(
        self, req: RequestHead, out: list[bytes], xff: bytes | None, rid: bytes | None
    ) -> tuple[bytes, bytes]:
        if req.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif req.content_length is not None:
            out.append(b"Content-Length: %d\r\n" % req.content_length)
        if rid is None:
            rid = b"%032x" % random.getrandbits(128)
        if xff is None:
            out += (b"X-Forwarded-For: ", self._forwarded_tail, rid)
        else:
            out += (b"X-Forwarded-For: ", xff, b", ", self._forwarded_tail, rid)
        out.append(b"\r\nConnection: keep-alive\r\n\r\n" if req.minor == 0 else b"\r\n\r\n")
        if req.upgrade is not None and _websocket_upgrade(req):
            out[-1] = _UPGRADE_WEBSOCKET
        return rid, b"".join(out)

    @staticmethod
    def _response_head(
        resp: ResponseHead,
        rid: bytes,
        keep: bool,
        minor: int,
        *,
        interim: bool = False,
        set_headers: SetHeaders | None = None,
        body: bytes | bytearray = b"",
    ) -> bytes:
        """The head sent to the client: the backend's field lines as they came (`resp.kept`), except the
        hop-by-hop and rewritten ones (and those `set_headers` replaces), then Transfer-Encoding, the
        listener's `set_headers`, Content-Length, X-Request-ID, Connection; `body` after it, if any."""
        tokens = resp.connection_tokens
        if tokens and not tokens <= _PLAIN_CONNECTION_TOKENS:
            out = [b"HTTP/1.1 %d %s\r\n" % (resp.status, resp.reason)]
            replaced = set_headers.names if set_headers is not None else frozenset()
            for name, value in resp.headers:
                lname = name.lower()
                if lname in _RESP_DROP or lname in tokens or lname in replaced:
                    continue
                out += (name, b": ", value, b"\r\n")
        else:
            kept = resp.kept if set_headers is None else set_headers.drop.sub(b"", resp.kept)
            out = [b"HTTP/1.1 %d %s" % (resp.status, resp.reason), kept]
            if resp.chunked or resp.te_other:  # the body passes unchanged, and so does its framing
                for lname, value in resp.special:
                    if lname == b"transfer-encoding":
                        out += (b"Transfer-Encoding: ", value, b"\r\n")
        if interim:
            out.append(b"\r\n")
            return b"".join(out)
        if set_headers is not None:
            out.append(set_headers.lines)
        if resp.content_length is not None:
            out.append(b"Content-Length: %d\r\n" % resp.content_length)
        if rid:
            out += (b"X-Request-ID: ", rid, b"\r\n")
        if not keep:
            out.append(b"Connection: close\r\n\r\n")
        elif minor == 0:
            out.append(b"Connection: keep-alive\r\n\r\n")
        else:
            out.append(b"\r\n")
        if body:
            out.append(body)
        return b"".join(out)

    def _log_request(self) -> None:
        """Write the access log line of the request that just ended (halb.proxy.access_log), and forget
        it. Callers check that the listener has an access log."""
        listener = self.listener
        access_log = listener.access_log
        assert access_log is not None
        req, backend = self._logreq, self._logbackend
        access_log.http(
            self.client_ip,
            self.client_port,
            listener.config.name,
            self.route.pool.name if req is not None else listener.router.default.pool.name,
            backend.name if backend is not None else "-",
            self._log_tr,
            self.loop.time() - self._t0 if req is not None else 0.0,
            self._log_status,
            self._log_bytes,
            b"%s %s HTTP/1.%d" % (req.method, req.target, req.minor) if req is not None else None,
            self._logrid,
        )
        self._logreq = self._logbackend = None
        self._logrid = b""
        self._log_status = -1
        self._log_bytes = 0
        self._log_tr = -1.0

    def _redirect_to_https(self, req: RequestHead, rid: bytes, body_done: bool) -> bool:
        """`redirect_to_https`: 301 (GET, HEAD) or 308 (any other method, which must be kept) to the same
        host and target over https; no backend is asked. True when the connection stays open."""
        host = req.host_name()
        if host is None:
            self.listener.stats.count_bad_request("bad_host")
            return self._fail(400, "no valid Host to redirect to", req, rid, body_done)
        port = self.listener.config.https_port
        authority = host if port == 443 else b"%s:%d" % (host, port)
        target = req.target
        if not target.startswith(b"/"):  # absolute form (http://host/path): keep the path
            target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
        status = 301 if req.method in (b"GET", b"HEAD") else 308
        location = b"https://" + authority + target
        message = f"moved to {location.decode('latin-1')}"
        return self._fail(status, message, req, rid, body_done, b"Location: " + location + b"\r\n")

    def _fail(
        self, status: int, message: str, req: RequestHead, rid: bytes, body_done: bool, extra: bytes = b""
    ) -> bool:
        """Answer a request that got no response from a backend; True when the connection stays open.

        It stays open only when the whole request body was read from the client (the stream is in sync).
        """
        keep = req.keep_alive and body_done and not self.listener.draining
        self._send_error(status, message, rid, keep=keep, minor=req.minor, extra=extra)
        return keep

    def _send_error(
        self,
        status: int,
        message: str,
        rid: bytes | None = None,
        *,
        keep: bool = False,
        minor: int = 1,
        extra: bytes = b"",  # more header lines, each ending in CRLF (e.g. Retry-After)
    ) -> None:
        body = message.encode("utf-8", "replace") + b"\n"
        parts = [
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Cache-Control: no-store\r\n" % (status, REASONS.get(status, b"Error"), len(body))
        ]
        if extra:
            parts.append(extra)
        if rid:
            parts += (b"X-Request-ID: ", rid, b"\r\n")
        if not keep:
            parts.append(b"Connection: close\r\n")
            self._linger = True
        elif minor == 0:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if self._method != b"HEAD":
            parts.append(body)
        data = b"".join(parts)
        try:
            self.write(data)
        except ConnectionError:
            return
        stats = self.listener.stats
        stats.count_response(status)
        stats.bytes_out += len(data)
        self._log_status = status
        self._log_bytes = len(data)


def _status_class(status: int) -> str:
    return ("1xx", "2xx", "3xx", "4xx", "5xx")[min(max(status // 100, 1), 5) - 1]


def _pump_error(pump: asyncio.Task[None] | None) -> BaseException | None:
    if pump is None or not pump.done() or pump.cancelled():
        return None
    return pump.exception()
