"""Rate limits and sticky sessions in the HTTP proxy: the worker's state runtime and the per-request hook.

How this works
--------------
`StateRuntime` exists once per worker process. It owns the worker's one `SessionStore` (a `RedisStore`
built from `[state]`; none without it), one `RateLimiter` per `[ratelimits.NAME]` rule and one
`PoolSticky` per pool with `sticky = {...}`. `start()` runs a housekeeping task that pings the store every
`state.ping_interval` (so a degraded store recovers without traffic: the ping drives the circuit
breaker's probe) and refreshes the sticky rings from the pools; `aclose()` (after the worker drained)
stops it and closes the store. `stats()` goes into the worker's stats message; the control process
aggregates it (`halb.state_report`).

`ProxyServer` asks the runtime for a `ListenerHook` per HTTP listener (`for_listener`; None when the
listener has no rule and its pool no stickiness, so such listeners pay nothing). `HttpConnection._exchange`
calls `await hook.before_choose(conn, req, ctx)` before a backend is chosen:

1. rate limits, in the listener's order: each rule that applies to the path builds its key (client IP,
   header value -- requests without the header count by client IP -- or the matched path prefix) and takes
   a token (`RateLimiter.check`: Redis Lua script, cluster-wide; per-node buckets while Redis is
   unavailable). A refusal is returned as a `Refusal` (429, a body that names the rule, `Retry-After`),
   which the proxy sends; a leaky-bucket admission with a `delay` waits that long first (shaping).
2. stickiness (`PoolSticky.choose`): the session key -- cookie mode: the `HALBSID` cookie if it holds a
   well-formed id; source_ip: the client address; header: the header's value (no header = not sticky).
   - no cookie (cookie mode): a new session. The pool's policy picks the backend and `mint` draws random
     ids until the consistent-hash ring maps one to that backend (about one try per backend), so new
     sessions spread as the policy wants AND the ring finds every one of them while Redis is down. One
     SET stores the mapping; the response gets `Set-Cookie`.
   - a key: the worker's cache first (key -> backend for `sticky.cache` seconds, used only while that
     backend is healthy; bounded, oldest evicted), else `StickySessions.resolve` (one GETEX that also
     slides the TTL; rehomes a session whose backend is down or gone, keeps a draining one's) and, for
     new or rehomed sessions, `remember` (one SET). The cache is what keeps a hot session's cost near zero
     (redis-py costs ~60-100 us of CPU per call, as much as proxying the request); its price is that a
     mapping changed by another node is seen here up to `cache` seconds late.
   The result is put on the connection as `conn.sticky` (a `RequestSticky`: backend, key, cookie line);
   the proxy sends the request there instead of asking the pool's policy. No backend -> `conn.sticky` is
   None and the policy answers 503.

If a connect to the sticky backend fails, the proxy's usual retry picks another backend; it then calls
`hook.rehomed(conn, backend)`, which stores the new mapping (the session follows). When a new id was
issued, the proxy appends `conn.sticky.cookie` to the response head.

Every store call is bounded by the store (`call_timeout`, circuit breaker), and a store failure never
fails a request: stickiness falls back to the consistent-hash ring, rate limits to per-node buckets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from halb.backend import Backend
from halb.config_model import Config, ListenerConfig, RateLimitConfig, StickyConfig
from halb.errors import StoreUnavailable
from halb.state import (
    RateLimiter,
    SessionStore,
    StickyChoice,
    StickySessions,
    Tier,
    Tiers,
    new_session_id,
    valid_session_id,
)
from halb.state.sessions import FALLBACK, NEW, REHOMED

if TYPE_CHECKING:
    from halb.balancing.base import Context
    from halb.pool import Pool
    from halb.proxy.http_codec import RequestHead

log = logging.getLogger("halb.proxy.state")

MAX_SESSION_KEY = 200  # longer header values are replaced by their hash (store keys stay small)
MAX_CACHED = 100_000  # session mappings cached per pool and worker
MINT_TRIES = 64  # random ids tried to find one the ring maps to the policy's backend (p(miss) ~ e^-64/N)


@dataclass(slots=True)
class Refusal:
    """A request refused by a rate limit: the proxy answers it with these."""

    status: int
    message: str
    headers: bytes  # extra header lines, each ending in CRLF


@dataclass(slots=True)
class RequestSticky:
    """Where this request's session goes (set on the connection by the hook)."""

    backend: Backend
    key: str
    cookie: bytes  # b"Set-Cookie: ...\r\n" when a new id was issued, else b""


