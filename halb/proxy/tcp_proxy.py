"""The TCP proxy: each client connection is relayed byte for byte to one backend, with callbacks only.

`TcpListener` is a TCP listener's state (sessions, stats, limits, idle timeout, drain) and `SessionCore`
what every session shares (backend choice after a failed connect, byte counts, the end of a session).
Plain listeners relay on raw sockets (`halb.proxy.tcp_relay`); TLS listeners on the transports below.

How this works on transports: `TcpSession` is the protocol of the client connection and `_UpstreamSide`
the protocol of its backend connection; data received on one side is written straight to the other side's
transport (no coroutine, no copy in user space on the hot path). Backpressure is the transports' own:
when one side's write buffer passes its high-water mark (`pause_writing`), the *other* side stops reading
until it drains (`resume_writing`), so memory stays bounded whatever the speed difference. Half-close
is relayed: EOF from one side becomes `write_eof()` on the other, the remaining direction keeps flowing,
and the session ends when both directions are shut (or either side errors, or nothing moved for
`client_timeout`).

On accept, the client is paused while a short task picks a backend (`pool.choose`, Context with the
client IP) and connects within `connect_timeout`; a failed connect is reported to the pool and retried on
another backend (at most `retries` more). No backend: the client connection is closed. Stats: the backend's
`active_connections` counts open sessions, `on_response(duration)` is called at the end of each session,
and `on_bytes` about once per housekeeping tick (`TcpListener.tick`, which also enforces the idle timeout).
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from halb.backend import Backend
from halb.balancing.base import Context
from halb.config_model import ListenerConfig
from halb.pool import Pool
from halb.proxy.access_log import AccessLog
from halb.proxy.flush import close_after_flush, write_eof_after_flush
from halb.proxy.limits import (
    BackendQueue,
    ListenerGate,
    NodeGate,
    QueueFull,
    QueueTimeout,
    free_slot,
    retry_after_connect_failure,
)
from halb.proxy.proxy_protocol import proxy_header
from halb.proxy.resolve import BackendResolver
from halb.proxy.stats import TcpListenerStats
from halb.proxy.tls import TlsTerminator

log = logging.getLogger("halb.proxy.tcp")

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class TcpListener:
    def __init__(
        self,
        config: ListenerConfig,
        pool: Pool,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        gate: ListenerGate | None = None,
        queue: BackendQueue | None = None,
        tls: TlsTerminator | None = None,
        access_log: AccessLog | None = None,
        resolver: BackendResolver | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.access_log = access_log  # one line per connection (halb.proxy.access_log)
        self.loop = loop or asyncio.get_running_loop()
        self.resolver = resolver or BackendResolver(self.loop)  # backends' addresses (halb.proxy.resolve)
        self.stats = TcpListenerStats()
        self.gate = gate or ListenerGate.for_listener(NodeGate(0), config)
        self.queue = queue  # per-backend maxconn queue of the pool; None when no backend has maxconn
        self.tls = tls
        self.sessions: set[SessionCore] = set()
        self.draining = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        # On transports (TLS listeners) the client address is only looked up (a getpeername call) when
        # something needs it; the raw relay gets it with the accept.
        self.needs_client_ip = bool(
            config.maxconn_per_ip
            or pool.config.algorithm in ("ip_hash", "consistent_hash")
            or access_log is not None
            or pool.config.send_proxy
            or self.gate.acl is not None
        )

    def protocol_factory(self) -> asyncio.Protocol:
        return TcpSession(self)

    def set_queue(self, pool: Pool, queue: BackendQueue) -> None:
        """`pool` got a maxconn queue at run time (ProxyServer.pools_changed)."""
        if self.pool is pool:
            self.queue = queue

    def count_rejected(self, reason: str) -> None:
        rejected = self.stats.rejected
        rejected[reason] = rejected.get(reason, 0) + 1

    def session_done(self, session: SessionCore) -> None:
        if session.admitted:
            session.admitted = False
            self.gate.release(session.client_ip)
        if session in self.sessions:
            self.sessions.discard(session)
            self.stats.connections_active -= 1
        if not self.sessions:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    def tick(self, now: float) -> None:
        """Housekeeping: report bytes to backends, close sessions idle longer than `client_timeout`."""
        timeout = self.config.client_timeout
        for session in list(self.sessions):
            session.flush_bytes(now)
            total = session.bytes_up + session.bytes_down
            if total != session.seen_bytes:
                session.seen_bytes = total
                session.idle_since = now
            elif now - session.idle_since >= timeout:
                self.stats.idle_timeouts_total += 1
                session.finish(abort=True, end="idle_timeout")

    def begin_drain(self) -> None:
        self.draining = True

    async def wait_idle(self) -> None:
        if not self.sessions:
            return
        waiter = self.loop.create_future()
        self._idle_waiters.append(waiter)
        await waiter

    def tasks(self) -> list[asyncio.Task[None]]:
        """Connect tasks still running (for a clean shutdown)."""
        return [
            s.connect_task for s in self.sessions if s.connect_task is not None and not s.connect_task.done()
        ]

    def close_all(self) -> None:
        for session in list(self.sessions):
            session.finish(abort=True, end="shutdown")

    @property
    def buffered_bytes(self) -> int:
        return sum(session.buffered() for session in self.sessions)


class SessionCore:
    """What every relayed connection shares, whichever way its bytes move (`TcpSession` on transports for
    TLS listeners, `halb.proxy.tcp_relay.RawSession` on raw sockets for plain ones): the client address,
    the backend, byte counts, the idle clock (see `TcpListener.tick`), the choice of a backend after a
    failed connect, and the end of the session (stats, backend accounting, the access log line)."""

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.backend: Backend | None = None
        self.client_ip = ""
        self.client_port = 0
        self.proxied = False  # the client address came from a PROXY header (listener accept_proxy)
        self.closed = False
        self.admitted = False  # holds a slot of the listener's connection limits (released when done)
        self.connected = False  # the client is connected (on a TLS listener: its handshake completed)
        self.bytes_up = 0  # client -> backend
        self.bytes_down = 0  # backend -> client
        self.seen_bytes = 0
        self.idle_since = 0.0
        self.accepted = 0.0
        self.started = 0.0
        self._flushed_up = 0
        self._flushed_down = 0
        self.connect_task: asyncio.Task[None] | None = None
        self.tried: list[Backend] = []  # backends whose connect failed for this session

    def _close_connections(self, abort: bool) -> None:
        raise NotImplementedError

    def buffered(self) -> int:
        """Bytes this session holds in user space."""
        raise NotImplementedError

    def next_backend(self, failed: Backend, exc: BaseException) -> Backend | None:
        """A connect to `failed` failed: report it, and pick another backend if retries are left and the
        client is still there (the caller counts the new backend's connection as opened)."""
        listener = self.listener
        ctx = Context(self.client_ip, "", self.loop.time())
        return retry_after_connect_failure(
            listener.pool, listener.queue, listener.stats, ctx, failed, self.tried, exc, retry=not self.closed
        )

    def no_backend(self) -> None:
        """No backend is available for this session: close the client."""
        self.listener.stats.no_backend_total += 1
        log.debug("no backend in pool %s for %s", self.listener.pool.name, self.client_ip)
        self.finish(end="no_backend")

    async def _choose_queued(self, queue: BackendQueue, ctx: Context) -> Backend | None:
        """pool.choose() under per-backend maxconn: may wait in the pool's queue (the client is paused)."""
        stats = self.listener.stats
        before = queue.queued_total
        stats.queued += 1
        try:
            return await queue.choose(ctx)
        except QueueFull:
            stats.queue_full_total += 1
            end = "queue_full"
        except QueueTimeout:
            stats.queue_timeouts_total += 1
            end = "queue_timeout"
        finally:
            stats.queued -= 1
            if queue.queued_total != before:
                stats.queued_total += 1
        self.finish(end=end)
        return None

    def finish(self, abort: bool = False, end: str = "-") -> None:
        """End the session: close both connections (flushing, or aborting on errors), report stats and
        the access log line (`end`: how it ended, see halb.proxy.access_log)."""
        if self.closed:
            return
        self.closed = True
        task = self.connect_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self._close_connections(abort)
        backend = self.backend
        if backend is not None:
            now = self.loop.time()
            self.flush_bytes(now)
            backend.on_response(now - self.started)
            self.backend = None
            free_slot(backend, self.listener.queue)
        listener = self.listener
        if listener.access_log is not None and self.connected:
            now = self.loop.time()
            listener.access_log.tcp(
                self.client_ip,
                self.client_port,
                listener.config.name,
                listener.pool.name,
                backend.name if backend is not None else "-",
                self.started - self.accepted if backend is not None else -1.0,
                now - self.accepted,
                self.bytes_up,
                self.bytes_down,
                end,
            )
        listener.session_done(self)

    def flush_bytes(self, now: float) -> None:
        up = self.bytes_up - self._flushed_up
        down = self.bytes_down - self._flushed_down
        if not (up or down):
            return
        self._flushed_up = self.bytes_up
        self._flushed_down = self.bytes_down
        stats = self.listener.stats
        stats.bytes_in += up
        stats.bytes_out += down
        if self.backend is not None:
            self.backend.on_bytes(up, down, now)


class TcpSession(SessionCore, asyncio.Protocol):
    """Client side of one relayed connection on asyncio transports (TLS listeners)."""

    def __init__(self, listener: TcpListener) -> None:
        super().__init__(listener)
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.client_eof = False
        self.upstream_eof = False
        self._pending: list[bytes] = []

    def _close_connections(self, abort: bool) -> None:
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                if abort:
                    transport.abort()
                else:
                    close_after_flush(transport, self.loop, self.listener.config.client_timeout)

    def buffered(self) -> int:
        total = 0
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                total += transport.get_write_buffer_size()
        return total

    # --- client side protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.connected = True
        self.client = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        transport.pause_reading()  # until the backend is connected
        listener = self.listener
        if listener.needs_client_ip and not self.proxied:
            peer = transport.get_extra_info("peername")
            self.client_ip = str(peer[0]) if peer else ""
            self.client_port = int(peer[1]) if peer else 0
        if not self.admitted:
            reason = listener.gate.admit(self.client_ip)
            if reason:
                listener.count_rejected(reason)
                self.closed = True
                transport.abort()
                return
            self.admitted = True
        listener.sessions.add(self)
        listener.stats.connections_active += 1
        listener.stats.connections_total += 1
        self.accepted = self.started = self.idle_since = self.loop.time()
        self.connect_task = self.loop.create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        self.bytes_up += len(data)
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)
        else:
            # Not connected yet (uvloop starts reading despite the pause in connection_made): hold it.
            self._pending.append(data)
            if self.client is not None:
                self.client.pause_reading()

    def eof_received(self) -> bool:
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None:
            if self.upstream_eof:
                self.finish()
            else:
                _shut_write(upstream)
        return True

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish(abort=exc is not None, end="client_reset" if exc is not None else "-")

    # --- backend side (called by _UpstreamSide) ------------------------------------------------------
    def on_upstream_connected(self, transport: asyncio.Transport) -> None:
        """The backend connection is up: from now on client bytes go straight to it, in order (after the
        PROXY protocol header, when the pool sends one)."""
        self.upstream = transport
        version = self.listener.pool.config.send_proxy
        if version and self.client is not None:
            local = self.client.get_extra_info("sockname")
            transport.write(proxy_header(version, (self.client_ip, self.client_port), local[:2]))
        for data in self._pending:
            transport.write(data)
        self._pending.clear()
        if self.client_eof:
            _shut_write(transport)

    def on_upstream_data(self, data: bytes) -> None:
        self.bytes_down += len(data)
        client = self.client
        if client is not None and not client.is_closing():
            client.write(data)

    def on_upstream_eof(self) -> None:
        self.upstream_eof = True
        if self.client_eof:
            self.finish()
        elif self.client is not None:
            _shut_write(self.client)

    def on_upstream_pause_writing(self) -> None:
        if self.client is not None and self.upstream is not None:
            self.client.pause_reading()

    def on_upstream_resume_writing(self) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.resume_reading()

    # --- session -------------------------------------------------------------------------------------
    async def _connect(self) -> None:
        listener = self.listener
        pool = listener.pool
        config = pool.config
        loop = self.loop
        ctx = Context(self.client_ip, "", loop.time())
        queue = listener.queue
        if queue is None:
            backend = pool.choose(ctx)
        else:
            backend = await self._choose_queued(queue, ctx)
            if self.closed:
                return
        if backend is None:
            self.no_backend()
            return
        while True:
            backend.on_connection_opened()
            try:
                await listener.resolver.connect(
                    lambda: _UpstreamSide(self), backend.host, backend.port, config.connect_timeout
                )
            except OSError as exc:  # (a timeout too)
                nxt = self.next_backend(backend, exc)
                if nxt is None:
                    self.finish(end="connect_failed")
                    return
                backend = nxt
                continue
            except BaseException:
                free_slot(backend, self.listener.queue)
                raise
            break
        self.backend = backend
        self.started = loop.time()
        if self.closed:  # the client left while we connected (or the backend closed at once)
            free_slot(backend, self.listener.queue)
            self.backend = None
            if self.upstream is not None:
                self.upstream.abort()
            return
        assert self.client is not None
        self.client.resume_reading()


class _UpstreamSide(asyncio.Protocol):
    """Backend side of a session: forwards every event to the session."""

    __slots__ = ("session",)

    def __init__(self, session: TcpSession) -> None:
        self.session = session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        session = self.session
        if session.closed:
            transport.abort()
            return
        session.on_upstream_connected(transport)

    def data_received(self, data: bytes) -> None:
        self.session.on_upstream_data(data)

    def eof_received(self) -> bool:
        self.session.on_upstream_eof()
        return True

    def pause_writing(self) -> None:
        self.session.on_upstream_pause_writing()

    def resume_writing(self) -> None:
        self.session.on_upstream_resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.finish(abort=exc is not None, end="backend_reset" if exc is not None else "-")


def _shut_write(transport: asyncio.Transport) -> None:
    write_eof_after_flush(transport, asyncio.get_running_loop())
