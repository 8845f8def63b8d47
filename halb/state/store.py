"""The session-store interface the proxy talks to, and the value types it returns.

How this works: a `SessionStore` holds two kinds of cluster-wide state for every balancer of the cluster:

- sticky-session mappings: (pool, session id) -> backend name, with a TTL that slides on every hit
  (`get_backend` re-arms it to the `ttl` it is given, so a TTL change in the config applies at the next hit);
- rate-limit buckets: `rate_limit(key, algorithm, rate, burst, now)` takes one token from the bucket named
  `key` and returns a `Decision`. `algorithm` is "token_bucket" or "leaky_bucket" (see
  `halb.state.ratelimit` for their exact semantics). `now=None` means "the store's own clock" (Redis: the
  server's `TIME`, one clock for every balancer); a float is used as is (tests, fake clocks).

Every method is async and either succeeds or raises `StoreUnavailable` (never a backend-specific error);
implementations bound how long a call may wait. `status` is the store's `StoreStatus` (ok/degraded,
counters) and `degraded` its shortcut. Callers never block on a degraded store: they catch
`StoreUnavailable` and decide locally (`halb.state.sessions`, `halb.state.ratelimit.RateLimiter`).

Implementations: `halb.state.redis_store.RedisStore` (plain URL or Sentinel) and
`halb.state.memory.MemoryStore` (unit tests only).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from halb.state.degradation import StoreStatus

TOKEN_BUCKET = "token_bucket"
LEAKY_BUCKET = "leaky_bucket"
ALGORITHMS = (TOKEN_BUCKET, LEAKY_BUCKET)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of a rate limiter for one request."""

    allowed: bool
    retry_after: float  # seconds until one request would be admitted; 0.0 when allowed
    remaining: int  # requests that would still be admitted right now, after this one
    delay: float = 0.0  # leaky bucket: the admitted request's wait for its turn (0 for token bucket)
    local: bool = False  # decided by this node's fallback buckets (store unavailable)

    @property
    def retry_after_header(self) -> str:
        """`Retry-After` value: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(self.retry_after)))


def check_bucket_args(algorithm: str, rate: float, burst: float) -> None:
    """Caller bugs, not store failures: raise ValueError before touching any store."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown rate-limit algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive number, got {rate!r}")
    if not (math.isfinite(burst) and burst >= 1):
        raise ValueError(f"burst must be >= 1, got {burst!r}")


class SessionStore(ABC):
    """Cluster-wide state for sticky sessions and rate limits. Every method raises only StoreUnavailable."""

    status: StoreStatus

    @property
    def degraded(self) -> bool:
        return self.status.degraded

    @abstractmethod
    async def get_backend(self, pool: str, session_id: str, ttl: float) -> str | None:
        """The backend name mapped to this session, re-arming its TTL to `ttl` seconds; None if unmapped."""

    @abstractmethod
    async def set_backend(self, pool: str, session_id: str, backend: str, ttl: float) -> None:
        """Map the session to `backend` for `ttl` seconds (overwrites)."""

    @abstractmethod
    async def delete(self, pool: str, session_id: str) -> None:
        """Forget the session's mapping (no error if there was none)."""

    @abstractmethod
    async def rate_limit(
        self, key: str, algorithm: str, rate: float, burst: float, now: float | None = None
    ) -> Decision:
        """Take one token from bucket `key` (`rate` per second, capacity `burst`); atomic cluster-wide."""

    @abstractmethod
    async def ping(self) -> None:
        """Round-trip to the store (health checks)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections and background tasks."""