# --- rate limits -----------------------------------------------------------------------------------------
class Rule:
    """One `[ratelimits.NAME]` rule: which requests it counts, under which key, and its limiter."""

    def __init__(self, rc: RateLimitConfig, store: SessionStore | None) -> None:
        self.name = rc.name
        self.config = rc
        self.kind, _, header = rc.key.partition(":")
        self.header = header.encode()
        # Bucket keys: "<ip>" / "h:<value>" / "ip:<ip>" (no header) / "<prefix>"; tier keys mapped alike.
        prefix = "h:" if self.kind == "header" else ""
        by_key = {prefix + k: Tier(t.rate, t.burst, t.name) for t in rc.tiers for k in t.keys}
        tiers = Tiers(Tier(rc.rate, rc.burst), by_key)
        self.limiter = RateLimiter(rc.name, rc.algorithm, tiers, store, local_share=rc.local_share)
        self.paths = tuple(p.encode() for p in rc.paths)
        self.allowed = 0
        self.limited = 0
        self.local = 0  # decisions taken by this node's buckets (store unavailable or absent)

    def key_for(self, req: RequestHead, client_ip: str) -> str | None:
        """The bucket key of this request, or None when the rule does not apply to its path."""
        matched = b""
        if self.paths:
            path = req.path
            for p in self.paths:
                if path.startswith(p):
                    matched = p
                    break
            else:
                return None
        kind = self.kind
        if kind == "client_ip":
            return client_ip
        if kind == "path_prefix":
            return matched.decode("latin-1")
        value = req.header(self.header)
        return "h:" + value.decode("latin-1") if value else "ip:" + client_ip

    def what(self) -> str:
        if self.kind == "header":
            return f"{self.header.decode()} header value (or client address without it)"
        return "path prefix" if self.kind == "path_prefix" else "client address"


# --- sticky sessions -------------------------------------------------------------------------------------
def cookie_line(config: StickyConfig, session_id: str) -> bytes:
    parts = [f"Set-Cookie: {config.name}={session_id}", f"Path={config.path}"]
    if config.domain:
        parts.append(f"Domain={config.domain}")
    if config.secure:
        parts.append("Secure")
    if config.httponly:
        parts.append("HttpOnly")
    if config.samesite:
        parts.append(f"SameSite={config.samesite}")
    return "; ".join(parts).encode("latin-1") + b"\r\n"


_COOKIE_FIELD = re.compile(rb"\r\ncookie:[ \t]*([^\r\n]*)", re.IGNORECASE)


def find_cookie(req: RequestHead, name: bytes) -> bytes | None:
    """The value of cookie `name` in the request's Cookie header(s), or None. Scans the raw head with one
    regex (C speed) instead of building the header list (`req.headers`), which costs more per request."""
    for match in _COOKIE_FIELD.finditer(req.raw, max(0, req.fields_start - 2)):
        for part in match.group(1).split(b";"):
            key, sep, val = part.strip(b" \t").partition(b"=")
            if sep and key == name:
                return val.strip(b'"')
    return None


