"""RedisStore against a real Redis: session semantics, Lua buckets (atomic, shared, same as Python)."""

from __future__ import annotations

import asyncio
import random
import time
from urllib.parse import urlparse

import pytest

from halb.errors import StoreUnavailable
from halb.state.ratelimit import SCRIPT_SHAS, LocalBuckets, RateLimiter, Tier, Tiers
from halb.state.redis_store import RedisSettings, RedisStore
from halb.state.store import LEAKY_BUCKET, TOKEN_BUCKET
from tests.state.conftest import run, sync_client

pytestmark = pytest.mark.integration

# Generous bounds for the semantics tests: they check behaviour, not latency, on a shared 2-core machine.
SLOW = {"connect_timeout": 2.0, "socket_timeout": 2.0, "call_timeout": 5.0}


def store_for(url: str, prefix: str, **overrides: object) -> RedisStore:
    return RedisStore(RedisSettings(url=url, key_prefix=prefix, **{**SLOW, **overrides}))  # type: ignore[arg-type]


def port_of(url: str) -> int:
    return urlparse(url).port or 6379


def test_settings_validation() -> None:
    with pytest.raises(ValueError):
        RedisSettings()
    with pytest.raises(ValueError):
        RedisSettings(url="redis://x:1", sentinels=(("x", 1),))
    with pytest.raises(ValueError):
        RedisSettings(url="http://x:1")
    with pytest.raises(ValueError):
        RedisSettings(url="redis://x:1", call_timeout=0)
    assert RedisSettings(sentinels=(("127.0.0.1", 26379),)).kind == "sentinel"


