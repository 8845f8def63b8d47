"""The Redis SessionStore (redis.asyncio): a plain URL or Sentinel, bounded waits, a circuit breaker.

How this works
--------------
One `redis.asyncio.Redis` client per store (per worker process), built either from `url`
("redis://[:password@]host:port/db") or from `sentinels` + `service_name`; in Sentinel mode the client is
`Sentinel(...).master_for(service_name)`, whose connection pool asks the sentinels for the master's address
whenever it opens a connection and drops connections that answer READONLY (a demoted master). That alone
is not enough: after a failover Sentinel demotes the old master only at its next INFO of it (up to 10 s),
and until then pooled connections would keep writing there (writes lost at the resync). So a background
task asks the sentinels every `sentinel_check_interval` (1 s) where the master is and, when it moved, drops
every connection. A failover is followed without recreating anything: calls fail while there is no
master, the breaker opens, a probe finds the new master, the breaker closes. Writes made in the last
moments before a failover can still be lost (Redis replication is asynchronous); for sticky sessions that
only means one re-decision, which the consistent-hash ring makes the same way.

Every call is bounded three ways, because redis-py 8's defaults (several retries, 5 s timeouts) block
about 4.5 s on a dead server:
- `connect_timeout` / `socket_timeout` on every socket operation (sentinel connections too);
- an explicit `Retry`: `retries` quick retries (default 1) with exponential backoff capped at
  `backoff_cap`, only for connection errors and timeouts;
- `call_timeout`, a hard deadline (asyncio.timeout) around the whole call: waiting for a free connection
  slot (at most `max_connections` calls in flight), connecting, sentinel discovery, retries, and the NOSCRIPT
  -> EVAL fallback. redis-py drops a connection whose command was cancelled, so a deadline never leaves
  a half-read reply behind. No call waits longer than `call_timeout`.

Every failure (connection, timeout, READONLY/LOADING/MASTERDOWN..., any unexpected exception) is converted
here to `StoreUnavailable`; nothing Redis-specific leaves this module. Failures feed a `CircuitBreaker`
(`halb.state.degradation`): after `failure_threshold` consecutive failures the circuit opens, the status
says "degraded", and calls raise `StoreUnavailable` at once, without any I/O. When the open period is over,
the next call (still failing fast) starts one background PING probe; its success closes the circuit and
the status says "ok" again. A `ResponseError` that is not about availability (a wrong-type key, a script
error) is still converted to `StoreUnavailable` and counted, but does not open the circuit: the server did
answer.

Keys: `<key_prefix>s:<pool>:<session id>` -> backend name (string, PX = ttl; GETEX re-arms it on a hit) and
`<key_prefix>rl:<rule>:<key>` (hash; see `halb.state.ratelimit`). Needs Redis >= 6.2 (GETEX).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import BusyLoadingError, NoScriptError, ReadOnlyError, ResponseError

from halb.errors import StoreUnavailable
from halb.state.degradation import CircuitBreaker, StoreStatus
from halb.state.ratelimit import SCRIPT_SHAS, SCRIPTS, decision_from_reply
from halb.state.store import Decision, SessionStore, check_bucket_args

log = logging.getLogger("halb.state")

T = TypeVar("T")

# ResponseErrors that mean "this server cannot serve now" (they open the circuit like a dead socket).
_UNAVAILABLE_REPLIES = ("MASTERDOWN", "NOREPLICAS", "LOADING", "BUSY", "OOM", "TRYAGAIN", "CLUSTERDOWN")


@dataclass(frozen=True)
class RedisSettings:
    """Where Redis is and how long halb may wait for it. Times in seconds."""

    # Fields that may carry a password stay out of repr() (settings end up in logs and tracebacks).
    url: str = field(default="", repr=False)  # redis://[:password@]host:port/db; exactly one of url/sentinels
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str = "mymaster"
    password: str | None = field(default=None, repr=False)  # Sentinel mode: the master's password
    sentinel_password: str | None = field(default=None, repr=False)
    db: int = 0  # Sentinel mode
    connect_timeout: float = 0.1
    socket_timeout: float = 0.1
    call_timeout: float = 0.25  # hard bound on one store call, retries included
    retries: int = 1
    backoff_base: float = 0.005
    backoff_cap: float = 0.025
    max_connections: int = 64  # calls in flight per store; more wait for a slot (within call_timeout)
    failure_threshold: int = 2
    open_min: float = 0.5
    open_max: float = 2.0
    sentinel_check_interval: float = 1.0  # Sentinel mode: how often to ask where the master is
    key_prefix: str = "halb:"

    def __post_init__(self) -> None:
        if bool(self.url) == bool(self.sentinels):
            raise ValueError("give exactly one of url or sentinels")
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {self.url!r}")
        for name in (
            "connect_timeout",
            "socket_timeout",
            "call_timeout",
            "open_min",
            "open_max",
            "sentinel_check_interval",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.retries < 0 or self.max_connections < 1:
            raise ValueError("retries must be >= 0 and max_connections >= 1")
        if self.failure_threshold < 1 or self.open_min > self.open_max:
            raise ValueError("need failure_threshold >= 1 and open_min <= open_max")

    @property
    def kind(self) -> str:
        return "sentinel" if self.sentinels else "redis"


class RedisStore(SessionStore):
    def __init__(
        self,
        settings: RedisSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = s = settings
        self._clock = clock
        self._wall = wall
        self.status = StoreStatus(backend=s.kind, since=wall())
        self.breaker = CircuitBreaker(s.failure_threshold, s.open_min, s.open_max)
        self._slots = asyncio.Semaphore(s.max_connections)
        self._probe_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._prefix = s.key_prefix
        retry = Retry(ExponentialBackoff(cap=s.backoff_cap, base=s.backoff_base), s.retries)
        common = {
            "socket_connect_timeout": s.connect_timeout,
            "socket_timeout": s.socket_timeout,
            "retry": retry,
            "max_connections": s.max_connections,
            "decode_responses": True,
            "client_name": "halb",
        }
        self._sentinel: Sentinel | None = None
        if s.sentinels:
            sentinel_kwargs = {
                "socket_connect_timeout": s.connect_timeout,
                "socket_timeout": s.socket_timeout,
                "retry": Retry(NoBackoff(), 0),  # a dead sentinel: go on to the next one at once
                "password": s.sentinel_password,
            }
            self._sentinel = Sentinel(
                list(s.sentinels), sentinel_kwargs=sentinel_kwargs, password=s.password, db=s.db, **common
            )
            self._client: Redis = self._sentinel.master_for(s.service_name)
        else:
            self._client = Redis.from_url(s.url, **common)  # type: ignore[arg-type]

    # --- the SessionStore API --------------------------------------------------------------------------
    def _session_key(self, pool: str, session_id: str) -> str:
        return f"{self._prefix}s:{pool}:{session_id}"

    async def get_backend(self, pool: str, session_id: str, ttl: float) -> str | None:
        key = self._session_key(pool, session_id)
        px = _ms(ttl)
        return await self._call(lambda: self._client.getex(key, px=px))

    async def set_backend(self, pool: str, session_id: str, backend: str, ttl: float) -> None:
        key = self._session_key(pool, session_id)
        px = _ms(ttl)
        await self._call(lambda: self._client.set(key, backend, px=px))

    async def delete(self, pool: str, session_id: str) -> None:
        key = self._session_key(pool, session_id)
        await self._call(lambda: self._client.delete(key))

    async def rate_limit(
        self, key: str, algorithm: str, rate: float, burst: float, now: float | None = None
    ) -> Decision:
        check_bucket_args(algorithm, rate, burst)
        full_key = self._prefix + key
        args = (repr(float(rate)), repr(float(burst)), "" if now is None else repr(float(now)))
        sha = SCRIPT_SHAS[algorithm]
        client = self._client

        async def run() -> list[object]:
            try:
                return await client.evalsha(sha, 1, full_key, *args)  # type: ignore[no-any-return]
            except NoScriptError:
                return await client.eval(SCRIPTS[algorithm], 1, full_key, *args)  # type: ignore[no-any-return]

        return decision_from_reply(await self._call(run))

    async def ping(self) -> None:
        """A PING through the breaker: while the circuit is open it fails at once but starts a due probe,
        so calling this periodically (e.g. from a status loop) also drives recovery without traffic."""
        await self._call(self._client.ping)

    async def aclose(self) -> None:
        for task in (self._probe_task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        with contextlib.suppress(Exception):
            await self._client.aclose()
        if self._sentinel is not None:
            with contextlib.suppress(Exception):
                await self._sentinel.aclose()

    # --- the boundary: deadline, error conversion, breaker ---------------------------------------------
    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._sentinel is not None and self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_master())
        if not self.breaker.allow():
            self._maybe_probe()
            raise StoreUnavailable(f"{self.status.backend}: circuit open after: {self.status.last_error}")
        try:
            async with asyncio.timeout(self.settings.call_timeout):
                async with self._slots:
                    result = await fn()
        except TimeoutError as exc:  # our deadline (redis-py's own timeouts are RedisError subclasses)
            self._on_failure(f"no answer within {self.settings.call_timeout}s")
            raise StoreUnavailable(f"{self.status.backend}: {self.status.last_error}") from exc
        except ResponseError as exc:
            if _is_unavailable_reply(exc):
                self._on_failure(f"{type(exc).__name__}: {exc}")
            else:
                self.status.errors_total += 1
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                self._on_success()  # the server answered: not an availability problem
            raise StoreUnavailable(f"{self.status.backend}: {exc}") from exc
        except Exception as exc:  # ConnectionError, redis TimeoutError, OSError, anything unexpected
            self._on_failure(f"{type(exc).__name__}: {exc}")
            raise StoreUnavailable(f"{self.status.backend}: {self.status.last_error}") from exc
        self._on_success()
        return result

    def _on_failure(self, reason: str) -> None:
        self.status.errors_total += 1
        self.status.last_error = reason
        if self.breaker.on_failure(self._clock()):
            self.status.set_state("degraded", self._wall())
            log.warning("%s store degraded (%s); deciding locally", self.status.backend, reason)

    def _on_success(self) -> None:
        if self.breaker.on_success() and self.status.set_state("ok", self._wall()):
            log.warning("%s store recovered", self.status.backend)

    def _maybe_probe(self) -> None:
        if self.breaker.probe_due(self._clock()):
            self._probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        try:
            async with asyncio.timeout(self.settings.call_timeout):
                await self._client.ping()
        except Exception as exc:  # TimeoutError, RedisError, OSError...
            self.status.errors_total += 1
            self.status.last_error = f"probe: {type(exc).__name__}: {exc}"
            self.breaker.on_probe_failure(self._clock())
        else:
            self._on_success()

    async def _watch_master(self) -> None:
        """Sentinel mode: ask the sentinels where the master is every `sentinel_check_interval`; when it
        moved, drop every connection (idle and in use) so the next command connects to the new one."""
        pool = self._client.connection_pool
        seen = None  # our own memory: new connections may update pool.master_address before we look
        while True:
            await asyncio.sleep(self.settings.sentinel_check_interval)
            if seen is None:
                seen = pool.master_address  # type: ignore[attr-defined]
            try:
                async with asyncio.timeout(self.settings.call_timeout):
                    address = await pool.get_master_address()  # type: ignore[attr-defined]
                    if seen is not None and address != seen:
                        log.warning("sentinel: master moved from %s to %s", seen, address)
                        await pool.disconnect(inuse_connections=True)
                    seen = address
            except Exception:  # no sentinel answered / no master now: the breaker handles the calls
                continue


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _is_unavailable_reply(exc: ResponseError) -> bool:
    if isinstance(exc, ReadOnlyError | BusyLoadingError):
        return True
    return str(exc).upper().startswith(_UNAVAILABLE_REPLIES)
