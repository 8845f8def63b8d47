"""Connection limits and the per-backend `maxconn` queue of one worker process.

How this works:

* `NodeGate` counts the client connections of the whole worker (HAProxy's global `maxconn`).
  `ListenerGate` adds the listener's own `maxconn` and `maxconn_per_ip` (a dict of live connections by
  client address, kept only when that limit is set). A listener calls `admit(ip)` when a connection is
  accepted: it returns "" (admitted, counted) or the name of the limit that refused it ("node_maxconn",
  "listener_maxconn", "maxconn_per_ip"), which the listener counts in its `rejected` stats and answers
  (HTTP: 503 and close; TCP: close). Before any limit, the listener's `allow`/`deny` networks
  (halb.proxy.source_acl) may refuse the address: "denied", closed without an answer.
  `release(ip)` when an admitted connection ends. Checks are plain integer compares, so an unlimited
  listener pays nothing measurable.

* `BackendQueue` (one per pool, shared by the HTTP and TCP listeners of that pool) enforces per-backend
  `maxconn` like HAProxy's server `maxconn` + backend queue: `choose(ctx)` picks with the pool's policy
  among backends that have a free slot (`backend.active_connections < maxconn`); when every available
  backend is full the caller waits in a FIFO queue (at most `maxqueue` waiting, else `QueueFull`) until
  `slot_freed()` hands it the next free slot, or `queue_timeout` passes (`QueueTimeout`). The proxy
  answers both with 503. A slot handed to a waiter is reserved for it (`_handoff`): a request arriving at
  that moment queues behind it instead of stealing the slot, so the queue is served in order. A pool
  without any `maxconn` has no `BackendQueue` at all (`make_backend_queue` returns None).

  A request that must go to one particular backend (a sticky session's) calls `acquire(backend)`
  instead: it proceeds when that backend has a free slot, else it waits in the backend's own queue
  (HAProxy's server queue; same `maxqueue`, counting every waiter, and `queue_timeout`). A freed slot
  goes to the backend's own queue first (`slot_freed(backend)`), then to the pool's queue.

* `free_slot(backend, queue)` and `retry_after_connect_failure(...)`: what the HTTP and TCP proxies do
  when a backend connection ends, and when a connect fails (report it, try another backend while the
  pool's `retries` last).

Limits are per worker process: with `node.workers = N` each worker enforces ceil(limit / N) (the kernel
spreads connections over the workers with SO_REUSEPORT), which is exact for N = 1.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
from collections import deque
from collections.abc import Collection
from typing import Protocol

from halb.backend import Backend
from halb.balancing.base import Context
from halb.config_model import ListenerConfig
from halb.pool import Pool
from halb.proxy.source_acl import SourceAcl, parse_networks

log = logging.getLogger("halb.proxy")

FDS_PER_CONNECTION = 2  # the client socket and the backend socket
FDS_RESERVED = 100  # listening sockets, the control socket, idle pooled backend connections...


def share(limit: int, workers: int) -> int:
    """One worker's share of a node-wide limit (0 stays 0 = unlimited)."""
    return math.ceil(limit / max(workers, 1)) if limit > 0 else 0