class PoolSticky:
    """Sticky sessions of one pool in this worker (shared by every listener of the pool)."""

    def __init__(self, pool: Pool, config: StickyConfig, store: SessionStore) -> None:
        self.pool = pool
        self.config = config
        self.mode = config.mode
        self.name = config.name.encode()
        self.header = config.name.lower().encode()
        self.sessions = StickySessions(pool.name, pool.backends, store, config.ttl)
        self._backends = pool.backends  # the list the ring was built from (Pool.reconfigure replaces it)
        self._by_name = {b.name: b for b in pool.backends}
        # The worker's cache: session key -> (backend name, valid until loop.time()); see the module doc.
        self.cache_for = config.cache
        self._cache: dict[str, tuple[str, float]] = {}
        self.cache_hits = 0
        self.cookies_issued = 0
        self.retry_rehomed = 0
        self.unkeyed = 0  # requests without a session key (header mode without the header)
        self.mint_misses = 0  # new ids that could not be made to hash to the policy's choice

    def refresh(self) -> None:
        """Follow the pool: membership (a new list) at once, weights at the next housekeeping tick."""
        self._backends = self.pool.backends
        self._by_name = {b.name: b for b in self._backends}
        self.sessions.update(self._backends)

    def _cache_put(self, key: str, backend: Backend, now: float) -> None:
        if self.cache_for <= 0:
            return
        cache = self._cache
        cache.pop(key, None)  # re-inserted at the end: the oldest entries are evicted first
        cache[key] = (backend.name, now + self.cache_for)
        if len(cache) > MAX_CACHED:
            for old in list(itertools.islice(cache, len(cache) - MAX_CACHED + MAX_CACHED // 100)):
                del cache[old]

    def session_key(self, req: RequestHead, client_ip: str) -> str | None:
        """The session key of a request: a valid cookie id, the client address, the header's value; None
        when there is none (cookie mode: a new session is started)."""
        mode = self.mode
        if mode == "cookie":
            raw = find_cookie(req, self.name)
            if raw is not None:
                value = raw.decode("latin-1")
                if valid_session_id(value):
                    return value
            return None
        if mode == "source_ip":
            return client_ip
        header = req.header(self.header)
        if not header:
            return None
        if len(header) > MAX_SESSION_KEY:
            return "#" + hashlib.blake2b(header, digest_size=16).hexdigest()
        return header.decode("latin-1")

    def mint(self, backend: Backend) -> tuple[str, Backend | None]:
        """A new session id that the consistent-hash ring maps to `backend` (the policy's choice), so the
        policy spreads new sessions and the ring still finds them while the store is unavailable. Tries
        random ids (about one per backend of the pool); after MINT_TRIES the last id and its ring owner."""
        ring_choice = self.sessions.ring_choice
        owner: Backend | None = None
        session_id = ""
        for _ in range(MINT_TRIES):
            session_id = new_session_id()
            owner = ring_choice(session_id)
            if owner is backend:
                break
        else:
            self.mint_misses += 1
        return session_id, owner

    async def choose(self, req: RequestHead, ctx: Context) -> RequestSticky | None:
        if self.pool.backends is not self._backends:
            self.refresh()
        key = self.session_key(req, ctx.client_ip)
        sessions = self.sessions
        if key is None:
            if self.mode != "cookie":
                self.unkeyed += 1
                return None
            # A new session: the pool's policy picks its backend, the id is minted to hash there.
            picked = self.pool.choose(ctx)
            if picked is None:
                return None
            key, backend = self.mint(picked)
            if backend is None:
                return None
            choice = StickyChoice(backend, True, NEW)
            sessions.counts[NEW] += 1
            await sessions.remember(key, choice)  # a fresh 128-bit id has no mapping yet: no lookup
            self.cookies_issued += 1
            self._cache_put(key, backend, ctx.now)
            return RequestSticky(backend, key, cookie_line(self.config, key))
        entry = self._cache.get(key)
        if entry is not None:
            if ctx.now < entry[1]:
                cached = self._by_name.get(entry[0])
                if cached is not None and cached.healthy:  # (a draining backend keeps its sessions)
                    self.cache_hits += 1
                    return RequestSticky(cached, key, b"")
            del self._cache[key]
        choice = await sessions.resolve(key)
        if choice.backend is None:
            return None
        if choice.write:
            await sessions.remember(key, choice)
        if choice.source != FALLBACK:  # (without the store, the ring decides each time at no cost)
            self._cache_put(key, choice.backend, ctx.now)
        return RequestSticky(choice.backend, key, b"")

    def rehomed(self, sticky: RequestSticky, backend: Backend) -> asyncio.Task[bool]:
        """The proxy's connect retry moved the session to `backend`: the mapping follows (a background
        write, returned as a task)."""
        sticky.backend = backend
        self.retry_rehomed += 1
        self._cache_put(sticky.key, backend, asyncio.get_running_loop().time())
        choice = StickyChoice(backend, True, REHOMED)
        return asyncio.get_running_loop().create_task(self.sessions.remember(sticky.key, choice))

    def stats(self) -> dict[str, int]:
        counts = dict(self.sessions.counts)
        counts["cookies_issued"] = self.cookies_issued
        counts["retry_rehomed"] = self.retry_rehomed
        counts["unkeyed"] = self.unkeyed
        counts["mint_misses"] = self.mint_misses
        counts["cache"] = self.cache_hits
        return counts


# --- the hook one HTTP listener calls ---------------------------------------------------------------------
class ListenerHook:
    def __init__(self, rules: list[Rule], sticky: PoolSticky | None) -> None:
        self.rules = rules
        self.sticky = sticky
        self.errors = 0
        self._tasks: set[asyncio.Task[bool]] = set()

    async def before_choose(self, conn: Any, req: RequestHead, ctx: Context) -> Refusal | None:
        """Rate limits, then stickiness (sets `conn.sticky`). A Refusal is for the proxy to send.

        Never raises (except cancellation): a bug here must not cost the request, it goes on unhooked."""
        conn.sticky = None
        try:
            return await self._before_choose(conn, req, ctx)
        except Exception:
            self.errors += 1
            log.exception("state hook failed; request continues without rate limits/stickiness")
            conn.sticky = None
            return None

    async def _before_choose(self, conn: Any, req: RequestHead, ctx: Context) -> Refusal | None:
        client_ip: str = conn.client_ip
        for rule in self.rules:
            key = rule.key_for(req, client_ip)
            if key is None:
                continue
            decision = await rule.limiter.check(key)
            if decision.local:
                rule.local += 1
            if not decision.allowed:
                rule.limited += 1
                after = decision.retry_after_header
                return Refusal(
                    429,
                    f'rate limit "{rule.name}" exceeded for this {rule.what()}; retry after {after} s',
                    b"Retry-After: " + after.encode() + b"\r\n",
                )
            rule.allowed += 1
            if decision.delay > 0:  # leaky bucket: wait for this request's turn (shaping)
                await asyncio.sleep(decision.delay)
        if self.sticky is not None:
            conn.sticky = await self.sticky.choose(req, ctx)
        return None

    def rehomed(self, conn: Any, backend: Backend) -> None:
        """The proxy's connect retry sent this request's session to `backend`: store the new mapping in the
        background (the proxy does not wait for it; a lost write only means one more re-decision)."""
        sticky: RequestSticky | None = conn.sticky
        if self.sticky is None or sticky is None or backend is sticky.backend:
            return
        task = self.sticky.rehomed(sticky, backend)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# --- one per worker --------------------------------------------------------------------------------------
class StateRuntime:
    def __init__(self, config: Config, store: SessionStore | None = None) -> None:
        self.config = config
        if store is None and config.state is not None:
            from halb.config_state import redis_settings
            from halb.state.redis_store import RedisStore

            store = RedisStore(redis_settings(config.state))
        self.store = store
        self.ping_interval = config.state.ping_interval if config.state is not None else 1.0
        # Per-node fallback buckets: each worker takes its share of the node's (1/workers of local_share).
        workers = max(1, config.node.workers)
        self.rules = {
            name: Rule(dataclasses.replace(rc, local_share=rc.local_share / workers), store)
            for name, rc in config.ratelimits.items()
        }
        self.sticky: dict[str, PoolSticky] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.store is not None or bool(self.rules)

    def for_listener(self, config: ListenerConfig, pool: Pool) -> ListenerHook | None:
        """The hook of one HTTP listener; None when it has nothing to do (no rule, no stickiness)."""
        if config.mode != "http":
            return None
        rules = [self.rules[name] for name in config.ratelimits]
        sticky = None
        if pool.config.sticky is not None and self.store is not None:
            sticky = self.sticky.get(pool.name)
            if sticky is None:
                sticky = self.sticky[pool.name] = PoolSticky(pool, pool.config.sticky, self.store)
        if not rules and sticky is None:
            return None
        return ListenerHook(rules, sticky)

    def start(self) -> None:
        if self.active and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._housekeep(), name="halb-state")

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            for sticky in self.sticky.values():
                sticky.refresh()
            if self.store is not None:
                with contextlib.suppress(StoreUnavailable):
                    await self.store.ping()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.store is not None:
            await self.store.aclose()

    def stats(self) -> dict[str, Any] | None:
        """For the worker's stats message (None when the runtime has nothing configured)."""
        if not self.active:
            return None
        return {
            "store": self.store.status.as_dict() if self.store is not None else None,
            "sticky": {name: s.stats() for name, s in self.sticky.items()},
            "ratelimits": {
                name: {"allowed": r.allowed, "limited": r.limited, "local": r.local}
                for name, r in self.rules.items()
            },
        }
