"""The TCP proxy of plain (non-TLS) listeners: raw non-blocking sockets on one epoll set per listener.

How this works: `RawTcpServer` owns the listening socket and an `epoll` set, and registers the epoll fd
with the event loop as one reader (`loop.add_reader`): when anything in the set is ready, `_on_ready` takes
up to `BATCH` events and handles each with plain socket calls. Measured on this machine, asyncio/uvloop
transports cost about twice HAProxy's CPU time per short connection (per connection uvloop makes ~26
system calls and builds transport, protocol and task objects); on raw sockets a connection takes 20
system calls, as many as HAProxy, and a bare prototype of this relay matched HAProxy's rate
(docs/performance.md). TLS listeners keep the transport path (`tcp_proxy.TcpSession`), which has the TLS.

A connection (`RawSession`): accept (the address comes with it, no extra call; `halb.proxy.accept`); with
`accept_proxy`, a short task reads the PROXY header first (`proxied_client`); the listener's limits
(`gate.admit`); a backend from the pool (or from its maxconn queue, which may wait: then
a short task waits); a non-blocking `connect` to it, its completion seen as EPOLLOUT. A connect that fails
or does not complete within `connect_timeout` (one lazily re-armed timer per server over the deadlines in
connect order) is reported to the pool and retried on another backend, at most `retries` more. Then each
side is read when readable and what is read is sent to the other side at once. Backpressure: when the
other side cannot take all of it, the rest (at most one read, `READ_SIZE`) waits in user space, reading
from this side stops, and EPOLLOUT on the other side resumes it once sent, so memory stays bounded
whatever the speed difference. Half-close is relayed (EOF from one side becomes `shutdown(SHUT_WR)` on the
other once its pending bytes are sent; when EPOLLRDHUP says a read holds a side's last bytes, they are sent
with MSG_MORE and the FIN follows at once, so both leave in one segment, as HAProxy does) and the session
ends when both directions are shut, on an error, or when it sat idle for `client_timeout`
(`TcpListener.tick`). Sockets are closed at the end of an event
batch, so an fd number cannot be reused by a new connection while stale events for it are still being
handled. An unexpected error in one session is logged and ends that session only.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket

from halb.backend import Backend
from halb.balancing.base import Context
from halb.proxy.accept import ACCEPT_PAUSE, accept_ready, proxied_client
from halb.proxy.proxy_protocol import proxy_header
from halb.proxy.resolve import Address
from halb.proxy.tcp_proxy import SessionCore, TcpListener

log = logging.getLogger("halb.proxy.tcp")

READ_SIZE = 65536  # one recv; also the most a session holds in user space per direction
BATCH = 256  # events taken per wake-up
TIMER_SLACK = 0.05  # connect timeouts fire at most this late (the timer is re-armed at most this often)

# A side is read on EPOLLIN; EPOLLRDHUP with it says the peer has sent its FIN, so a short read is the last
# one (see RawSide.readable).
_RDHUP = select.EPOLLRDHUP
_IN = select.EPOLLIN | _RDHUP
_OUT = select.EPOLLOUT
_FAILED = select.EPOLLERR | select.EPOLLHUP
# Accepted sockets stay in blocking mode (making them non-blocking costs a system call per connection):
# every recv and send on either side says MSG_DONTWAIT instead.
_DONTWAIT = socket.MSG_DONTWAIT
_LAST = socket.MSG_DONTWAIT | socket.MSG_MORE
_CONNECT_ERRORS_NOW = (errno.EINPROGRESS, 0)


class RawTcpServer:
    """Accepts a plain TCP listener's connections and relays them (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, handler: TcpListener) -> None:
        self.loop = loop
        self.sock = sock
        self.handler = handler
        self.epoll = select.epoll()
        self.fds: dict[int, RawSide] = {}  # registered fd -> the side of a session it is
        self.to_close: list[socket.socket] = []  # closed at the end of the event batch
        self.in_batch = False
        self.accepting = True
        self._listen_fd = sock.fileno()
        # Sessions connecting to a backend -> their deadline. Every connect of a listener has the same
        # timeout, so insertion order is deadline order; a session leaves as soon as its connect ends (holding
        # it longer would keep thousands of ended sessions alive for the garbage collector to walk).
        self.connecting: dict[RawSession, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._resume_accept: asyncio.TimerHandle | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self.epoll.register(self._listen_fd, select.EPOLLIN)
        loop.add_reader(self.epoll.fileno(), self._on_ready)

    # --- the server interface ProxyServer uses ---------------------------------------------------------
    def close(self) -> None:
        """Stop accepting (sessions in progress go on)."""
        if not self.accepting:
            return
        self.accepting = False
        if self._resume_accept is not None:
            self._resume_accept.cancel()
        self.sock.close()  # (leaves the epoll set with it)

    async def wait_closed(self) -> None:
        """After `close()` and the sessions' end: release the epoll set."""
        self.close()
        for side in list(self.fds.values()):
            side.session.finish(abort=True, end="shutdown")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()

    # --- events ----------------------------------------------------------------------------------------
    def _on_ready(self) -> None:
        try:
            events = self.epoll.poll(0, BATCH)
        except OSError:  # closed under us
            return
        fds = self.fds
        listen_fd = self._listen_fd
        self.in_batch = True
        try:
            self._handle(events, fds, listen_fd)
        finally:
            self.in_batch = False
            if self.to_close:
                self._close_pending()

    def _handle(self, events: list[tuple[int, int]], fds: dict[int, RawSide], listen_fd: int) -> None:
        for fd, mask in events:
            if fd == listen_fd:
                if self.accepting:
                    self._accept()
                continue
            side = fds.get(fd)
            if side is None:
                continue  # its session ended earlier in this batch
            try:
                if mask & _OUT:
                    side.writable(mask)
                if mask & ~_OUT and fds.get(fd) is side:
                    if side.mask & _IN:
                        side.readable(mask)
                    elif not mask & _OUT:
                        # An error or hang-up on a side not read now (its peer has bytes pending):
                        # reading it would pass bytes ahead of those, so the session ends here.
                        side.failed(OSError(errno.ECONNRESET, "connection reset"))
            except Exception:
                log.exception("TCP relay: unexpected error in a session of %s", self.handler.config.name)
                side.session.finish(abort=True, end="proxy_error")

    def discard(self, sock: socket.socket) -> None:
        """Close a session's socket: at the end of the event batch when inside one, else now."""
        if self.in_batch:
            self.to_close.append(sock)
        else:
            sock.close()

    def _close_pending(self) -> None:
        to_close, self.to_close = self.to_close, []
        for sock in to_close:
            sock.close()

    def _accept(self) -> None:
        if self.handler.draining:
            self.close()
            return
        accept_ready(self.sock, self.handler.config.name, self._serve, self._pause_accepting)

    def _serve(self, client: socket.socket, address: tuple[str, int]) -> None:
        if self.handler.config.accept_proxy:  # the PROXY header first (a short task reads it)
            task = self.loop.create_task(self._serve_proxied(client, address))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)
            return
        RawSession(self, client, address).start()

    async def _serve_proxied(self, client: socket.socket, address: tuple[str, int]) -> None:
        handler = self.handler
        named = await proxied_client(self.loop, client, address, handler, handler.config.header_timeout)
        if named is not None:
            session = RawSession(self, client, named)
            session.proxied = True  # (and admitted by proxied_client)
            session.start()

    def tasks(self) -> list[asyncio.Task[None]]:
        """The connections whose PROXY header is being read (cancelled when the proxy closes)."""
        return list(self._starting)

    def _pause_accepting(self) -> None:
        self.epoll.modify(self._listen_fd, 0)

        def resume() -> None:
            self._resume_accept = None
            if self.accepting:
                self.epoll.modify(self._listen_fd, select.EPOLLIN)

        self._resume_accept = self.loop.call_later(ACCEPT_PAUSE, resume)

    # --- connect timeouts --------------------------------------------------------------------------------
    def connect_deadline(self, deadline: float, session: RawSession) -> None:
        self.connecting[session] = deadline
        if self._timer is None:
            self._timer = self.loop.call_at(deadline + TIMER_SLACK, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        connecting = self.connecting
        while connecting:
            session, deadline = next(iter(connecting.items()))
            if deadline > now:
                self._timer = self.loop.call_at(deadline + TIMER_SLACK, self._on_timer)
                return
            del connecting[session]
            try:
                session.connect_failed(TimeoutError("connect timed out"))
            except Exception:
                log.exception("TCP relay: a connect timeout failed")
                session.finish(abort=True, end="proxy_error")


class RawSide:
    """One socket of a session: reads from it go to the peer side; `pending` is what it still has to send."""

    __slots__ = ("eof", "fd", "mask", "peer", "pending", "session", "shut", "sock", "upstream")

    def __init__(self, session: RawSession, sock: socket.socket, upstream: bool) -> None:
        self.session = session
        self.sock = sock
        self.fd = sock.fileno()
        self.upstream = upstream
        self.peer: RawSide | None = None
        self.pending = b""  # bytes read from the peer, not yet sent on this socket
        self.eof = False  # this side sent its FIN (nothing more will be read from it)
        self.shut = False  # we sent our FIN on this socket
        self.mask = 0  # the events it is registered for (0: not in the epoll set)

    def set_mask(self, mask: int) -> None:
        """Wait for these events. With none the socket leaves the epoll set, which would otherwise go on
        reporting a hang-up (a half-closed socket that is not read while its peer catches up)."""
        old = self.mask
        if mask == old:
            return
        self.mask = mask
        epoll = self.session.server.epoll
        if not old:
            epoll.register(self.fd, mask)
        elif mask:
            epoll.modify(self.fd, mask)
        else:
            epoll.unregister(self.fd)

    def failed(self, exc: OSError) -> None:
        """A call on this socket failed (a reset, mostly): end the session, naming this side."""
        log.debug("TCP relay: %s side: %r", "backend" if self.upstream else "client", exc)
        self.session.finish(abort=True, end="backend_reset" if self.upstream else "client_reset")

    def readable(self, mask: int) -> None:
        session = self.session
        try:
            data = self.sock.recv(READ_SIZE, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.failed(exc)
            return
        peer = self.peer
        assert peer is not None
        if not data:
            self.ended()
            return
        size = len(data)
        if self.upstream:
            session.bytes_down += size
        else:
            session.bytes_up += size
        # The peer sent its FIN and this read took all it had sent: these are its last bytes. They go out
        # with MSG_MORE and the FIN follows at once, so the kernel sends both in one segment (as HAProxy
        # does), and no read is spent on learning of the EOF.
        last = mask & _RDHUP and size < READ_SIZE
        try:
            sent = peer.sock.send(data, _LAST if last else _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            peer.failed(exc)
            return
        if sent < size:
            # The peer's socket buffer is full: hold the rest, stop reading here until it is sent.
            peer.pending = data[sent:]
            self.set_mask(self.mask & ~_IN)
            peer.set_mask(peer.mask | _OUT)
            return
        if last:
            self.ended()

    def ended(self) -> None:
        """This side sent its FIN: pass it on once the bytes for the peer are sent; end the session when
        the other direction is done too."""
        self.eof = True
        peer = self.peer
        assert peer is not None
        if self.shut and not peer.pending:
            self.session.finish()  # both ways are done now (closing the sockets says the rest)
            return
        self.set_mask(self.mask & ~_IN)
        if not peer.pending:
            peer.shut_write()

    def writable(self, mask: int) -> None:
        session = self.session
        if self.upstream and session.connecting:
            session.connected_upstream(failed=bool(mask & _FAILED))
            return
        pending = self.pending
        if not pending:
            self.set_mask(self.mask & ~_OUT)
            return
        try:
            sent = self.sock.send(pending, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.failed(exc)
            return
        self.pending = pending = pending[sent:]
        if pending:
            return
        self.set_mask(self.mask & ~_OUT)
        peer = self.peer
        assert peer is not None
        if peer.eof:
            self.shut_write()
        else:
            peer.set_mask(peer.mask | _IN)  # sent it all: read from the peer again

    def shut_write(self) -> None:
        """Relay the peer's EOF: send our FIN on this socket; end the session once both ways are shut."""
        session = self.session
        peer = self.peer
        if peer is not None and peer.shut:  # the other direction ended before: close both sockets
            session.finish()
            return
        if not self.shut:
            self.shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self.failed(exc)


class RawSession(SessionCore):
    """One relayed connection on raw sockets (the client side, and the backend side once connecting)."""

    def __init__(self, server: RawTcpServer, client: socket.socket, address: tuple[str, int]) -> None:
        super().__init__(server.handler)
        self.server = server
        self.client = RawSide(self, client, upstream=False)
        self.upstream: RawSide | None = None
        self.more_addresses: list[Address] = []  # the backend's addresses not tried yet
        self.client_ip = str(address[0])
        self.client_port = int(address[1])

    @property
    def connecting(self) -> bool:
        """A connect to the backend is in progress (it has a deadline)."""
        return self in self.server.connecting

    def start(self) -> None:
        """Admit the client (unless `proxied_client` did, for a proxied one), then connect to a backend."""
        listener = self.listener
        if not self.proxied:
            reason = listener.gate.admit(self.client_ip)
            if reason:
                listener.count_rejected(reason)
                self.closed = True
                self.client.sock.close()
                return
        self.admitted = True
        self.connected = True
        self.client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.sessions.add(self)
        listener.stats.connections_active += 1
        listener.stats.connections_total += 1
        self.accepted = self.started = self.idle_since = self.loop.time()
        queue = listener.queue
        if queue is None:
            backend = listener.pool.choose(Context(self.client_ip, "", self.accepted))
            self._connect_to(backend)
        else:  # the maxconn queue may wait: a task waits (the client is not read meanwhile)
            self.connect_task = self.loop.create_task(self._connect_queued())

    async def _connect_queued(self) -> None:
        queue = self.listener.queue
        assert queue is not None
        backend = await self._choose_queued(queue, Context(self.client_ip, "", self.loop.time()))
        if not self.closed:
            self._connect_to(backend)

    def _connect_to(self, backend: Backend | None) -> None:
        if backend is None:
            self.no_backend()
            return
        backend.on_connection_opened()
        self.backend = backend
        addresses = self.listener.resolver.cached(backend.host, backend.port)
        if addresses is None:  # a host name due for a lookup (halb.proxy.resolve)
            self.connect_task = self.loop.create_task(self._connect_named(backend))
            return
        self._open_first(addresses)

    async def _connect_named(self, backend: Backend) -> None:
        """A backend given by host name: its addresses (looked up without blocking the loop), then connect."""
        timeout = self.listener.pool.config.connect_timeout  # (a first lookup counts against it)
        try:
            addresses = await self.listener.resolver.addresses(backend.host, backend.port, timeout)
        except OSError as exc:  # (a timeout too)
            self.connect_failed(exc)
            return
        if not self.closed:
            self._open_first(addresses)

    def _open_first(self, addresses: list[Address]) -> None:
        """Connect to the first address; the others are tried in turn if it fails (each within
        `connect_timeout`) before the backend counts as failed."""
        self.more_addresses = addresses[1:]
        self._open(*addresses[0])

    def _open(self, family: int, sockaddr: tuple[str, int]) -> None:
        """Start a non-blocking connect to the chosen backend; EPOLLOUT tells when it is done."""
        server = self.server
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        side = RawSide(self, sock, upstream=True)
        side.peer, self.client.peer = self.client, side
        self.upstream = side
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(sockaddr)
        except OSError as exc:
            err = exc.errno or errno.ECONNREFUSED
        if err not in _CONNECT_ERRORS_NOW:
            self.connect_failed(OSError(err, "connect failed"))
            return
        server.fds[side.fd] = side
        side.set_mask(_OUT)
        server.connect_deadline(self.loop.time() + self.listener.pool.config.connect_timeout, self)

    def connect_failed(self, exc: BaseException) -> None:
        """The connect to `self.backend` failed or timed out: try its next address, else another
        backend, or give up."""
        self.server.connecting.pop(self, None)
        self._drop_upstream()
        if self.more_addresses and not self.closed:
            self._open(*self.more_addresses.pop(0))
            return
        failed = self.backend
        assert failed is not None
        self.backend = None
        nxt = self.next_backend(failed, exc)
        if nxt is None:
            self.finish(end="connect_failed")
            return
        self._connect_to(nxt)

    def _drop_upstream(self) -> None:
        side = self.upstream
        if side is None:
            return
        self.upstream = None
        self.client.peer = None
        self.server.fds.pop(side.fd, None)
        self.server.discard(side.sock)

    def connected_upstream(self, failed: bool) -> None:
        """EPOLLOUT on the connecting socket: the connect completed, or failed (EPOLLERR / EPOLLHUP with
        it; only then is the error asked for, as HAProxy does)."""
        side = self.upstream
        assert side is not None
        if failed:
            err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNREFUSED
            self.connect_failed(OSError(err, os.strerror(err)))
            return
        self.server.connecting.pop(self, None)
        self.started = self.loop.time()
        client = self.client
        self.server.fds[client.fd] = client
        version = self.listener.pool.config.send_proxy
        if version:  # the PROXY protocol header goes first: the client is read once it is sent (writable)
            local = client.sock.getsockname()
            side.pending = proxy_header(version, (self.client_ip, self.client_port), local[:2])
            side.set_mask(_IN | _OUT)
        else:
            side.set_mask(_IN)
            client.set_mask(_IN)

    # --- SessionCore ---------------------------------------------------------------------------------------
    def _close_connections(self, abort: bool) -> None:
        # (Both ways: a graceful end has nothing left in user space, and close() lets the kernel send
        # what is still in the socket buffers; an abort drops it.)
        server = self.server
        server.connecting.pop(self, None)
        for side in (self.client, self.upstream):
            if side is not None:
                server.fds.pop(side.fd, None)
                server.discard(side.sock)
                side.peer = None  # (no cycle left for the garbage collector)

    def buffered(self) -> int:
        upstream = self.upstream
        return len(self.client.pending) + (len(upstream.pending) if upstream is not None else 0)