def automatic_maxconn() -> int:
    """What the open-file limit allows (like HAProxy's default global maxconn)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(64, (soft - FDS_RESERVED) // FDS_PER_CONNECTION)


class NodeGate:
    """Client connections of the whole worker, all listeners together."""

    __slots__ = ("current", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0 = unlimited
        self.current = 0


class ListenerGate:
    __slots__ = ("acl", "current", "limit", "node", "per_ip", "per_ip_limit")

    def __init__(
        self, node: NodeGate, limit: int = 0, per_ip_limit: int = 0, acl: SourceAcl | None = None
    ) -> None:
        self.node = node
        self.limit = limit
        self.per_ip_limit = per_ip_limit
        self.acl = acl  # the listener's allow/deny networks (halb.proxy.source_acl), None = everyone
        self.current = 0
        self.per_ip: dict[str, int] = {}

    @classmethod
    def for_listener(cls, node: NodeGate, config: ListenerConfig, workers: int = 1) -> ListenerGate:
        """A listener's gate: this worker's share of its `maxconn` and `maxconn_per_ip`, and its `allow` /
        `deny` networks."""
        acl = None
        if config.allow or config.deny:
            acl = SourceAcl(parse_networks(config.allow), parse_networks(config.deny))
        return cls(node, share(config.maxconn, workers), share(config.maxconn_per_ip, workers), acl)

    def admit(self, ip: str, *, per_ip: bool = True) -> str:
        """ "" when the connection may proceed (it is then counted), else the name of the limit hit
        ("denied": the address is not allowed on this listener). `per_ip=False`: the address is the
        front proxy's (`accept_proxy`); the client's is counted by `admit_ip` once its header named it."""
        acl = self.acl
        if acl is not None and not acl.permits(ip):
            return "denied"
        node = self.node
        if node.limit and node.current >= node.limit:
            return "node_maxconn"
        if self.limit and self.current >= self.limit:
            return "listener_maxconn"
        if per_ip and self.admit_ip(ip):
            return "maxconn_per_ip"
        node.current += 1
        self.current += 1
        return ""

    def admit_ip(self, ip: str) -> str:
        """The per-address limit alone: "" (then counted) or "maxconn_per_ip"."""
        if self.per_ip_limit:
            n = self.per_ip.get(ip, 0)
            if n >= self.per_ip_limit:
                return "maxconn_per_ip"
            self.per_ip[ip] = n + 1
        return ""

    def release(self, ip: str, *, per_ip: bool = True) -> None:
        self.node.current -= 1
        self.current -= 1
        if per_ip and self.per_ip_limit:
            n = self.per_ip.get(ip, 0) - 1
            if n > 0:
                self.per_ip[ip] = n
            else:
                self.per_ip.pop(ip, None)


class QueueFull(Exception):
    """Every backend is at maxconn and the queue holds maxqueue waiters already."""


class QueueTimeout(Exception):
    """Waited queue_timeout for a free backend slot."""


class BackendQueue:
    def __init__(self, pool: Pool, workers: int = 1, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.pool = pool
        self.workers = workers
        self.loop = loop or asyncio.get_running_loop()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._backend_waiters: dict[Backend, deque[asyncio.Future[None]]] = {}  # each backend's own queue
        self._handoff = 0  # slots handed to woken waiters that have not taken them yet
        self._config = None  # the PoolConfig the per-backend limits were computed from
        self._limits: dict[str, int] = {}
        self.queued_total = 0  # callers compare it before/after choose() to tell whether they waited

    # --- limits ------------------------------------------------------------------------------------------
    def _refresh(self) -> dict[str, int]:
        config = self.pool.config
        if config is not self._config:  # the pool was reconfigured (cluster): recompute
            self._config = config  # type: ignore[assignment]
            self._limits = {
                b.name: share(b.maxconn if b.maxconn is not None else config.maxconn, self.workers)
                for b in config.backends
            }
        return self._limits

    def full(self) -> list[Backend]:
        """Backends without a free slot."""
        return [b for b in self.pool.backends if not self.has_slot(b)]

    def has_slot(self, backend: Backend) -> bool:
        limit = self._refresh().get(backend.name, 0)
        return not limit or backend.active_connections < limit

    @property
    def waiting(self) -> int:
        return len(self._waiters) + sum(len(q) for q in self._backend_waiters.values())

    # --- choosing ------------------------------------------------------------------------------------------
    def choose_now(self, ctx: Context, exclude: Collection[Backend] = ()) -> Backend | None:
        """A backend with a free slot (not in `exclude`), without queueing; None if there is none."""
        full = self.full()
        if full:
            exclude = [*exclude, *full]
        return self.pool.choose(ctx, exclude)

    async def choose(self, ctx: Context) -> Backend | None:
        """A backend with a free slot, waiting in the queue if all are busy.

        None: no backend is available at all (the caller answers "no backend"). Raises QueueFull or
        QueueTimeout when the backends are only busy.
        """
        if not self._waiters and not self._handoff:
            full = self.full()
            if not full:
                return self.pool.choose(ctx)
            backend = self.pool.choose(ctx, full)
            if backend is not None:
                return backend
        if not any(b.available for b in self.pool.backends):
            return self.pool.choose(ctx)  # None, and counted as "no backend" by the pool
        maxqueue = share(self.pool.config.maxqueue, self.workers)
        if self.waiting >= maxqueue:
            raise QueueFull
        self.queued_total += 1
        deadline = self.loop.time() + self.pool.config.effective_queue_timeout
        first = True
        while True:
            await self._wait_turn(self._waiters, deadline, first, None)
            backend = self.choose_now(ctx)
            if backend is not None:
                if self._waiters and self._free_slots() > 0:
                    self.slot_freed()  # more than one slot is free: wake the next one too
                return backend
            if not any(b.available for b in self.pool.backends):
                return self.pool.choose(ctx)
            first = False

    async def acquire(self, backend: Backend) -> None:
        """A slot on this very backend (a sticky session's): at once when it has a free one and nobody
        waits for it, else after waiting in the backend's own queue. Raises QueueFull or QueueTimeout."""
        if not self._backend_waiters.get(backend) and self.has_slot(backend):
            return
        if self.waiting >= share(self.pool.config.maxqueue, self.workers):
            raise QueueFull
        self.queued_total += 1
        deadline = self.loop.time() + self.pool.config.effective_queue_timeout
        first = True
        while True:
            waiters = self._backend_waiters.setdefault(backend, deque())
            try:
                await self._wait_turn(waiters, deadline, first, backend)
            finally:
                if not waiters and self._backend_waiters.get(backend) is waiters:
                    del self._backend_waiters[backend]
            if self.has_slot(backend):
                return
            first = False

    async def _wait_turn(
        self, waiters: deque[asyncio.Future[None]], deadline: float, first: bool, backend: Backend | None
    ) -> None:
        """Wait in `waiters` until `slot_freed` hands this waiter a slot; QueueTimeout at `deadline`."""
        fut = self.loop.create_future()
        if first:
            waiters.append(fut)
        else:
            waiters.appendleft(fut)  # woken but the slot was taken meanwhile: keep its place
        timer = self.loop.call_at(deadline, _expire, fut)
        woken = False
        try:
            await fut
            woken = True
        except TimeoutError:
            raise QueueTimeout from None
        finally:
            timer.cancel()
            if woken:
                self._handoff -= 1
            else:
                try:
                    waiters.remove(fut)
                except ValueError:  # it was woken (handed a slot) and then cancelled: pass it on
                    self._handoff -= 1
                    self.slot_freed(backend)

    def _free_slots(self) -> int:
        limits = self._refresh()
        pool = self.pool
        # (the backups' slots count only while they are the ones in use: halb.pool)
        usable = pool.primaries if any(b.available for b in pool.primaries) else pool.backups
        free = 0
        for b in usable:
            if not b.available:
                continue
            limit = limits.get(b.name, 0)
            if not limit:
                return 1 << 30
            free += max(0, limit - b.active_connections)
        return free

    def slot_freed(self, backend: Backend | None = None) -> None:
        """A request/connection to `backend` ended: hand the slot to the first waiter of that backend's own
        queue, else to the first waiter of the pool's queue, if any."""
        own = self._backend_waiters.get(backend) if backend is not None else None
        if not (own and self._wake_first(own)):
            self._wake_first(self._waiters)

    def _wake_first(self, waiters: deque[asyncio.Future[None]]) -> bool:
        """Hand the slot to the first waiter still waiting in `waiters`; False when there is none."""
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                self._handoff += 1
                fut.set_result(None)
                return True
        return False


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def make_backend_queue(
    pool: Pool, workers: int, loop: asyncio.AbstractEventLoop | None = None
) -> BackendQueue | None:
    """A BackendQueue when the pool (or one of its backends) has a maxconn, else None."""
    config = pool.config
    if config.maxconn or any(b.maxconn for b in config.backends):
        return BackendQueue(pool, workers, loop)
    return None


class ConnectStats(Protocol):
    """The counters of a listener that connects to backends (HTTP and TCP listener stats)."""

    connect_failures_total: int
    retries_total: int


def free_slot(backend: Backend, queue: BackendQueue | None) -> None:
    """A connection to `backend` ended or never opened: count it closed and pass its maxconn slot on."""
    backend.on_connection_closed()
    if queue is not None:
        queue.slot_freed(backend)


def retry_after_connect_failure(
    pool: Pool,
    queue: BackendQueue | None,
    stats: ConnectStats,
    ctx: Context,
    failed: Backend,
    tried: list[Backend],
    exc: BaseException,
    *,
    retry: bool = True,
) -> Backend | None:
    """A connect to `failed` failed: free its slot, report it to the pool (passive health), and choose
    another backend while `retries` are left, unless `retry` is False (the client left). The caller counts
    the new backend's connection as opened."""
    free_slot(failed, queue)
    log.debug("connect to %s (%s) failed: %r", failed.name, failed.address, exc)
    pool.report_connect_failure(failed)
    stats.connect_failures_total += 1
    tried.append(failed)
    if not retry or len(tried) > pool.config.retries:
        return None
    nxt = pool.choose(ctx, tried) if queue is None else queue.choose_now(ctx, tried)
    if nxt is not None:
        stats.retries_total += 1
    return nxt
