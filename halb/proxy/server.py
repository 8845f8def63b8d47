"""`ProxyServer`: binds the listeners of one worker process and runs their HTTP or TCP proxies.

How this works: `start()` binds one socket per listener with SO_REUSEADDR and SO_REUSEPORT (so N worker
processes can each bind the same address and the kernel spreads connections among them) and serves it
with the listener's HTTP (`http_proxy.HttpListener`, on `loop.create_server`) or TCP
(`tcp_proxy.TcpListener`, on the raw-socket relay `tcp_relay.RawTcpServer`) handler. All HTTP listeners
share one `UpstreamPool` of keep-alive backend connections. A housekeeping task ticks twice a second:
expires idle backend connections, reports TCP bytes to backends and enforces the TCP idle timeout.

Limits and TLS: the server owns this worker's `NodeGate` (its share of `node.maxconn`), gives each
listener a `ListenerGate` (listener `maxconn`, `maxconn_per_ip`) and each pool with a per-backend
`maxconn` a `BackendQueue` (halb.proxy.limits). A listener with `tls` (or an HTTP listener with
`accept_proxy`) is served by an `Acceptor` (halb.proxy.accept), which admits each connection before its
handshake (or reads its PROXY header), so the limits count it from its accept on; `reload_tls()` (SIGHUP)
loads fresh certificates into each `TlsTerminator`'s context (halb.proxy.tls).

Shutdown is in steps: `stop_accepting()` closes the listening sockets; `drain(timeout)` lets in-flight
requests finish (their responses say `Connection: close`), closes idle keep-alive connections at once and
returns True when nothing is left or False at the timeout (TCP sessions simply run until they end);
`close()` aborts whatever remains. `stats()` is what the admin API serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from halb.config_model import ListenerConfig
from halb.pool import Pool
from halb.proxy.accept import Acceptor
from halb.proxy.access_log import AccessLog
from halb.proxy.http_proxy import HttpListener
from halb.proxy.limits import (
    BackendQueue,
    ListenerGate,
    NodeGate,
    automatic_maxconn,
    make_backend_queue,
    share,
)
from halb.proxy.resolve import BackendResolver
from halb.proxy.routes import PoolRoute
from halb.proxy.tcp_proxy import TcpListener
from halb.proxy.tcp_relay import RawTcpServer
from halb.proxy.tls import TlsTerminator
from halb.proxy.upstream_pool import UpstreamPool

if TYPE_CHECKING:
    from halb.proxy.sessions_hook import ListenerHook, StateRuntime

log = logging.getLogger("halb.proxy")

HOUSEKEEPING_INTERVAL = 0.5


class ProxyServer:
    def __init__(
        self,
        listeners: Sequence[ListenerConfig],
        pools: Mapping[str, Pool],
        *,
        upstream_idle_timeout: float = 15.0,
        upstream_max_idle: int = 64,
        maxconn: int = 0,
        workers: int = 1,
        state: StateRuntime | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        for listener in listeners:
            for name in listener.pools:
                if name not in pools:
                    raise ValueError(f"listener {listener.name!r}: unknown pool {name!r}")
            if listener.mode not in ("http", "tcp"):
                raise ValueError(f"listener {listener.name!r}: unknown mode {listener.mode!r}")
        self.listeners = list(listeners)
        self.pools = pools
        self.state = state  # [state]/[ratelimits]: per-listener hooks (halb.proxy.sessions_hook)
        self.access_log = access_log  # one line per request / connection (halb.proxy.access_log)
        self.upstream = UpstreamPool(
            idle_timeout=upstream_idle_timeout, max_idle_per_backend=upstream_max_idle
        )
        # Connection limits: this worker's share of node.maxconn (automatic from the fd limit when 0).
        self.workers = workers
        self.gate = NodeGate(share(maxconn, workers) if maxconn else automatic_maxconn())
        # TLS contexts are built here, before anything binds: a bad certificate fails the start.
        self.tls: dict[str, TlsTerminator] = {
            lc.name: TlsTerminator(lc.tls, ("http/1.1",) if lc.mode == "http" else ())
            for lc in self.listeners
            if lc.tls is not None
        }
        self._handlers: dict[str, HttpListener | TcpListener] = {}
        self._servers: dict[str, asyncio.AbstractServer | Acceptor | RawTcpServer] = {}
        self._addresses: dict[str, tuple[str, int]] = {}
        self._housekeeping: asyncio.Task[None] | None = None
        self._started = False
        self._queues: dict[str, BackendQueue | None] = {}  # each pool's maxconn queue (built at start)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Bind and serve every listener. Raises OSError naming the listener when a bind fails."""
        if self._started:
            raise RuntimeError("ProxyServer already started")
        self._started = True
        loop = asyncio.get_running_loop()
        queues = {name: make_backend_queue(pool, self.workers, loop) for name, pool in self.pools.items()}
        self._queues, self._loop = queues, loop
        resolver = self.upstream.resolver = BackendResolver(loop)  # one per worker, for every listener
        try:
            for config in self.listeners:
                pool = self.pools[config.pool]
                gate = ListenerGate.for_listener(self.gate, config, self.workers)
                tls = self.tls.get(config.name)
                handler: HttpListener | TcpListener
                if config.mode == "http":
                    routes = [
                        (route, self._pool_route(config, route.pool, queues)) for route in config.routes
                    ]
                    handler = HttpListener(
                        config,
                        pool,
                        self.upstream,
                        loop=loop,
                        gate=gate,
                        queue=queues[config.pool],
                        tls=tls,
                        sessions=self._hook(config, pool),
                        access_log=self.access_log,
                        routes=routes,
                    )
                else:
                    handler = TcpListener(
                        config,
                        pool,
                        loop=loop,
                        gate=gate,
                        queue=queues[config.pool],
                        tls=tls,
                        access_log=self.access_log,
                        resolver=resolver,
                    )
                sock = await _bind(config, loop)
                server: asyncio.AbstractServer | Acceptor | RawTcpServer
                try:
                    if tls is not None or (config.accept_proxy and isinstance(handler, HttpListener)):
                        # accepts itself: the limits apply from the accept on, the PROXY header is read
                        sock.listen(config.backlog)
                        server = Acceptor(
                            loop,
                            sock,
                            config.name,
                            handler,
                            config.header_timeout,
                            tls=tls,
                            accept_proxy=config.accept_proxy,
                        )
                    elif isinstance(handler, TcpListener):  # plain TCP: the raw-socket relay
                        sock.listen(config.backlog)
                        server = RawTcpServer(loop, sock, handler)
                    else:
                        server = await loop.create_server(
                            handler.protocol_factory, sock=sock, backlog=config.backlog
                        )
                except OSError as exc:
                    sock.close()
                    raise OSError(
                        exc.errno, f"listener {config.name!r}: cannot listen on {config.bind}: {exc}"
                    ) from exc
                self._handlers[config.name] = handler
                self._servers[config.name] = server
                name = sock.getsockname()
                self._addresses[config.name] = (str(name[0]), int(name[1]))
                log.info(
                    "listener %s (%s) on %s -> pool %s", config.name, config.mode, config.bind, config.pool
                )
        except BaseException:
            for server in self._servers.values():
                server.close()
            self._servers.clear()
            raise
        self._housekeeping = loop.create_task(self._housekeep())

    def _hook(self, config: ListenerConfig, pool: Pool) -> ListenerHook | None:
        """The [state] hook of an HTTP listener for one of its pools (None: nothing to do)."""
        return self.state.for_listener(config, pool) if self.state is not None else None

    def _pool_route(
        self, config: ListenerConfig, name: str, queues: dict[str, BackendQueue | None]
    ) -> PoolRoute:
        pool = self.pools[name]
        return PoolRoute(pool, queues[name], self._hook(config, pool))

    def pools_changed(self, names: Iterable[str]) -> None:
        """After `Pool.reconfigure` (the cluster's shared configuration): a pool that now has a `maxconn`
        but had none when the server started gets its queue, in every listener and route that sends to
        it (which then stop serving requests inline: the queue may have to wait)."""
        if self._loop is None:
            return
        for name in names:
            pool = self.pools.get(name)
            if pool is None or self._queues.get(name) is not None:
                continue
            queue = make_backend_queue(pool, self.workers, self._loop)
            if queue is None:
                continue
            self._queues[name] = queue
            for handler in self._handlers.values():
                handler.set_queue(pool, queue)
            log.info("pool %s: per-backend maxconn queue started", name)

    def address(self, listener: str) -> tuple[str, int]:
        """The bound (host, port) of a listener (useful with port 0)."""
        return self._addresses[listener]

    def stop_accepting(self) -> None:
        for server in self._servers.values():
            server.close()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, let in-flight work finish; True if everything finished within `timeout`."""
        self.stop_accepting()
        for handler in self._handlers.values():
            handler.begin_drain()
        self.upstream.close_all()
        waits = [asyncio.ensure_future(h.wait_idle()) for h in self._handlers.values()]
        if not waits:
            return True
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for fut in pending:
            fut.cancel()
        return not pending

    async def close(self) -> None:
        """Abort every connection and stop."""
        self.stop_accepting()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        tasks: list[asyncio.Task[None]] = []
        for server in self._servers.values():
            if isinstance(server, (Acceptor, RawTcpServer)):
                tasks.extend(server.tasks())  # TLS handshakes and PROXY headers in progress
        for handler in self._handlers.values():
            tasks.extend(handler.tasks())
            handler.close_all()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        self.upstream.close_all()
        if self.upstream.resolver is not None:
            self.upstream.resolver.close()  # (lookups in progress)
        for server in self._servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()

    def reload_tls(self) -> dict[str, bool]:
        """SIGHUP: re-read every TLS listener's certificate and key (see halb.proxy.tls)."""
        return {name: terminator.reload() for name, terminator in self.tls.items()}

    def stats(self) -> dict[str, object]:
        listeners: dict[str, object] = {}
        for name, handler in self._handlers.items():
            entry = handler.stats.as_dict()
            entry["pool"] = handler.config.pool
            entry["bind"] = str(handler.config.bind)
            entry["draining"] = handler.draining
            entry["connections_limit"] = handler.gate.limit
            terminator = self.tls.get(name)
            if terminator is not None:
                entry["tls_reloads_total"] = terminator.reloads_total
                entry["tls_reload_failures_total"] = terminator.reload_failures_total
                entry["tls_handshake_failures_total"] = terminator.handshake_failures_total
            listeners[name] = entry
        return {
            "listeners": listeners,
            "upstream": self.upstream.stats(),
            "connections": {"current": self.gate.current, "limit": self.gate.limit},
        }

    def open_connections(self) -> int:
        """Client connections still open (being served, or lingering before the close)."""
        total = 0
        for handler in self._handlers.values():
            if isinstance(handler, HttpListener):
                total += len(handler.connections) + len(handler.lingering)
            else:
                total += len(handler.sessions)
        return total

    def buffered_bytes(self) -> int:
        """Bytes held in user space by all connections (read buffers + transport write buffers)."""
        return sum(h.buffered_bytes for h in self._handlers.values())

    async def _housekeep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            now = loop.time()
            try:
                self.upstream.sweep(now)
                for handler in self._handlers.values():
                    if isinstance(handler, TcpListener):
                        handler.tick(now)
            except Exception:
                log.exception("proxy housekeeping failed")


async def _bind(config: ListenerConfig, loop: asyncio.AbstractEventLoop) -> socket.socket:
    host = config.bind.host or None
    try:
        infos = await loop.getaddrinfo(
            host, config.bind.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(f"listener {config.name!r}: cannot resolve bind address {config.bind}: {exc}") from exc
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"listener {config.name!r}: cannot bind {config.bind}: {exc.strerror}"
        ) from exc
    return sock
