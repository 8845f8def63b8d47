"""Accepting from a listening socket in batches: the accept step of the raw TCP relay and the TLS acceptor.

How this works: the caller watches its non-blocking listening socket for readability (an epoll set, or
`loop.add_reader`) and calls `accept_ready` when it is readable. It accepts up to `ACCEPT_BATCH`
connections, stopping at EAGAIN, and hands each to `serve(sock, address)`; the accepted socket is in
blocking mode (the caller makes it non-blocking or passes MSG_DONTWAIT). A client gone before its accept
(ECONNABORTED, EPROTO) is skipped. Any other error (mostly lack of resources: EMFILE, ENFILE, ENOBUFS,
ENOMEM) is logged and `pause()` called: the caller stops watching the socket for `ACCEPT_PAUSE` seconds,
as asyncio's own servers do, instead of spinning on a readable socket it cannot accept from. An exception
from `serve` is logged and that connection closed; accepting goes on.

`Acceptor` serves listeners that must act between the accept and the proxy protocol: TLS listeners
(admitted before the handshake, so handshakes count against the limits) and HTTP listeners with
`accept_proxy`; it hands each connection to the listener's protocol with `loop.connect_accepted_socket`.
`proxied_client` is the `accept_proxy` step it shares with the raw TCP relay: admit the connection by its
peer (allow/deny and the node's and listener's maxconn), read the PROXY header (halb.proxy.proxy_protocol)
within `header_timeout`, then count the client address it names against `maxconn_per_ip`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, cast

from halb.errors import ProtocolError
from halb.proxy.proxy_protocol import read_proxy_header

if TYPE_CHECKING:
    from halb.proxy.limits import ListenerGate
    from halb.proxy.tls import TlsTerminator

log = logging.getLogger("halb.proxy")

ACCEPT_BATCH = 64  # connections accepted per readiness of the listening socket
ACCEPT_PAUSE = 0.5  # seconds without accepting after running out of resources
_GONE = (errno.ECONNABORTED, errno.EPROTO)


def accept_ready(
    sock: socket.socket,
    name: str,
    serve: Callable[[socket.socket, Any], None],
    pause: Callable[[], None],
) -> None:
    """Accept what is waiting on `sock` (listener `name`) and `serve` each connection."""
    for _ in range(ACCEPT_BATCH):
        try:
            conn, address = sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in _GONE:
                continue
            log.error("listener %s: cannot accept (%s): pausing %.1f s", name, exc.strerror, ACCEPT_PAUSE)
            pause()
            return
        try:
            serve(conn, address)
        except Exception:  # a bug must not stop the listener: drop this connection, keep accepting
            log.exception("listener %s: serving a new connection failed", name)
            conn.close()


class Listener(Protocol):
    """What an `Acceptor` needs of a listener (`HttpListener`, `TcpListener`)."""

    gate: ListenerGate

    def count_rejected(self, reason: str) -> None: ...

    def protocol_factory(self) -> asyncio.Protocol: ...


class App(Protocol):
    """What an `Acceptor` sets on the proxy protocol it hands a connection to (`HttpConnection`,
    `TcpSession`): admitted, with this client address (its `connection_made` keeps it)."""

    admitted: bool  # holds a slot of the listener's limits (the app releases it when it ends)
    client_ip: str
    client_port: int
    proxied: bool  # the client address came from a PROXY header, not from the socket
    connected: bool  # its connection_made ran (the handshake completed)


async def proxied_client(
    loop: asyncio.AbstractEventLoop,
    conn: socket.socket,
    peer: Any,
    listener: Listener,
    timeout: float,
) -> tuple[str, int] | None:
    """`accept_proxy`: admit the connection by its peer (the proxy in front: `allow`/`deny`, the node's and
    listener's maxconn), read its PROXY header within `timeout`, then count the client address the header
    names against `maxconn_per_ip`. -> that address: the connection then holds a slot, released with it
    by whoever serves the connection; or None: refused, counted (`proxy_header` for a bad, missing or
    late header) and closed."""
    gate = listener.gate
    peer_ip = str(peer[0])
    reason = gate.admit(peer_ip, per_ip=False)
    if reason:
        listener.count_rejected(reason)
        conn.close()
        return None
    try:
        source = await read_proxy_header(loop, conn, loop.time() + timeout)
        client = source or (peer_ip, int(peer[1]))
        reason = gate.admit_ip(client[0])
    except (ProtocolError, OSError) as exc:  # (a timeout too)
        log.debug("PROXY header from %s: %r", peer_ip, exc)
        reason = "proxy_header"
    except BaseException:
        gate.release(peer_ip, per_ip=False)
        conn.close()
        raise
    if reason:
        gate.release(peer_ip, per_ip=False)
        listener.count_rejected(reason)
        conn.close()
        return None
    return client


class Acceptor:
    """Accepts a listener's connections itself and hands each to the listener's protocol through
    `loop.connect_accepted_socket`, for the listeners that must act between the accept and the protocol:

    - TLS (`tls`): the connection is admitted through the listener's gate before any handshake work (a
      refused one is closed at once: there is no way to answer before TLS; counted like any refusal), so
      handshakes in progress hold their place in the limits; a handshake that fails or takes longer than
      `timeout` releases it at once and is counted (halb.proxy.tls);
    - `accept_proxy`: the PROXY header is read first (`proxied_client`), and the protocol starts with the
      client address it names.

    `close()` and `wait_closed()` as for an `asyncio.Server`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        name: str,
        listener: Listener,
        timeout: float,
        *,
        tls: TlsTerminator | None = None,
        accept_proxy: bool = False,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._name = name
        self._listener = listener
        self._timeout = timeout
        self._tls = tls
        self._accept_proxy = accept_proxy
        self._starting: set[asyncio.Task[None]] = set()
        self._accepting = True
        self._resume: asyncio.TimerHandle | None = None
        loop.add_reader(sock, self._on_readable)

    def _on_readable(self) -> None:
        accept_ready(self._sock, self._name, self._serve, self._pause)

    def _pause(self) -> None:
        self._loop.remove_reader(self._sock)
        self._resume = self._loop.call_later(ACCEPT_PAUSE, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if self._accepting:
            self._loop.add_reader(self._sock, self._on_readable)

    def _serve(self, conn: socket.socket, address: Any) -> None:
        conn.setblocking(False)
        if self._accept_proxy:
            self._track(self._start_proxied(conn, address))
            return
        listener = self._listener
        ip = str(address[0])
        reason = listener.gate.admit(ip)
        if reason:
            listener.count_rejected(reason)
            conn.close()
            return
        self._track(self._start(conn, (ip, int(address[1])), proxied=False))

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_proxied(self, conn: socket.socket, address: Any) -> None:
        client = await proxied_client(self._loop, conn, address, self._listener, self._timeout)
        if client is not None:
            await self._start(conn, client, proxied=True)

    async def _start(self, conn: socket.socket, client: tuple[str, int], proxied: bool) -> None:
        """Start the protocol on an admitted connection (after the TLS handshake, on TLS listeners)."""
        app = cast(App, self._listener.protocol_factory())
        app.admitted = True
        app.client_ip, app.client_port = client
        app.proxied = proxied
        tls = self._tls
        try:
            await self._loop.connect_accepted_socket(
                lambda: cast(asyncio.Protocol, app),
                conn,
                ssl=tls.context if tls is not None else None,
                ssl_handshake_timeout=self._timeout if tls is not None else None,
            )
        except BaseException as exc:
            # The event loop closed the connection. Unless the proxy protocol took the slot over, free it.
            if not app.connected and app.admitted:
                app.admitted = False
                self._listener.gate.release(app.client_ip)
                if tls is not None and not isinstance(exc, asyncio.CancelledError):
                    tls.handshake_failures_total += 1
                    log.debug("listener %s: %s: TLS handshake failed: %r", self._name, app.client_ip, exc)
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise

    def close(self) -> None:
        """Stop accepting (as `asyncio.Server.close()`: connections being started go on, bounded by their
        timeout, and are served like the others)."""
        if not self._accepting:
            return
        self._accepting = False
        if self._resume is not None:
            self._resume.cancel()
        self._loop.remove_reader(self._sock)
        self._sock.close()

    def tasks(self) -> list[asyncio.Task[None]]:
        """The connections being started (cancelled when the proxy closes every connection)."""
        return list(self._starting)

    async def wait_closed(self) -> None:
        """(Nothing to wait for: `close()` stopped accepting at once.)"""
