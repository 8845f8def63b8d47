"""Rate limiting: token bucket and leaky bucket, as atomic Redis Lua scripts and as the same pure Python.

How this works
--------------
A bucket is named by a string the caller builds (a client IP, a path prefix, an API-key header value...),
prefixed with the rule's name so two rules never share a bucket. Each request takes one token.

token_bucket (rate r per second, capacity `burst` b)
    state: tokens, ts. A missing bucket is full (tokens = b). On a request at `now`:
    tokens = min(b, tokens + max(0, now - ts) * r); if tokens >= 1 the request is admitted and tokens -= 1,
    else it is refused with retry_after = (1 - tokens) / r. remaining = floor(tokens). ts = max(ts, now).
    So b requests may arrive back to back, then r per second.

leaky_bucket (a queue of capacity b draining at r per second; GCRA form)
    state: tat, the time the queue will be empty. tat = max(tat, now); delay = tat - now is how long this
    request would wait for its turn, i.e. delay * r requests are ahead of it. Admitted when
    delay * r + 1 <= b (+1e-9): tat += 1 / r and the decision carries `delay`, so a proxy that honours it
    forwards requests evenly spaced at 1/r (shaping, like nginx `limit_req` without `nodelay`); a proxy
    that ignores `delay` polices exactly like a token bucket. Refused: retry_after = delay - (b - 1) / r.

Both scripts end by setting the key's expiry to the time after which its state equals "no state" (a full
bucket, an empty queue), so expiry never changes a decision and idle keys cost no memory.

Clock assumptions: with `now=None` (the default, what the proxy uses) the scripts read the Redis server's
`TIME`, so every balancer of the cluster measures one budget with one clock and balancer clock skew does
not matter. Redis >= 5 replicates script effects, not the script, so reading TIME before writing is allowed
(`redis.replicate_commands()` is called when it exists, for Redis 5 and 6). After a Sentinel failover the
new master's clock may differ from the old one: a backwards step is clamped (elapsed >= 0; no refill until
it catches up), a forwards step refills early, at most up to `burst`. A float `now` is used as given (tests
pass a fake clock); never mix the two on one key. The Python `LocalBuckets` (the per-node fallback while
Redis is unreachable) use the local monotonic clock and their own state: the same arithmetic, operation for
operation, in IEEE doubles on both sides (numbers cross as "%.17g" strings, which round-trip exactly), so
on the same clock they give identical decisions; the tests check this.

Scripts run with EVALSHA; the SHA1 is computed locally, and a NOSCRIPT answer (a restarted Redis, a newly
promoted replica) is followed by one EVAL, which also caches the script again.

`Tiers` maps keys to a `Tier` (rate + burst) with a default tier; `RateLimiter` ties a rule name, an
algorithm, tiers, a store and the per-node fallback together: `await limiter.check(key)`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from halb.errors import StoreUnavailable
from halb.state.store import LEAKY_BUCKET, TOKEN_BUCKET, Decision, SessionStore, check_bucket_args

EPSILON = 1e-9  # leaky bucket: tolerance of the "fits in the queue" test (float noise of k * (1/r) * r)
MAX_KEY_BYTES = 200  # longer caller keys (header values) are replaced by their hash

_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now
if ARGV[3] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[3])
end
local function f(x) return string.format('%.17g', x) end
"""

TOKEN_BUCKET_LUA = (
    _PRELUDE
    + """
local tokens = burst
local ts = now
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
if state[1] then
  tokens = tonumber(state[1])
  ts = tonumber(state[2])
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate)
local allowed = 0
local retry_after = 0
if tokens >= 1 then
  allowed = 1
  tokens = tokens - 1
else
  retry_after = (1 - tokens) / rate
end
if now > ts then ts = now end
redis.call('HSET', KEYS[1], 'tokens', f(tokens), 'ts', f(ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, f(retry_after), math.floor(tokens), '0'}
"""
)

LEAKY_BUCKET_LUA = (
    _PRELUDE
    + """
local interval = 1 / rate
local tat = now
local stored = redis.call('HGET', KEYS[1], 'tat')
if stored then tat = tonumber(stored) end
if tat < now then tat = now end
local delay = tat - now
local allowed = 0
local retry_after = 0
local remaining = 0
if delay * rate + 1 <= burst + 1e-9 then
  allowed = 1
  tat = tat + interval
  remaining = math.floor(burst - (tat - now) * rate + 1e-9)
  redis.call('HSET', KEYS[1], 'tat', f(tat))
  redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now) * 1000) + 1000)
else
  retry_after = delay - (burst - 1) * interval
  if retry_after < 0 then retry_after = 0 end
  delay = 0
end
return {allowed, f(retry_after), remaining, f(delay)}
"""
)

SCRIPTS: dict[str, str] = {TOKEN_BUCKET: TOKEN_BUCKET_LUA, LEAKY_BUCKET: LEAKY_BUCKET_LUA}
SCRIPT_SHAS: dict[str, str] = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}


def decision_from_reply(reply: list[object]) -> Decision:
    """Decode a script's reply: [allowed (int), retry_after (str), remaining (int), delay (str)]."""
    allowed, retry_after, remaining, delay = reply
    return Decision(
        allowed=int(allowed) == 1,  # type: ignore[call-overload]
        retry_after=float(retry_after),  # type: ignore[arg-type]
        remaining=int(remaining),  # type: ignore[call-overload]
        delay=float(delay),  # type: ignore[arg-type]
    )


# --- the same algorithms in Python ---------------------------------------------------------------------
# State tuples: token bucket (tokens, ts); leaky bucket (tat,). None = no state (full bucket / empty queue).


