"""The state layer without Redis: circuit breaker, buckets on a fake clock, tiers, sticky decisions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halb.backend import Backend
from halb.errors import StoreUnavailable
from halb.state.degradation import BreakerState, CircuitBreaker, StoreStatus
from halb.state.memory import MemoryStore
from halb.state.ratelimit import (
    MAX_KEY_BYTES,
    LocalBuckets,
    RateLimiter,
    Tier,
    Tiers,
    bucket_key,
    leaky_bucket_step,
    token_bucket_step,
)
from halb.state.sessions import (
    FALLBACK,
    NEW,
    REHOMED,
    STORE,
    StickySessions,
    decide,
    new_session_id,
    valid_session_id,
)
from halb.state.store import LEAKY_BUCKET, TOKEN_BUCKET, Decision
from tests.state.conftest import run


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- circuit breaker -------------------------------------------------------------------------------------


def test_breaker_opens_after_threshold_and_fails_fast() -> None:
    b = CircuitBreaker(failure_threshold=2, open_min=0.5, open_max=2.0)
    assert b.allow()
    assert not b.on_failure(10.0)
    assert b.allow()
    assert b.on_failure(10.1)
    assert b.state is BreakerState.OPEN and not b.allow()
    assert not b.probe_due(10.5)  # 10.1 + 0.5 not reached
    assert b.probe_due(10.6)
    assert b.state is BreakerState.HALF_OPEN and not b.allow()
    assert not b.probe_due(10.7)  # only one probe at a time


def test_breaker_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(failure_threshold=2)
    b.on_failure(1.0)
    assert not b.on_success()  # was closed already
    assert not b.on_failure(2.0)
    assert b.allow()


def test_breaker_probe_failure_backs_off_and_success_closes() -> None:
    b = CircuitBreaker(failure_threshold=1, open_min=0.5, open_max=2.0)
    b.on_failure(0.0)
    waits = []
    now = 0.0
    for _ in range(4):
        waits.append(b.retry_at - now)
        assert not b.probe_due(b.retry_at - 0.01)
        now = b.retry_at
        assert b.probe_due(now)
        b.on_probe_failure(now)
    assert waits == [0.5, 1.0, 2.0, 2.0]
    assert b.probe_due(now + 2.0)
    assert b.on_success()
    assert b.allow() and b.open_for == 0.5


def test_breaker_ignores_failures_while_open_and_stale_probe_failures() -> None:
    b = CircuitBreaker(failure_threshold=1, open_min=1.0, open_max=4.0)
    b.on_failure(0.0)
    assert not b.on_failure(0.9)  # an in-flight call from before: does not re-arm the timer
    assert b.retry_at == 1.0
    assert b.probe_due(1.0)
    b.on_success()  # an in-flight call succeeded first
    b.on_probe_failure(1.1)  # the probe's failure is older evidence
    assert b.allow()


def test_breaker_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(open_min=3.0, open_max=1.0)


def test_status_document() -> None:
    s = StoreStatus(backend="redis", since=1.0)
    assert not s.degraded
    assert s.set_state("degraded", 5.0) and not s.set_state("degraded", 6.0)
    assert s.as_dict() == {
        "backend": "redis",
        "state": "degraded",
        "since": 5.0,
        "errors_total": 0,
        "fallback_decisions_total": 0,
        "last_error": "",
    }


# --- buckets ---------------------------------------------------------------------------------------------


def test_token_bucket_burst_then_rate() -> None:
    clock = FakeClock()
    lb = LocalBuckets(clock)
    got = [lb.take("k", TOKEN_BUCKET, rate=2.0, burst=5) for _ in range(6)]
    assert [d.allowed for d in got] == [True] * 5 + [False]
    assert [d.remaining for d in got[:5]] == [4, 3, 2, 1, 0]
    assert got[5].retry_after == pytest.approx(0.5)
    clock.t += 0.25
    assert lb.take("k", TOKEN_BUCKET, 2.0, 5).retry_after == pytest.approx(0.25)
    clock.t += 0.25
    assert lb.take("k", TOKEN_BUCKET, 2.0, 5).allowed
    clock.t += 100
    assert sum(lb.take("k", TOKEN_BUCKET, 2.0, 5).allowed for _ in range(10)) == 5  # refills to burst only


def test_leaky_bucket_queues_with_delays_then_refuses() -> None:
    clock = FakeClock()
    lb = LocalBuckets(clock)
    got = [lb.take("k", LEAKY_BUCKET, rate=10.0, burst=3) for _ in range(4)]
    assert [d.allowed for d in got] == [True, True, True, False]
    assert [d.delay for d in got[:3]] == pytest.approx([0.0, 0.1, 0.2])
    assert [d.remaining for d in got[:3]] == [2, 1, 0]
    assert got[3].retry_after == pytest.approx(0.1)
    clock.t += 0.1
    d = lb.take("k", LEAKY_BUCKET, 10.0, 3)
    assert d.allowed and d.delay == pytest.approx(0.2)


def test_clock_going_backwards_never_refills() -> None:
    state, d, _ = token_bucket_step(None, 100.0, 1.0, 1)
    assert d.allowed
    state, d, _ = token_bucket_step(state, 50.0, 1.0, 1)
    assert not d.allowed and state[1] == 100.0  # ts stays at the latest time seen
    _, d, _ = token_bucket_step(state, 100.5, 1.0, 1)
    assert not d.allowed  # only 0.5 s since 100.0, not 50.5 s


def test_expiry_only_drops_state_equal_to_no_state() -> None:
    for step in (token_bucket_step, leaky_bucket_step):
        state, _, ttl = step(None, 0.0, 3.0, 4)
        assert state is not None
        _, fresh, _ = step(None, ttl, 3.0, 4)
        _, aged, _ = step(state, ttl, 3.0, 4)
        assert fresh == aged


def test_local_buckets_evict_beyond_max_keys() -> None:
    clock = FakeClock()
    lb = LocalBuckets(clock, max_keys=10)
    for i in range(25):
        lb.take(f"k{i}", TOKEN_BUCKET, 1.0, 2)
    assert len(lb) <= 10
    clock.t += 10  # everything expired
    lb.take("fresh", TOKEN_BUCKET, 1.0, 2)
    assert len(lb) <= 10


@pytest.mark.parametrize("algorithm", [TOKEN_BUCKET, LEAKY_BUCKET])
@settings(max_examples=150, deadline=None)
@given(
    rate=st.floats(0.5, 50),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=120),
)
def test_never_more_than_burst_plus_refill(
    algorithm: str, rate: float, burst: int, gaps: list[float]
) -> None:
    clock = FakeClock(0.0)
    lb = LocalBuckets(clock)
    allowed = 0
    for gap in gaps:
        clock.t += gap
        d = lb.take("k", algorithm, rate, burst)
        allowed += d.allowed
        assert d.retry_after >= 0 and d.remaining >= 0 and d.delay >= 0
        if not d.allowed:
            # Retry-After is honest: after waiting it, the next request is admitted.
            _, again, _ = (token_bucket_step if algorithm == TOKEN_BUCKET else leaky_bucket_step)(
                lb._buckets[(algorithm, "k")][0], clock.t + d.retry_after + 1e-6, rate, burst
            )
            assert again.allowed
    assert allowed <= burst + rate * clock.t + 1e-6


def test_bad_bucket_arguments_are_value_errors() -> None:
    lb = LocalBuckets()
    with pytest.raises(ValueError):
        lb.take("k", "fixed_window", 1.0, 1)
    with pytest.raises(ValueError):
        lb.take("k", TOKEN_BUCKET, 0.0, 1)
    with pytest.raises(ValueError):
        lb.take("k", TOKEN_BUCKET, 1.0, 0.5)


def test_tiers_and_bucket_keys() -> None:
    gold = Tier(100, 200, "gold")
    tiers = Tiers(Tier(1, 5), {"key-abc": gold})
    assert tiers.for_key("key-abc") is gold
    assert tiers.for_key("other").name == "default"
    assert bucket_key("api", "10.0.0.1") == "rl:api:10.0.0.1"
    long = bucket_key("api", "x" * (MAX_KEY_BYTES + 1))
    assert long.startswith("rl:api:#") and len(long) < 50
    assert Decision(False, 0.2, 0).retry_after_header == "1"
    assert Decision(False, 2.01, 0).retry_after_header == "3"


def test_rate_limiter_uses_the_store_then_falls_back_per_node() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    tiers = Tiers(Tier(1.0, 2), {"vip": Tier(1.0, 4, "vip")})
    limiter = RateLimiter("api", TOKEN_BUCKET, tiers, store, local=LocalBuckets(clock), local_share=0.5)

    async def scenario() -> None:
        assert [(await limiter.check("a")).allowed for _ in range(3)] == [True, True, False]
        assert sum([(await limiter.check("vip")).allowed for _ in range(5)]) == 4
        store.fail = True
        d = await limiter.check("a")
        assert d.local and d.allowed  # local bucket: burst 2 * 0.5 = 1
        d = await limiter.check("a")
        assert d.local and not d.allowed and d.retry_after == pytest.approx(2.0)  # rate 1 * 0.5
        assert store.status.fallback_decisions_total == 2 and store.degraded

    run(scenario())


# --- memory store ----------------------------------------------------------------------------------------


def test_memory_store_ttl_slides_on_get() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)

    async def scenario() -> None:
        await store.set_backend("p", "s1", "web1", ttl=10)
        clock.t += 8
        assert await store.get_backend("p", "s1", ttl=10) == "web1"  # slides to t+18
        clock.t += 8
        assert await store.get_backend("p", "s1", ttl=10) == "web1"
        clock.t += 10
        assert await store.get_backend("p", "s1", ttl=10) is None
        await store.set_backend("p", "s2", "web2", ttl=10)
        await store.delete("p", "s2")
        assert await store.get_backend("p", "s2", ttl=10) is None
        store.fail = True
        with pytest.raises(StoreUnavailable):
            await store.get_backend("p", "s1", ttl=10)
        assert store.degraded
        store.fail = False
        await store.ping()
        assert not store.degraded

    run(scenario())


# --- sticky sessions -------------------------------------------------------------------------------------


def backends(n: int = 4) -> list[Backend]:
    return [Backend(f"web{i}", "127.0.0.1", 8000 + i) for i in range(1, n + 1)]


def test_session_ids_are_opaque_and_validated() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(valid_session_id(i) for i in ids)
    for bad in ("", "short", "x" * 23, "a" * 21 + "!", "../../etc/passwd/xxxxxx"):
        assert not valid_session_id(bad)


def test_decide_table() -> None:
    pool = backends(3)
    by_name = {b.name: b for b in pool}
    web1, web2, _ = pool
    pick2 = lambda: web2  # noqa: E731
    assert decide("web1", by_name, pick2).source == STORE
    assert decide("web1", by_name, pick2).write is False
    web1.draining = True
    assert decide("web1", by_name, pick2).backend is web1  # draining keeps existing sessions
    web1.draining, web1.healthy = False, False
    c = decide("web1", by_name, pick2)
    assert (c.backend, c.write, c.source) == (web2, True, REHOMED)
    web1.healthy = True
    c = decide("web1", by_name, pick2, exclude={web1})
    assert (c.backend, c.source) == (web2, REHOMED)
    c = decide("gone", by_name, pick2)  # removed from the pool
    assert (c.backend, c.source) == (web2, REHOMED)
    c = decide(None, by_name, pick2)
    assert (c.backend, c.write, c.source) == (web2, True, NEW)
    c = decide(None, by_name, lambda: None)
    assert (c.backend, c.write) == (None, False)


def sticky_setup(clock: FakeClock, pool: Sequence[Backend]) -> tuple[MemoryStore, StickySessions]:
    store = MemoryStore(clock)
    return store, StickySessions("app", pool, store, ttl=1800)


def test_sticky_new_sessions_follow_the_ring_and_stay() -> None:
    clock = FakeClock()
    pool = backends()
    _, sticky = sticky_setup(clock, pool)

    async def scenario() -> None:
        keys = [new_session_id() for _ in range(200)]
        first = {}
        for k in keys:
            c = await sticky.resolve(k)
            assert c.source == NEW and c.write and c.backend is sticky.ring_choice(k)
            assert await sticky.remember(k, c)
            first[k] = c.backend
        assert len({b.name for b in first.values()}) == 4  # spread over the pool
        for k in keys:
            c = await sticky.resolve(k)
            assert (c.backend, c.source, c.write) == (first[k], STORE, False)

    run(scenario())


def test_sticky_down_backend_rehomes_and_mapping_follows() -> None:
    clock = FakeClock()
    pool = backends()
    store, sticky = sticky_setup(clock, pool)

    async def scenario() -> None:
        keys = [new_session_id() for _ in range(100)]
        for k in keys:
            await sticky.remember(k, await sticky.resolve(k))
        victims = [k for k in keys if (await store.get_backend("app", k, 1800)) == "web2"]
        assert victims
        pool[1].healthy = False
        for k in victims:
            c = await sticky.resolve(k)
            assert c.source == REHOMED and c.write and c.backend is not pool[1] and c.backend.available
            await sticky.remember(k, c)
            assert await store.get_backend("app", k, 1800) == c.backend.name
        pool[1].healthy = True  # back up: the moved sessions stay where they are now
        for k in victims:
            assert (await sticky.resolve(k)).backend is not pool[1]

    run(scenario())


def test_sticky_removed_backend_and_draining_backend() -> None:
    clock = FakeClock()
    pool = backends()
    store, sticky = sticky_setup(clock, pool)

    async def scenario() -> None:
        keys = [new_session_id() for _ in range(200)]
        for k in keys:
            await sticky.remember(k, await sticky.resolve(k))
        on = {k: await store.get_backend("app", k, 1800) for k in keys}
        pool[0].draining = True
        sticky.update(pool)
        for k in keys:  # existing sessions on the draining web1 stay there
            assert (await sticky.resolve(k)).backend.name == on[k]
        for _ in range(100):  # new sessions never go to it
            assert (await sticky.resolve(new_session_id())).backend is not pool[0]
        sticky.update(pool[1:])  # web1 removed from the pool
        for k in keys:
            c = await sticky.resolve(k)
            if on[k] == "web1":
                assert c.source == REHOMED and c.backend.name != "web1"
            else:
                assert c.source == STORE and c.backend.name == on[k]

    run(scenario())


def test_sticky_falls_back_to_the_ring_when_the_store_fails() -> None:
    clock = FakeClock()
    pool = backends()
    store, sticky = sticky_setup(clock, pool)

    async def scenario() -> None:
        keys = [new_session_id() for _ in range(300)]
        on = {}
        for k in keys:
            c = await sticky.resolve(k)
            await sticky.remember(k, c)
            on[k] = c.backend
        store.fail = True
        for k in keys:
            c = await sticky.resolve(k)
            assert c.source == FALLBACK and not c.write
            assert c.backend is on[k]  # ring-assigned sessions all land on their backend
            assert await sticky.remember(k, c)  # nothing to write: no store call, no failure
        assert store.status.fallback_decisions_total == len(keys)
        assert sticky.counts[FALLBACK] == len(keys)
        pool[2].healthy = False  # down while degraded: its sessions move, the others stay
        for k in keys:
            c = await sticky.resolve(k)
            assert c.backend is not pool[2]
            if on[k] is not pool[2]:
                assert c.backend is on[k]
        store.fail = False
        assert await sticky.forget("nothing")

    run(scenario())


def test_sticky_new_sessions_reach_a_backup_only_while_no_other_backend_is_up() -> None:
    clock = FakeClock()
    pool = backends()
    pool[3].backup = True  # web4: the sorry server
    store, sticky = sticky_setup(clock, pool)

    async def scenario() -> None:
        keys = [new_session_id() for _ in range(200)]
        for k in keys:  # with the store, and (store.fail) from the ring alone
            assert (await sticky.resolve(k)).backend is not pool[3]
        store.fail = True
        assert all(sticky.ring_choice(k) is not pool[3] for k in keys)
        for b in pool[:3]:
            b.healthy = False
        assert {(await sticky.resolve(k)).backend for k in keys} == {pool[3]}
        pool[0].healthy = True
        assert {(await sticky.resolve(k)).backend for k in keys} == {pool[0]}

    run(scenario())


def test_sticky_custom_chooser_and_excluded_retry() -> None:
    clock = FakeClock()
    pool = backends(3)
    store = MemoryStore(clock)
    sticky = StickySessions("app", pool, store, ttl=60, choose_new=lambda key, exclude: pool[2])

    async def scenario() -> None:
        c = await sticky.resolve("sess")
        assert c.backend is pool[2] and c.source == NEW
        await sticky.remember("sess", c)
        c = await sticky.resolve("sess", exclude={pool[2]})  # connect to it failed: the proxy retries
        assert c.source == REHOMED  # the custom chooser was asked again
        with pytest.raises(ValueError):
            StickySessions("app", pool, store, ttl=0)

    run(scenario())


def test_remember_never_raises() -> None:
    clock = FakeClock()
    pool = backends(2)
    store, sticky = sticky_setup(clock, pool)

    async def scenario() -> None:
        c = await sticky.resolve("k")
        store.fail = True
        assert await sticky.remember("k", c) is False
        assert await sticky.forget("k") is False
        store.fail = False
        assert await sticky.remember("k", c) is True
        assert math.isclose(sticky.ttl, 1800)

    run(scenario())
