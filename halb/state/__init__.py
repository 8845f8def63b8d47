"""Shared cluster state: sticky-session mappings and rate-limit buckets (Redis), with local fallbacks.

How this works: `store.SessionStore` is the interface (async, raises only `StoreUnavailable`);
`redis_store.RedisStore` implements it over a Redis URL or Sentinel with bounded waits and a circuit
breaker, `memory.MemoryStore` for unit tests. `sessions.StickySessions` and `ratelimit.RateLimiter` are what
the proxy calls: they use the store and fall back to the consistent-hash ring / per-node buckets while it is
unavailable, counting those decisions in the store's `degradation.StoreStatus`. `redis_store` is imported
explicitly by whoever builds a Redis store (it pulls in redis-py).
"""

from halb.state.degradation import CircuitBreaker, StoreStatus
from halb.state.ratelimit import LocalBuckets, RateLimiter, Tier, Tiers
from halb.state.sessions import StickyChoice, StickySessions, new_session_id, valid_session_id
from halb.state.store import ALGORITHMS, LEAKY_BUCKET, TOKEN_BUCKET, Decision, SessionStore

__all__ = [
    "ALGORITHMS",
    "LEAKY_BUCKET",
    "TOKEN_BUCKET",
    "CircuitBreaker",
    "Decision",
    "LocalBuckets",
    "RateLimiter",
    "SessionStore",
    "StickyChoice",
    "StickySessions",
    "StoreStatus",
    "Tier",
    "Tiers",
    "new_session_id",
    "valid_session_id",
]