def test_sessions_set_get_delete_and_sliding_ttl(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        store = store_for(redis_url, prefix)
        try:
            assert await store.get_backend("app", "s1", ttl=60) is None
            await store.set_backend("app", "s1", "web1", ttl=1.0)
            assert await store.get_backend("app", "s1", ttl=60) == "web1"
            with sync_client(port_of(redis_url)) as c:
                pttl = c.pttl(f"{prefix}s:app:s1")
                assert 50_000 < pttl <= 60_000  # the hit re-armed the 1 s TTL to 60 s
                await store.get_backend("app", "s1", ttl=30)
                assert c.pttl(f"{prefix}s:app:s1") <= 30_000  # re-armed to the ttl given, not only extended
            assert await store.get_backend("other", "s1", ttl=60) is None  # per pool
            await store.set_backend("app", "s1", "web2", ttl=60)
            assert await store.get_backend("app", "s1", ttl=60) == "web2"
            await store.delete("app", "s1")
            await store.delete("app", "s1")  # deleting twice is fine
            assert await store.get_backend("app", "s1", ttl=60) is None
            await store.set_backend("app", "s2", "web3", ttl=0.2)
            assert await store.get_backend("app", "s2", ttl=0.2) == "web3"
            deadline = time.monotonic() + 10  # without hits it expires
            with sync_client(port_of(redis_url)) as c:
                while c.exists(f"{prefix}s:app:s2"):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            assert await store.get_backend("app", "s2", ttl=0.2) is None
            assert store.status.as_dict()["state"] == "ok" and store.status.errors_total == 0
        finally:
            await store.aclose()

    run(scenario())


@pytest.mark.parametrize("algorithm", [TOKEN_BUCKET, LEAKY_BUCKET])
def test_lua_and_python_agree_on_a_fake_clock(redis_url: str, prefix: str, algorithm: str) -> None:
    rng = random.Random(5)

    async def scenario() -> None:
        store = store_for(redis_url, prefix)
        local = LocalBuckets(clock=lambda: 0.0)
        try:
            now = 1_000.0
            for case in range(6):
                rate = rng.choice([0.5, 1.0, 3.0, 10.0, 7.3])
                burst = rng.choice([1, 2, 5, 10])
                key = f"rl:eq:{case}"
                for _ in range(60):
                    now += rng.choice([0.0, 0.0, 0.01, 0.05, 0.1, 0.3, 1.0, 1 / rate])
                    remote = await store.rate_limit(key, algorithm, rate, burst, now=now)
                    mine = local.take(key, algorithm, rate, burst, now=now)
                    assert remote == mine, (case, now)
        finally:
            await store.aclose()

    run(scenario())


def test_server_time_buckets_and_retry_after(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        store = store_for(redis_url, prefix)
        try:
            got = [await store.rate_limit("rl:t", TOKEN_BUCKET, rate=2.0, burst=3) for _ in range(4)]
            assert [d.allowed for d in got] == [True, True, True, False]
            assert 0 < got[3].retry_after <= 0.5
            assert got[3].retry_after_header == "1"
            deadline = time.monotonic() + 10
            while not (await store.rate_limit("rl:t", TOKEN_BUCKET, 2.0, 3)).allowed:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            with sync_client(port_of(redis_url)) as c:
                assert 0 < c.pttl(f"{prefix}rl:t") <= 2500  # expires once it would be full again
            got = [await store.rate_limit("rl:l", LEAKY_BUCKET, rate=1.0, burst=2) for _ in range(3)]
            assert [d.allowed for d in got] == [True, True, False]
            assert got[0].delay == 0 and 0.9 < got[1].delay <= 1.0
            assert 0.8 < got[2].retry_after <= 1.0
        finally:
            await store.aclose()

    run(scenario())


@pytest.mark.parametrize("algorithm", [TOKEN_BUCKET, LEAKY_BUCKET])
def test_concurrent_callers_on_two_balancers_share_one_budget(
    redis_url: str, prefix: str, algorithm: str
) -> None:
    burst, callers = 50, 400

    async def scenario() -> None:
        lb1, lb2 = store_for(redis_url, prefix), store_for(redis_url, prefix)
        try:
            # A fixed clock: exactly `burst` may pass, whatever the interleaving.
            fixed = await asyncio.gather(
                *(
                    (lb1 if i % 2 else lb2).rate_limit("rl:fixed", algorithm, 1.0, burst, now=500.0)
                    for i in range(callers)
                )
            )
            assert sum(d.allowed for d in fixed) == burst
            assert sorted(d.remaining for d in fixed if d.allowed) == list(range(burst))
            # Server time, a tiny rate: never more than burst + rate * elapsed.
            t0 = time.monotonic()
            live = await asyncio.gather(
                *(
                    (lb1 if i % 2 else lb2).rate_limit("rl:live", algorithm, 0.01, burst)
                    for i in range(callers)
                )
            )
            elapsed = time.monotonic() - t0
            allowed = sum(d.allowed for d in live)
            assert burst <= allowed <= burst + 0.01 * elapsed + 1
            refused = [d for d in live if not d.allowed]
            assert all(0 < d.retry_after <= 100.0 + 1e-6 for d in refused)
        finally:
            await lb1.aclose()
            await lb2.aclose()

    run(scenario())


def test_rate_limiter_tiers_across_two_balancers(redis_url: str, prefix: str) -> None:
    tiers = Tiers(Tier(0.01, 2), {"key-gold": Tier(0.01, 6, "gold")})

    async def scenario() -> None:
        s1, s2 = store_for(redis_url, prefix), store_for(redis_url, prefix)
        try:
            a = RateLimiter("api", TOKEN_BUCKET, tiers, s1)
            b = RateLimiter("api", TOKEN_BUCKET, tiers, s2)
            plain = [await (a if i % 2 else b).check("key-free") for i in range(5)]
            gold = [await (a if i % 2 else b).check("key-gold") for i in range(10)]
            assert sum(d.allowed for d in plain) == 2 and sum(d.allowed for d in gold) == 6
            assert not any(d.local for d in plain + gold)
            other_rule = RateLimiter("login", TOKEN_BUCKET, tiers, s1)
            assert (await other_rule.check("key-free")).allowed  # rules never share buckets
        finally:
            await s1.aclose()
            await s2.aclose()

    run(scenario())


def test_noscript_is_recovered_and_sha_is_cached(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        store = store_for(redis_url, prefix)
        try:
            with sync_client(port_of(redis_url)) as c:
                c.script_flush()
                assert (await store.rate_limit("rl:ns", TOKEN_BUCKET, 1.0, 5)).allowed  # NOSCRIPT -> EVAL
                assert c.script_exists(SCRIPT_SHAS[TOKEN_BUCKET]) == [True]
            assert (await store.rate_limit("rl:ns", TOKEN_BUCKET, 1.0, 5)).remaining == 3
            assert store.status.errors_total == 0
        finally:
            await store.aclose()

    run(scenario())


def test_a_data_error_is_converted_but_does_not_open_the_circuit(redis_url: str, prefix: str) -> None:
    async def scenario() -> None:
        store = store_for(redis_url, prefix)
        try:
            with sync_client(port_of(redis_url)) as c:
                c.set(f"{prefix}rl:wrong", "a string, not a hash")
            for _ in range(3):
                with pytest.raises(StoreUnavailable):
                    await store.rate_limit("rl:wrong", TOKEN_BUCKET, 1.0, 5)
            assert store.status.errors_total == 3 and not store.degraded
            assert store.breaker.allow()
            with pytest.raises(ValueError):
                await store.rate_limit("rl:x", "nope", 1.0, 5)  # a caller bug, not a store failure
        finally:
            await store.aclose()

    run(scenario())