def token_bucket_step(
    state: tuple[float, ...] | None, now: float, rate: float, burst: float
) -> tuple[tuple[float, ...], Decision, float]:
    """One request against a token bucket -> (new state, decision, seconds until the state may expire)."""
    if state is None:
        tokens, ts = burst, now
    else:
        tokens, ts = state
    elapsed = now - ts
    if elapsed < 0:
        elapsed = 0.0
    tokens = min(burst, tokens + elapsed * rate)
    if tokens >= 1:
        allowed, retry_after = True, 0.0
        tokens = tokens - 1
    else:
        allowed, retry_after = False, (1 - tokens) / rate
    if now > ts:
        ts = now
    ttl = math.ceil(burst / rate * 1000) / 1000 + 1
    return (tokens, ts), Decision(allowed, retry_after, math.floor(tokens)), ttl


def leaky_bucket_step(
    state: tuple[float, ...] | None, now: float, rate: float, burst: float
) -> tuple[tuple[float, ...] | None, Decision, float]:
    """One request against a leaky bucket -> (new state or None = unchanged, decision, expiry seconds)."""
    interval = 1 / rate
    tat = now if state is None else state[0]
    if tat < now:
        tat = now
    delay = tat - now
    if delay * rate + 1 <= burst + EPSILON:
        tat = tat + interval
        remaining = math.floor(burst - (tat - now) * rate + EPSILON)
        ttl = math.ceil((tat - now) * 1000) / 1000 + 1
        return (tat,), Decision(True, 0.0, remaining, delay), ttl
    retry_after = delay - (burst - 1) * interval
    if retry_after < 0:
        retry_after = 0.0
    return None, Decision(False, retry_after, 0), 0.0


_STEPS = {TOKEN_BUCKET: token_bucket_step, LEAKY_BUCKET: leaky_bucket_step}


class LocalBuckets:
    """Per-process buckets with the scripts' exact semantics: the fallback while the store is down.

    Entries expire like the Redis keys do (only when their state equals "no state"); when more than
    `max_keys` are held, expired ones are swept and, if still too many, the oldest are dropped (a dropped
    bucket restarts full: under memory pressure a client may get one extra burst).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self._clock = clock
        self.max_keys = max_keys
        self._buckets: dict[tuple[str, str], tuple[tuple[float, ...], float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, algorithm: str, rate: float, burst: float, now: float | None = None) -> Decision:
        check_bucket_args(algorithm, rate, burst)
        if now is None:
            now = self._clock()
        slot = (algorithm, key)
        entry = self._buckets.get(slot)
        state = None
        if entry is not None:
            state, expires = entry
            if now >= expires:
                state = None
        new_state, decision, ttl = _STEPS[algorithm](state, now, rate, burst)
        if new_state is not None:
            self._buckets.pop(slot, None)  # re-insert at the end: dict order = least recently written first
            self._buckets[slot] = (new_state, now + ttl)
            if len(self._buckets) > self.max_keys:
                self._evict(now)
        return decision

    def _evict(self, now: float) -> None:
        for slot in [s for s, (_, expires) in self._buckets.items() if now >= expires]:
            del self._buckets[slot]
        excess = len(self._buckets) - self.max_keys
        if excess > 0:
            for slot in list(self._buckets)[:excess]:
                del self._buckets[slot]


# --- tiers and the limiter the proxy calls -------------------------------------------------------------


@dataclass(frozen=True)
class Tier:
    rate: float  # requests per second
    burst: float  # bucket capacity (token bucket) / queue length (leaky bucket), >= 1
    name: str = "default"


@dataclass(frozen=True)
class Tiers:
    """key -> tier, with a default for every other key (e.g. API keys of paying customers get more)."""

    default: Tier
    by_key: Mapping[str, Tier] = field(default_factory=dict)

    def for_key(self, key: str) -> Tier:
        return self.by_key.get(key, self.default)


def bucket_key(rule: str, key: str) -> str:
    """The store key of (rule, caller key); caller keys longer than MAX_KEY_BYTES are hashed."""
    raw = key.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_KEY_BYTES:
        key = "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()
    return f"rl:{rule}:{key}"


class RateLimiter:
    """One rate-limit rule: cluster-wide through the store, per-node while the store is unavailable.

    `local_share` scales the fallback buckets' rate and burst (e.g. 1/number of balancers, so the cluster
    stays near one budget while degraded; the default 1.0 gives every node the full budget).
    """

    def __init__(
        self,
        name: str,
        algorithm: str,
        tiers: Tiers,
        store: SessionStore | None,
        *,
        local: LocalBuckets | None = None,
        local_share: float = 1.0,
    ) -> None:
        for tier in (tiers.default, *tiers.by_key.values()):
            check_bucket_args(algorithm, tier.rate, tier.burst)
            check_bucket_args(algorithm, tier.rate * local_share, max(1.0, tier.burst * local_share))
        self.name = name
        self.algorithm = algorithm
        self.tiers = tiers
        self.store = store
        self.local = local if local is not None else LocalBuckets()
        self.local_share = local_share

    async def check(self, key: str) -> Decision:
        tier = self.tiers.for_key(key)
        bkey = bucket_key(self.name, key)
        if self.store is not None:
            try:
                return await self.store.rate_limit(bkey, self.algorithm, tier.rate, tier.burst)
            except StoreUnavailable:
                self.store.status.fallback_decisions_total += 1
        decision = self.local.take(
            bkey, self.algorithm, tier.rate * self.local_share, max(1.0, tier.burst * self.local_share)
        )
        return Decision(decision.allowed, decision.retry_after, decision.remaining, decision.delay, True)
