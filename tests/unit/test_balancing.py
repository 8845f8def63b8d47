"""Unit tests of every balancing policy: pure, deterministic (seeded RNGs, fake clock), no I/O, no sleeps."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halb.backend import Backend, RateMeter
from halb.balancing import Context, Policy, make_policy, policy_names
from halb.balancing.consistent_hash import ConsistentHash

ALL_POLICIES = [
    "consistent_hash",
    "custom_load",
    "ip_hash",
    "least_bandwidth",
    "least_connections",
    "least_response_time",
    "power_of_two_choices",
    "random",
    "round_robin",
    "weighted_least_connections",
    "weighted_round_robin",
]
HASH_POLICIES = ["consistent_hash", "ip_hash"]
# Policies whose split with no load on any backend follows effective_weight.
WEIGHTED_POLICIES = ["weighted_round_robin", "random", "power_of_two_choices", "custom_load"]


def backends(n: int, weights: Sequence[int] | None = None) -> list[Backend]:
    weights = list(weights) if weights is not None else [1] * n
    return [Backend(name=f"b{i}", host=f"10.0.0.{i + 1}", port=8080, weight=weights[i]) for i in range(n)]


def policy(name: str, bs: Sequence[Backend], seed: int = 1) -> Policy:
    return make_policy(name, bs, random.Random(seed))


def ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def ctx(i: int = 0, now: float = 0.0) -> Context:
    return Context(client_ip=ip(i), now=now)


def shares(p: Policy, picks: int, bs: Sequence[Backend]) -> list[float]:
    counts: Counter[Backend] = Counter()
    for i in range(picks):
        b = p.choose(ctx(i))
        assert b is not None
        counts[b] += 1
    return [counts[b] / picks for b in bs]


def owners(p: Policy, keys: int = 10_000) -> list[Backend | None]:
    return [p.choose(ctx(i)) for i in range(keys)]


def name_of(b: Backend | None) -> str:
    assert b is not None
    return b.name


def ring(bs: Sequence[Backend]) -> ConsistentHash:
    p = policy("consistent_hash", bs)
    assert isinstance(p, ConsistentHash)
    return p


# --- registry and availability, every policy ---------------------------------------------------------------


def test_every_policy_is_registered() -> None:
    assert policy_names() == ALL_POLICIES


def test_unknown_policy_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        make_policy("nope", backends(2))


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_policy_class_name_matches_config_name(name: str) -> None:
    p = policy(name, backends(2))
    assert type(p).name == name


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_none_without_backends(name: str) -> None:
    assert policy(name, []).choose(ctx()) is None


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_none_when_nothing_available(name: str) -> None:
    bs = backends(4)
    p = policy(name, bs)
    bs[0].healthy = False
    bs[1].draining = True
    bs[2].weight = 0
    for i in range(50):
        assert p.choose(ctx(i), exclude=[bs[3]]) is None
    bs[3].healthy = False
    p.update(bs)
    for i in range(50):
        assert p.choose(ctx(i)) is None


@pytest.mark.parametrize("name", ALL_POLICIES)
@pytest.mark.parametrize("call_update", [False, True])
def test_skips_unhealthy_draining_and_excluded(name: str, call_update: bool) -> None:
    bs = backends(5)
    p = policy(name, bs)
    bs[0].healthy = False
    bs[1].draining = True
    if call_update:
        p.update(bs)
    chosen = {p.choose(ctx(i), exclude={bs[2]}) for i in range(400)}
    assert chosen == {bs[3], bs[4]}


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_single_candidate_is_chosen(name: str) -> None:
    bs = backends(3)
    p = policy(name, bs)
    for i in range(30):
        assert p.choose(ctx(i), exclude=(bs[0], bs[2])) is bs[1]


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_update_with_new_list(name: str) -> None:
    bs = backends(4)
    p = policy(name, bs)
    for i in range(20):
        p.choose(ctx(i))
    p.update(bs[2:])
    assert {p.choose(ctx(i)) for i in range(300)} == set(bs[2:])
    p.update(bs)
    assert {p.choose(ctx(i)) for i in range(300)} == set(bs)


# --- rotation --------------------------------------------------------------------------------------------


def test_round_robin_even_spread() -> None:
    bs = backends(4)
    p = policy("round_robin", bs)
    assert shares(p, 400, bs) == [0.25] * 4
    assert [p.choose(ctx()) for _ in range(8)] == bs + bs


def test_round_robin_stays_even_when_one_is_down() -> None:
    bs = backends(4)
    p = policy("round_robin", bs)
    bs[1].healthy = False
    counts = Counter(p.choose(ctx()) for _ in range(300))
    assert counts == {bs[0]: 100, bs[2]: 100, bs[3]: 100}


@pytest.mark.parametrize("name", ["least_connections", "least_response_time", "least_bandwidth"])
def test_least_policies_rotate_ties(name: str) -> None:
    bs = backends(3)
    p = policy(name, bs)
    assert shares(p, 300, bs) == pytest.approx([1 / 3] * 3)
    # Ties among a subset rotate too, they do not always go to the first one.
    bs[0].active_connections = 5
    if name == "least_response_time":
        bs[0].response_time_ewma = 1.0
    if name == "least_bandwidth":
        bs[0].on_bytes(10_000, 0, 0.0)
    assert Counter(p.choose(ctx()) for _ in range(200)) == {bs[1]: 100, bs[2]: 100}


def test_least_connections_fills_evenly_while_held() -> None:
    bs = backends(3)
    p = policy("least_connections", bs)
    for _ in range(30):
        b = p.choose(ctx())
        assert b is not None
        b.on_connection_opened()
    assert [b.active_connections for b in bs] == [10, 10, 10]


# --- weighted round robin --------------------------------------------------------------------------------


def test_weighted_round_robin_proportions_and_smoothness() -> None:
    bs = backends(2, [1, 3])
    p = policy("weighted_round_robin", bs)
    seq = [p.choose(ctx()) for _ in range(4000)]
    light = seq.count(bs[0]) / len(seq)
    assert abs(light - 0.25) <= 0.02
    # Smooth: every window of 4 picks holds exactly one pick of the light backend...
    for i in range(len(seq) - 3):
        assert seq[i : i + 4].count(bs[0]) == 1
    # ...so the heavy one never gets a burst longer than 3.
    run = longest = 0
    for b in seq:
        run = run + 1 if b is bs[1] else 0
        longest = max(longest, run)
    assert longest <= 3


def test_weighted_round_robin_interleaves_5_1_1() -> None:
    bs = backends(3, [5, 1, 1])
    p = policy("weighted_round_robin", bs)
    seq = [name_of(p.choose(ctx())) for _ in range(7)]
    # nginx's documented example: a a b a c a a, never five a's in a row.
    assert seq == ["b0", "b0", "b1", "b0", "b2", "b0", "b0"]


# --- weighted random policies ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", WEIGHTED_POLICIES)
def test_weighted_proportions(name: str) -> None:
    bs = backends(3, [1, 2, 3])
    p = policy(name, bs, seed=42)
    got = shares(p, 30_000, bs)
    for g, want in zip(got, [1 / 6, 2 / 6, 3 / 6], strict=True):
        assert abs(g - want) <= 0.015


def test_random_is_reproducible_with_a_seed() -> None:
    bs = backends(5)
    a = [policy("random", bs, seed=9).choose(ctx()) for _ in range(50)]
    b = [policy("random", bs, seed=9).choose(ctx()) for _ in range(50)]
    assert a == b


def test_power_of_two_choices_prefers_the_less_loaded_of_two() -> None:
    bs = backends(2)
    p = policy("power_of_two_choices", bs, seed=3)
    bs[0].active_connections = 10
    assert {p.choose(ctx()) for _ in range(100)} == {bs[1]}


def test_power_of_two_choices_avoids_the_most_loaded() -> None:
    bs = backends(10)
    p = policy("power_of_two_choices", bs, seed=5)
    bs[0].active_connections = 100
    # bs[0] can only win if drawn twice, and the two draws are distinct.
    assert bs[0] not in {p.choose(ctx()) for _ in range(2000)}


# --- slow start ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WEIGHTED_POLICIES)
def test_slow_start_reduces_share(name: str) -> None:
    bs = backends(2)
    bs[0].slowstart_factor = 0.1
    p = policy(name, bs, seed=11)
    got = shares(p, 20_000, bs)
    assert abs(got[0] - 0.1 / 1.1) <= 0.02


@pytest.mark.parametrize("name", ["weighted_least_connections", "least_response_time"])
def test_slow_start_reduces_share_of_held_connections(name: str) -> None:
    bs = backends(2)
    for b in bs:
        b.on_response(0.05)
    bs[0].slowstart_factor = 0.1
    p = policy(name, bs)
    for _ in range(1100):
        b = p.choose(ctx())
        assert b is not None
        b.on_connection_opened()
    assert abs(bs[0].active_connections / 1100 - 0.1 / 1.1) <= 0.02


def test_weighted_least_connections_follows_weights() -> None:
    bs = backends(3, [1, 2, 5])
    p = policy("weighted_least_connections", bs)
    for _ in range(800):
        b = p.choose(ctx())
        assert b is not None
        b.on_connection_opened()
    assert [b.active_connections for b in bs] == [100, 200, 500]


# --- hashing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HASH_POLICIES)
def test_hash_is_sticky(name: str) -> None:
    bs = backends(5)
    p = policy(name, bs)
    first = owners(p, 500)
    other = policy(name, bs, seed=99)
    assert owners(other, 500) == first
    assert owners(p, 500) == first
    assert p.choose(Context(client_ip="1.2.3.4", key="session-7")) is p.choose(Context(key="session-7"))


@pytest.mark.parametrize("name", HASH_POLICIES)
def test_hash_spreads_keys_by_weight(name: str) -> None:
    bs = backends(2, [1, 3])
    got = shares(policy(name, bs), 10_000, bs)
    assert abs(got[0] - 0.25) <= 0.05


@pytest.mark.parametrize("name", HASH_POLICIES)
def test_hash_is_stable_across_processes(name: str) -> None:
    # Golden values: Python's hash() is salted per process, so this would fail at random if it were used.
    bs = backends(5)
    p = policy(name, bs)
    got = [name_of(p.choose(Context(key=f"user-{i}"))) for i in range(12)]
    assert got == GOLDEN[name]


GOLDEN: dict[str, list[str]] = {
    "consistent_hash": ["b3", "b1", "b4", "b2", "b1", "b0", "b4", "b0", "b1", "b0", "b1", "b3"],
    "ip_hash": ["b3", "b3", "b4", "b3", "b0", "b0", "b1", "b4", "b3", "b2", "b1", "b4"],
}


@pytest.mark.parametrize("n", [3, 5, 10])
def test_consistent_hash_removal_moves_only_the_removed_backends_keys(n: int) -> None:
    bs = backends(n)
    p = policy("consistent_hash", bs)
    before = owners(p)
    removed = bs[n // 2]
    p.update([b for b in bs if b is not removed])
    after = owners(p)
    moved = [i for i, (x, y) in enumerate(zip(before, after, strict=True)) if x is not y]
    assert len(moved) <= 1.2 / n * len(before)
    assert all(before[i] is removed for i in moved)
    # And they come back when it is re-added.
    p.update(bs)
    assert owners(p) == before


@pytest.mark.parametrize("n", [3, 5, 10])
def test_ip_hash_removal_moves_most_keys(n: int) -> None:
    bs = backends(n)
    chash = policy("consistent_hash", bs)
    table = policy("ip_hash", bs)
    before_ring, before_table = owners(chash), owners(table)
    survivors = [b for b in bs if b is not bs[n // 2]]
    chash.update(survivors)
    table.update(survivors)
    moved_ring = sum(x is not y for x, y in zip(before_ring, owners(chash), strict=True))
    moved_table = sum(x is not y for x, y in zip(before_table, owners(table), strict=True))
    assert moved_table > moved_ring
    if n == 5:
        assert moved_table > 0.5 * len(before_table)


@pytest.mark.parametrize("name", HASH_POLICIES)
@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("call_update", [False, True])
def test_unhealthy_backend_moves_only_its_keys(name: str, n: int, call_update: bool) -> None:
    bs = backends(n)
    p = policy(name, bs)
    before = owners(p)
    down = bs[1]
    down.healthy = False
    if call_update:
        p.update(bs)
    after = owners(p)
    for x, y in zip(before, after, strict=True):
        if x is down:
            assert y is not down and y is not None
        else:
            assert y is x
    # The orphaned keys scatter over the survivors rather than piling onto one.
    targets = Counter(y for x, y in zip(before, after, strict=True) if x is down)
    assert len(targets) == n - 1
    assert max(targets.values()) < 0.8 * sum(targets.values())
    down.healthy = True
    if call_update:
        p.update(bs)
    assert owners(p) == before


@pytest.mark.parametrize("name", HASH_POLICIES)
def test_excluded_backend_moves_only_its_keys(name: str) -> None:
    bs = backends(5)
    p = policy(name, bs)
    before = owners(p, 2000)
    after = [p.choose(ctx(i), exclude=(bs[2],)) for i in range(2000)]
    for x, y in zip(before, after, strict=True):
        assert y is not None and y is not bs[2]
        if x is not bs[2]:
            assert y is x


def test_consistent_hash_ring_not_rebuilt_on_health_flips() -> None:
    bs = backends(4, [1, 2, 1, 1])
    p = ring(bs)
    assert p.ring_builds == 1
    assert p.ring_size == 160 * 5
    bs[0].healthy = False
    bs[1].draining = True
    bs[2].slowstart_factor = 0.2
    bs[3].load = 0.9
    p.update(bs)
    p.update(list(bs))
    assert p.ring_builds == 1
    bs[1].weight = 3
    p.update(bs)
    assert p.ring_builds == 2
    assert p.ring_size == 160 * 6
    p.update(bs[:3])
    assert p.ring_builds == 3


def test_consistent_hash_ring_size_is_capped() -> None:
    bs = backends(50, [100] * 50)
    p = ring(bs)
    assert p.ring_size <= 160 * 256 + 50
    got = shares(p, 5000, bs)
    assert max(got) < 0.05


# --- load-aware policies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["least_connections", "weighted_least_connections", "least_response_time", "power_of_two_choices"]
)
def test_slow_backend_gets_far_fewer_requests(name: str) -> None:
    """Fake clock: a request every 0.25 s; the slow backend takes 10 s per request, the fast one 1 s."""
    slow, fast = Backend("slow", "10.0.0.1", 80), Backend("fast", "10.0.0.2", 80)
    service = {slow: 10.0, fast: 1.0}

    def run(policy_name: str) -> float:
        for b in (slow, fast):
            b.active_connections, b.response_time_ewma = 0, None
        p = policy(policy_name, [slow, fast], seed=4)
        in_flight: list[tuple[float, int, Backend, float]] = []  # (finish, seq, backend, start)
        picks: Counter[Backend] = Counter()
        for k in range(2000):
            now = k * 0.25
            while in_flight and in_flight[0][0] <= now:
                finish, _, done, start = heapq.heappop(in_flight)
                done.on_connection_closed()
                done.on_response(finish - start)
            b = p.choose(ctx(k, now))
            assert b is not None
            b.on_connection_opened()
            picks[b] += 1
            heapq.heappush(in_flight, (now + service[b], k, b, now))
        return picks[slow] / 2000

    assert run(name) < 0.2  # ideal is about 1/11
    assert run("round_robin") == 0.5  # the contrast: blind rotation gives it half


def test_least_response_time_prefers_the_fast_backend() -> None:
    fast, slow = backends(2)
    for _ in range(5):
        fast.on_response(0.01)
        slow.on_response(0.5)
    p = policy("least_response_time", [slow, fast])
    assert {p.choose(ctx()) for _ in range(20)} == {fast}
    # Held connections push the fast one's expected wait up until the slow one is worth a try.
    for _ in range(100):
        b = p.choose(ctx())
        assert b is not None
        b.on_connection_opened()
    assert fast.active_connections > 45 * slow.active_connections


def test_least_response_time_tries_unmeasured_backends() -> None:
    a, b, new = backends(3)
    a.on_response(0.01)
    b.on_response(0.02)
    p = policy("least_response_time", [a, b, new])
    assert p.choose(ctx()) is new


def test_least_bandwidth_prefers_the_idle_backend() -> None:
    busy, idle = backends(2)
    busy.on_bytes(1_000_000, 4_000_000, now=10.0)
    p = policy("least_bandwidth", [busy, idle])
    assert {p.choose(ctx(i, now=10.5)) for i in range(20)} == {idle}


def test_least_bandwidth_balances_traffic_over_time() -> None:
    bs = backends(2, [1, 3])
    p = policy("least_bandwidth", bs)
    for k in range(4000):
        now = k * 0.01
        b = p.choose(ctx(k, now))
        assert b is not None
        b.on_bytes(1000, 10_000, now)
    total = sum(b.bytes_from_backend for b in bs)
    assert abs(bs[0].bytes_from_backend / total - 0.25) <= 0.03


def test_the_bandwidth_meter_matches_the_exact_decay_when_adds_come_faster_than_its_window() -> None:
    # Many small adds within RATE_WINDOW are folded in without a decay each: the rate stays within 0.5% of
    # the exact sum(n * exp(-(now - t) / tau)) / tau.
    meter = RateMeter()
    exact, tau = 0.0, meter.tau
    t = 100.0
    for _ in range(3000):
        meter.add(500, t)
        exact += 500 * math.exp(-(103.0 - t) / tau)
        t += 0.000_9  # ~1,100 adds per second: several per window
    assert meter.rate(103.0) == pytest.approx(exact / tau, rel=0.005)
    assert meter.rate(200.0) < 1e-9 * exact  # and it still decays to nothing


def test_one_exchange_counts_what_its_three_calls_count() -> None:
    a, b = backends(2)
    for x in (a, b):
        x.on_connection_opened()
        x.on_connection_opened()
    a.on_response(0.2)
    a.on_connection_closed()
    a.on_bytes(100, 900, 5.0)
    b.on_exchange(0.2, 100, 900, 5.0)
    for attr in ("requests_total", "response_time_ewma", "active_connections", "bytes_to_backend"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.bytes_from_backend == b.bytes_from_backend == 900
    assert a.bandwidth.rate(6.0) == b.bandwidth.rate(6.0) > 0


def test_custom_load_lower_load_gets_more_traffic() -> None:
    bs = backends(3)
    for b, load in zip(bs, [0.1, 0.5, 0.9], strict=True):
        b.load = load
    got = shares(policy("custom_load", bs), 9000, bs)
    for g, want in zip(got, [0.9 / 1.5, 0.5 / 1.5, 0.1 / 1.5], strict=True):
        assert abs(g - want) <= 0.02


def test_custom_load_full_backend_keeps_a_trickle() -> None:
    bs = backends(2)
    bs[0].load, bs[1].load = 1.0, 0.0
    got = shares(policy("custom_load", bs), 2100, bs)
    assert abs(got[0] - 0.05 / 1.05) <= 0.01


def test_custom_load_unknown_load_is_neutral() -> None:
    bs = backends(3)
    bs[0].load, bs[1].load, bs[2].load = 0.2, None, 0.6
    got = shares(policy("custom_load", bs), 9000, bs)
    # The unknown one is treated as the mean known load, 0.4: weights 0.8 : 0.6 : 0.4.
    for g, want in zip(got, [0.8 / 1.8, 0.6 / 1.8, 0.4 / 1.8], strict=True):
        assert abs(g - want) <= 0.02


def test_custom_load_no_agent_at_all_uses_plain_weights() -> None:
    bs = backends(3, [1, 1, 2])
    got = shares(policy("custom_load", bs), 4000, bs)
    assert got == pytest.approx([0.25, 0.25, 0.5], abs=0.01)


def test_custom_load_ignores_out_of_range_reports() -> None:
    bs = backends(3)
    bs[0].load, bs[1].load, bs[2].load = -3.0, 7.0, float("nan")
    got = shares(policy("custom_load", bs), 4000, bs)
    # -3 -> 0 (weight 1), 7 -> 1 (weight 0.05), nan -> unknown -> mean 0.5 (weight 0.5).
    for g, want in zip(got, [1 / 1.55, 0.05 / 1.55, 0.5 / 1.55], strict=True):
        assert abs(g - want) <= 0.02


# --- property: any policy, any availability pattern ------------------------------------------------------

backend_state = st.fixed_dictionaries(
    {
        "healthy": st.booleans(),
        "draining": st.booleans(),
        "weight": st.integers(min_value=0, max_value=5),
        "slowstart": st.sampled_from([0.01, 0.1, 0.5, 1.0]),
        "active": st.integers(min_value=0, max_value=20),
        "ewma": st.none() | st.floats(min_value=0.0, max_value=5.0),
        "load": st.none() | st.floats(min_value=0.0, max_value=1.0),
        "bytes": st.integers(min_value=0, max_value=10**6),
        "excluded": st.booleans(),
    }
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(ALL_POLICIES),
    states=st.lists(backend_state, max_size=8),
    call_update=st.booleans(),
    keys=st.lists(st.text(max_size=12), min_size=1, max_size=5),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_property_choice_is_available_and_not_excluded(
    name: str, states: list[dict[str, Any]], call_update: bool, keys: list[str], seed: int
) -> None:
    bs = backends(len(states))
    p = policy(name, bs, seed)
    for i in range(3):  # some history under the all-healthy layout first
        p.choose(ctx(i))
    exclude: set[Backend] = set()
    for b, s in zip(bs, states, strict=True):
        b.healthy, b.draining, b.weight = s["healthy"], s["draining"], s["weight"]
        b.slowstart_factor, b.active_connections = s["slowstart"], s["active"]
        b.response_time_ewma, b.load = s["ewma"], s["load"]
        b.on_bytes(s["bytes"], 0, now=1.0)
        if s["excluded"]:
            exclude.add(b)
    if call_update:
        p.update(bs)
    allowed = {b for b in bs if b.available and b not in exclude}
    for k, key in enumerate(keys):
        got = p.choose(Context(key=key, now=1.0 + k), exclude=exclude)
        if allowed:
            assert got in allowed
        else:
            assert got is None
