"""Keep-alive connections to backends, reused across client requests.

How this works: after a response completes cleanly on a backend connection that may stay open, the HTTP
proxy `release()`s it here; the next request to the same backend `acquire()`s the most recently used one
(LIFO: hot connections stay hot, the cold ones at the bottom expire). A connection is discarded on any
doubt: it closed, saw EOF, received unexpected bytes while idle, sat idle longer than `idle_timeout`, or
the backend's stack is full (`max_idle_per_backend`, the oldest goes). `sweep()` (called periodically by
the server) closes expired ones so sockets do not linger. Backends are keyed by object identity.

A request that is not idempotent only takes a connection idle for at most `max_age_unsafe` seconds: the
longer a connection sat idle, the likelier the backend is closing it right now, and such a request cannot
be retried on a fresh connection. New connections go to the backend's addresses through `resolver`
(halb.proxy.resolve: a host name is not looked up per connection).
"""

from __future__ import annotations

import asyncio
from collections import deque

from halb.backend import Backend
from halb.proxy.channel import Channel
from halb.proxy.resolve import BackendResolver


class UpstreamPool:
    def __init__(
        self,
        *,
        idle_timeout: float = 15.0,
        max_idle_per_backend: int = 64,
        max_age_unsafe: float = 2.0,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle_per_backend = max_idle_per_backend
        self.max_age_unsafe = max_age_unsafe
        self._idle: dict[Backend, deque[tuple[Channel, float]]] = {}
        self.connects_total = 0
        self.reuses_total = 0
        self.resolver: BackendResolver | None = None  # (the proxy server's; made on first use if not)

    async def connect(self, backend: Backend, timeout: float) -> Channel:
        """Open a new connection (`timeout` for each of the backend's addresses); raises OSError or
        TimeoutError."""
        loop = asyncio.get_running_loop()
        if self.resolver is None:
            self.resolver = BackendResolver(loop)
        _, channel = await self.resolver.connect(
            lambda: Channel(loop, keep_open_on_eof=False), backend.host, backend.port, timeout
        )
        self.connects_total += 1
        return channel

    def acquire(self, backend: Backend, now: float, *, idempotent: bool = True) -> Channel | None:
        stack = self._idle.get(backend)
        if not stack:
            return None
        max_age = self.idle_timeout if idempotent else min(self.idle_timeout, self.max_age_unsafe)
        while stack:
            channel, since = stack.pop()
            if not channel.closed and not channel.eof and not channel.buf and now - since < max_age:
                self.reuses_total += 1
                return channel
            if now - since < self.idle_timeout and not channel.closed and not channel.eof and not channel.buf:
                # Too old for this request but fine for an idempotent one: keep it.
                stack.append((channel, since))
                return None
            channel.close()
        return None

    def release(self, backend: Backend, channel: Channel, now: float) -> None:
        if channel.closed or channel.eof or channel.buf:
            channel.close()
            return
        stack = self._idle.get(backend)
        if stack is None:
            stack = self._idle[backend] = deque()
        if len(stack) >= self.max_idle_per_backend:
            old, _ = stack.popleft()
            old.close()
        stack.append((channel, now))

    def sweep(self, now: float) -> None:
        """Close connections idle too long or gone bad; forget empty stacks."""
        for backend in list(self._idle):
            keep: deque[tuple[Channel, float]] = deque()
            for channel, since in self._idle[backend]:
                if (
                    now - since < self.idle_timeout
                    and not channel.closed
                    and not channel.eof
                    and not channel.buf
                ):
                    keep.append((channel, since))
                else:
                    channel.close()
            if keep:
                self._idle[backend] = keep
            else:
                del self._idle[backend]

    def close_all(self) -> None:
        for stack in self._idle.values():
            for channel, _ in stack:
                channel.close()
        self._idle.clear()

    @property
    def idle_count(self) -> int:
        return sum(len(s) for s in self._idle.values())

    def stats(self) -> dict[str, int]:
        return {
            "idle": self.idle_count,
            "connects_total": self.connects_total,
            "reuses_total": self.reuses_total,
        }
