"""An in-memory SessionStore for unit tests only (one process; not shared between balancers).

How this works: sessions are a dict (pool, session id) -> (backend, expires_at) read against an injected
clock, so a test moves time by hand; rate limits use `LocalBuckets`, the same Python arithmetic as the
Redis scripts, on that clock. `fail = True` makes every call raise `StoreUnavailable` and marks the
status degraded (setting it back to False and making a call marks it ok again), so the fallback paths
of the callers can be tested without Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from halb.errors import StoreUnavailable
from halb.state.degradation import StoreStatus
from halb.state.ratelimit import LocalBuckets
from halb.state.store import Decision, SessionStore, check_bucket_args


class MemoryStore(SessionStore):
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._sessions: dict[tuple[str, str], tuple[str, float]] = {}
        self._buckets = LocalBuckets(clock)
        self.status = StoreStatus(backend="memory", since=wall())
        self.fail = False
        self.calls = 0

    def _enter(self) -> float:
        self.calls += 1
        if self.fail:
            self.status.errors_total += 1
            self.status.last_error = "MemoryStore.fail is set"
            self.status.set_state("degraded", self._wall())
            raise StoreUnavailable("memory store set to fail")
        self.status.set_state("ok", self._wall())
        return self._clock()

    async def get_backend(self, pool: str, session_id: str, ttl: float) -> str | None:
        now = self._enter()
        entry = self._sessions.get((pool, session_id))
        if entry is None:
            return None
        backend, expires = entry
        if now >= expires:
            del self._sessions[(pool, session_id)]
            return None
        self._sessions[(pool, session_id)] = (backend, now + ttl)
        return backend

    async def set_backend(self, pool: str, session_id: str, backend: str, ttl: float) -> None:
        now = self._enter()
        self._sessions[(pool, session_id)] = (backend, now + ttl)

    async def delete(self, pool: str, session_id: str) -> None:
        self._enter()
        self._sessions.pop((pool, session_id), None)

    async def rate_limit(
        self, key: str, algorithm: str, rate: float, burst: float, now: float | None = None
    ) -> Decision:
        check_bucket_args(algorithm, rate, burst)
        clock_now = self._enter()
        return self._buckets.take(key, algorithm, rate, burst, clock_now if now is None else now)

    async def ping(self) -> None:
        self._enter()
