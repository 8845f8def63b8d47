"""Redis dies, hangs and comes back: bounded waits, fail-fast circuit, local fallbacks, automatic recovery.

Elapsed-time assertions are correctness bounds (no call may wait longer than the store's call timeout),
with a 3x margin for a loaded machine; the measured figures are printed in the run's summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable

import pytest

from halb.backend import Backend
from halb.errors import StoreUnavailable
from halb.state.ratelimit import RateLimiter, Tier, Tiers
from halb.state.redis_store import RedisSettings, RedisStore
from halb.state.sessions import FALLBACK, STORE, StickySessions, new_session_id
from halb.state.store import TOKEN_BUCKET
from tests.conftest import report
from tests.state.conftest import RedisProcess, RedisServers, run, sync_client

pytestmark = pytest.mark.integration

CALL_TIMEOUT = 0.25
BOUND = 3 * CALL_TIMEOUT  # generous margin over the configured bound


def make_store(server: RedisProcess) -> RedisStore:
    return RedisStore(
        RedisSettings(
            url=server.url,
            connect_timeout=0.1,
            socket_timeout=0.1,
            call_timeout=CALL_TIMEOUT,
            failure_threshold=2,
            open_min=0.2,
            open_max=0.5,
        )
    )


def pool_of(n: int = 4) -> list[Backend]:
    return [Backend(f"web{i}", "127.0.0.1", 9000 + i) for i in range(1, n + 1)]


async def timed(fn: Callable[[], Awaitable[object]]) -> tuple[float, BaseException | None]:
    t0 = time.perf_counter()
    try:
        await fn()
    except StoreUnavailable as exc:
        return time.perf_counter() - t0, exc
    return time.perf_counter() - t0, None


async def wait_recovered(sticky: StickySessions, key: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (await sticky.resolve(key)).source == FALLBACK:
        assert time.monotonic() < deadline, "store did not recover"
        await asyncio.sleep(0.05)


def ms(values: list[float]) -> str:
    def fmt(v: float) -> str:
        return f"{v * 1000:.1f} ms" if v >= 0.001 else f"{v * 1e6:.0f} us"

    return f"max {fmt(max(values))}, median {fmt(statistics.median(values))}"


def test_killed_redis_fails_fast_falls_back_and_recovers(redis_servers: RedisServers) -> None:
    server = redis_servers.server()

    async def scenario() -> None:
        store = make_store(server)
        pool = pool_of()
        sticky = StickySessions("app", pool, store, ttl=1800)
        limiter = RateLimiter("api", TOKEN_BUCKET, Tiers(Tier(0.01, 3)), store)
        try:
            keys = [new_session_id() for _ in range(200)]
            on = {}
            for k in keys:
                c = await sticky.resolve(k)
                assert await sticky.remember(k, c)
                on[k] = c.backend
            assert all([(await sticky.resolve(k)).source == STORE for k in keys])
            assert [(await limiter.check("10.0.0.1")).allowed for _ in range(4)] == [True] * 3 + [False]

            server.kill()
            first, later = [], []
            for i in range(60):
                elapsed, exc = await timed(lambda: store.get_backend("app", keys[0], 1800))
                assert isinstance(exc, StoreUnavailable)
                assert elapsed < BOUND, f"call {i} waited {elapsed:.3f}s"
                (first if i < store.settings.failure_threshold else later).append(elapsed)
            assert store.degraded and store.status.as_dict()["state"] == "degraded"
            # Calls during the open circuit did no I/O: only the first ones (and probes) reached the socket.
            assert store.status.errors_total <= store.settings.failure_threshold + 2

            for k in keys:  # stickiness falls back to the ring: every ring-assigned session stays put
                t0 = time.perf_counter()
                c = await sticky.resolve(k)
                assert time.perf_counter() - t0 < BOUND
                assert c.source == FALLBACK and c.backend is on[k]
            d = await limiter.check("10.0.0.1")
            assert d.local and d.allowed  # a per-node bucket, full
            assert store.status.fallback_decisions_total >= len(keys) + 1

            server.start()  # same port, empty data (no persistence)
            await wait_recovered(sticky, keys[0])
            assert not store.degraded
            for k in keys:  # mappings were lost with the data: the ring reassigns them identically
                c = await sticky.resolve(k)
                assert c.backend is on[k]
            report(
                "state: Redis killed (connection refused)",
                f"first {len(first)} calls: {ms(first)}; open circuit, {len(later)} calls: {ms(later)}",
            )
        finally:
            await store.aclose()

    run(scenario(), 60)


def test_hung_redis_bounded_by_the_call_timeout_and_recovers(redis_servers: RedisServers) -> None:
    server = redis_servers.server()

    async def scenario() -> None:
        store = make_store(server)
        sticky = StickySessions("app", pool_of(), store, ttl=60)
        try:
            await store.set_backend("app", "k", "web1", 60)
            server.stop()  # SIGSTOP: connects succeed (kernel backlog), nothing ever answers
            first, later = [], []
            for i in range(40):
                elapsed, exc = await timed(lambda: store.get_backend("app", "k", 60))
                assert isinstance(exc, StoreUnavailable)
                assert elapsed < BOUND, f"call {i} waited {elapsed:.3f}s"
                (first if i < store.settings.failure_threshold else later).append(elapsed)
            assert store.degraded
            assert store.status.errors_total <= store.settings.failure_threshold + 2
            c = await sticky.resolve("k")
            assert c.source == FALLBACK and c.backend is not None
            server.cont()
            await wait_recovered(sticky, "k")
            assert await store.get_backend("app", "k", 60) == "web1"
            report(
                "state: Redis hung (SIGSTOP)",
                f"first {len(first)} calls: {ms(first)}; open circuit, {len(later)} calls: {ms(later)}",
            )
        finally:
            server.cont()
            await store.aclose()

    run(scenario(), 60)


def test_redis_killed_under_concurrent_load(redis_servers: RedisServers) -> None:
    server = redis_servers.server()

    async def scenario() -> None:
        store = make_store(server)
        pool = pool_of()
        sticky = StickySessions("app", pool, store, ttl=1800)
        limiter = RateLimiter("api", TOKEN_BUCKET, Tiers(Tier(1000, 1000)), store)
        keys = [new_session_id() for _ in range(100)]
        for k in keys:
            await sticky.remember(k, await sticky.resolve(k))
        on = {k: sticky.ring_choice(k) for k in keys}
        waits: list[float] = []
        wrong: list[str] = []
        stop = asyncio.Event()

        async def client(n: int) -> None:
            i = n
            while not stop.is_set():
                k = keys[i % len(keys)]
                i += 7
                t0 = time.perf_counter()
                c = await sticky.resolve(k)  # never raises
                await limiter.check(f"10.0.0.{n}")
                waits.append(time.perf_counter() - t0)
                if c.backend is not on[k]:
                    wrong.append(k)
                await asyncio.sleep(0.002)

        tasks = [asyncio.create_task(client(n)) for n in range(20)]
        try:
            await asyncio.sleep(0.3)
            server.kill()
            await asyncio.sleep(1.0)
            assert store.degraded
            server.start()
            await wait_recovered(sticky, keys[0])
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await store.aclose()
        # Two store calls per iteration, each bounded by the call timeout.
        assert max(waits) < 2 * BOUND
        assert not wrong  # every session reached its backend throughout
        report("state: Redis killed under load (20 clients)", f"{len(waits)} requests, {ms(waits)}")

    run(scenario(), 60)


def test_a_dropped_connection_costs_no_error(redis_servers: RedisServers) -> None:
    server = redis_servers.server()

    async def scenario() -> None:
        store = make_store(server)
        try:
            await store.set_backend("app", "k", "web1", 60)
            with sync_client(server.port) as c:
                ids = [cl["id"] for cl in c.client_list() if cl["name"] == "halb"]
                assert ids
                for client_id in ids:
                    c.client_kill_filter(_id=client_id)
            assert await store.get_backend("app", "k", 60) == "web1"  # reconnected within the call
            assert store.status.errors_total == 0 and not store.degraded
        finally:
            await store.aclose()

    run(scenario())


def test_a_read_only_replica_opens_the_circuit_and_ping_recovers(redis_servers: RedisServers) -> None:
    master = redis_servers.server()
    replica = redis_servers.server("--replicaof", "127.0.0.1", str(master.port))

    async def scenario() -> None:
        store = make_store(replica)  # a plain URL pointing at a replica: writes answer READONLY
        try:
            for _ in range(2):
                with pytest.raises(StoreUnavailable):
                    await store.set_backend("app", "k", "web1", 60)
            assert store.degraded and "ReadOnly" in store.status.last_error
            with sync_client(replica.port) as c:
                c.replicaof("NO", "ONE")  # promoted: writable again
            deadline = time.monotonic() + 15
            while store.degraded:  # no traffic at all, only a periodic status ping
                with contextlib.suppress(StoreUnavailable):
                    await store.ping()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await store.set_backend("app", "k", "web1", 60)
        finally:
            await store.aclose()

    run(scenario())
