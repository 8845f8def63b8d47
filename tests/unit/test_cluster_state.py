"""The replicated state: deterministic, validated, and the lease rule -- without pysyncobj."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from halb.cluster.lease import takeover_delay
from halb.cluster.state import ClusterState, seed_command
from halb.config import parse

SEED = {
    "op": "seed",
    "pools": {
        "app": {
            "algorithm": "round_robin",
            "backends": [
                {"name": "a", "address": "10.0.0.1:80"},
                {"name": "b", "address": "10.0.0.2:80", "weight": 3},
            ],
        }
    },
}


def seeded() -> ClusterState:
    state = ClusterState()
    assert state.apply(copy.deepcopy(SEED))["ok"]
    return state


# --- configuration ---------------------------------------------------------------------------------------
def test_seed_adds_missing_pools_and_never_overwrites() -> None:
    state = seeded()
    assert state.version == 1
    assert [b["name"] for b in state.pools["app"]["backends"]] == ["a", "b"]
    assert state.pools["app"]["backends"][0] == {
        "name": "a",
        "address": "10.0.0.1:80",
        "weight": 1,
        "draining": False,
        "agent": None,
    }
    again = copy.deepcopy(SEED)
    again["pools"]["app"]["backends"] = [{"name": "z", "address": "10.0.0.9:80"}]
    again["pools"]["api"] = {"backends": [{"name": "x", "address": "10.0.0.5:8080"}]}
    result = state.apply(again)
    assert result == {"ok": True, "added": ["api"], "kept": ["app"], "version": 2}
    assert [b["name"] for b in state.pools["app"]["backends"]] == ["a", "b"]  # the state wins
    assert state.pools["api"]["algorithm"] == "round_robin"
    assert state.apply(copy.deepcopy(SEED)) == {"ok": True, "added": [], "kept": ["app"], "version": 2}


def test_seed_command_from_a_toml_config() -> None:
    config = parse(
        {
            "node": {"name": "lb1"},
            "pools": {
                "app": {
                    "algorithm": "least_connections",
                    "backends": [{"name": "w", "address": "10.0.0.3:80", "agent": "10.0.0.3:9000"}],
                }
            },
        }
    )
    state = ClusterState()
    assert state.apply(seed_command(config.pools))["ok"]
    assert state.pools["app"] == {
        "algorithm": "least_connections",
        "backends": [
            {"name": "w", "address": "10.0.0.3:80", "weight": 1, "draining": False, "agent": "10.0.0.3:9000"}
        ],
    }


def test_backend_commands() -> None:
    state = seeded()
    r = state.apply({"op": "add_backend", "pool": "app", "backend": {"name": "c", "address": "10.0.0.3:80"}})
    assert r["ok"] and r["version"] == 2 and r["backend"]["name"] == "c"
    assert state.apply({"op": "set_backend", "pool": "app", "name": "c", "draining": True})["ok"]
    assert state.apply({"op": "set_backend", "pool": "app", "name": "c", "weight": 0})["ok"]
    assert state.pools["app"]["backends"][2] == {
        "name": "c",
        "address": "10.0.0.3:80",
        "weight": 0,
        "draining": True,
        "agent": None,
    }
    assert state.apply({"op": "set_algorithm", "pool": "app", "algorithm": "least_connections"})["ok"]
    assert state.apply({"op": "remove_backend", "pool": "app", "name": "a"})["ok"]
    assert [b["name"] for b in state.pools["app"]["backends"]] == ["b", "c"]
    assert state.version == 6


def test_rejections_name_the_problem_and_change_nothing() -> None:
    def add(pool: str = "app", **backend: Any) -> dict[str, Any]:
        return {"op": "add_backend", "pool": pool, "backend": {"name": "c", "address": "h:1", **backend}}

    def put(name: str = "a", **fields: Any) -> dict[str, Any]:
        return {"op": "set_backend", "pool": "app", "name": name, **fields}

    nan = float("nan")
    cases: list[tuple[Any, str, str]] = [
        ("not a dict", "invalid", "must be an object"),
        ({"op": "nope"}, "invalid", "unknown op"),
        (add("zz"), "not_found", "no pool"),
        (add(name="a"), "conflict", "already"),
        (add(address="h"), "invalid", "HOST:PORT"),
        (add(x=1), "invalid", "x"),
        (add(weight=300), "invalid", "weight"),
        (add(name="bad name"), "invalid", "name"),
        (put(), "invalid", "nothing to set"),
        (put(weight=2, draining="yes"), "invalid", "draining"),
        (put("zz", weight=2), "not_found", "no backend"),
        ({"op": "set_algorithm", "pool": "app", "algorithm": "fastest"}, "invalid", "algorithm"),
        ({"op": "seed", "pools": {"p": {"backends": []}}}, "invalid", "non-empty"),
        (
            {"op": "seed", "pools": {"p": {"backends": [{"name": "a", "address": "h:1"}] * 2}}},
            "invalid",
            "twice",
        ),
        ({"op": "register", "node": "lb1", "address": "10.0.0.1:7000", "role": "boss"}, "invalid", "role"),
        (lease_cmd("acquire", "lb1", nan), "invalid", "finite"),
        ({**lease_cmd("acquire", "lb1"), "duration": 0}, "invalid", "duration"),
        (lease_cmd("renew", "lb1"), "not_found", "does not hold"),
        ({"op": "release", "lease": "vip", "node": "lb1"}, "not_found", "does not hold"),
    ]
    for command, code, words in cases:
        state = seeded()
        before = state.to_dict()
        result = state.apply(command)
        assert result["ok"] is False, command
        assert result["code"] == code, (command, result)
        assert words in result["error"], (command, result)
        assert state.to_dict() == before, command
    state = seeded()
    state.apply({"op": "remove_backend", "pool": "app", "name": "a"})
    last = state.apply({"op": "remove_backend", "pool": "app", "name": "b"})
    assert last["code"] == "conflict" and "drain it instead" in last["error"]


def test_register_members() -> None:
    state = ClusterState()
    ok = {
        "op": "register",
        "node": "lb1",
        "address": "10.0.0.1:7000",
        "admin": "10.0.0.1:9901",
        "role": "balancer",
    }
    assert state.apply(ok)["ok"]
    clash = {**ok, "node": "lb2"}
    assert state.apply(clash)["code"] == "conflict"
    assert state.members == {
        "lb1": {"address": "10.0.0.1:7000", "admin": "10.0.0.1:9901", "role": "balancer"}
    }
    assert state.version == 0  # membership is not configuration


# --- the lease rule ---------------------------------------------------------------------------------------
def lease_cmd(op: str, node: str, now: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"op": op, "lease": "vip", "node": node, "now": now, "duration": 2.0, **extra}


def test_free_lease_is_granted_and_renewed_only_by_its_holder() -> None:
    state = ClusterState()
    r = state.apply(lease_cmd("acquire", "lb1", 100.0))
    assert r["ok"] and r["holder"] == "lb1" and r["seq"] == 1
    assert state.apply(lease_cmd("renew", "lb1", 100.7))["seq"] == 2
    denied = state.apply(lease_cmd("renew", "lb2", 5.0))
    assert denied["ok"] is False and denied["holder"] == "lb1"
    assert state.apply(lease_cmd("acquire", "lb1", 101.0))["seq"] == 3  # the holder may re-acquire
    assert state.apply({"op": "release", "lease": "vip", "node": "lb2"})["ok"] is False
    released = state.apply({"op": "release", "lease": "vip", "node": "lb1"})
    assert released["ok"] and released["holder"] is None and released["seq"] == 4
    assert state.apply(lease_cmd("acquire", "lb2", 7.0))["holder"] == "lb2"


def test_takeover_needs_the_current_seq_seen_for_a_full_takeover_delay() -> None:
    state = ClusterState()
    state.apply(lease_cmd("acquire", "lb1", 100.0))  # lb1's clock
    wait = takeover_delay(2.0)
    # lb2's clock: it saw seq 1 applied at 50.0
    early = state.apply(
        lease_cmd("acquire", "lb2", 50.0 + wait - 0.01, seen={"holder": "lb1", "seq": 1, "at": 50.0})
    )
    assert early["ok"] is False and early["code"] == "held" and 0 < early["retry_in"] <= 0.011
    blind = state.apply(lease_cmd("acquire", "lb2", 1000.0))
    assert blind["ok"] is False and blind["retry_in"] == round(wait, 3)
    stale = state.apply(lease_cmd("acquire", "lb2", 1000.0, seen={"holder": "lb1", "seq": 0, "at": 0.0}))
    assert stale["ok"] is False
    taken = state.apply(
        lease_cmd("acquire", "lb2", 50.0 + wait, seen={"holder": "lb1", "seq": 1, "at": 50.0})
    )
    assert taken["ok"] and taken["holder"] == "lb2" and taken["previous"] == "lb1" and taken["seq"] == 2
    # lb1's late renewal is refused: it lost the lease
    assert state.apply(lease_cmd("renew", "lb1", 101.9))["ok"] is False


def test_a_renewal_in_between_defeats_a_takeover() -> None:
    state = ClusterState()
    state.apply(lease_cmd("acquire", "lb1", 100.0))
    state.apply(lease_cmd("renew", "lb1", 100.6))  # seq 2, committed before lb2's acquire
    late = state.apply(lease_cmd("acquire", "lb2", 99.0, seen={"holder": "lb1", "seq": 1, "at": 10.0}))
    assert late["ok"] is False and late["seq"] == 2
    assert state.leases["vip"]["holder"] == "lb1"


# --- Hypothesis: determinism and "rejected means unchanged" ----------------------------------------------
names = st.sampled_from(["a", "b", "c", "lb1", "lb2", "bad name", ""])
pools = st.sampled_from(["app", "api", "zz"])
addresses = st.sampled_from(["10.0.0.1:80", "10.0.0.2:8080", "[::1]:81", "nope", "h:0", "h:70000"])
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-5, 5000),
    st.sampled_from([True, "1", None]),
)
backend = st.fixed_dictionaries(
    {"name": names, "address": addresses},
    optional={"weight": st.one_of(st.integers(-1, 300), st.booleans()), "draining": st.booleans()},
)
seen = st.fixed_dictionaries({"holder": names, "seq": st.integers(0, 5), "at": numbers})
pool_def = st.fixed_dictionaries(
    {"backends": st.lists(backend, max_size=3)},
    optional={"algorithm": st.sampled_from(["round_robin", "least_connections", "nope"])},
)
commands = st.one_of(
    st.fixed_dictionaries({"op": st.just("seed"), "pools": st.dictionaries(pools, pool_def, max_size=2)}),
    st.fixed_dictionaries({"op": st.just("add_backend"), "pool": pools, "backend": backend}),
    st.fixed_dictionaries({"op": st.just("remove_backend"), "pool": pools, "name": names}),
    st.fixed_dictionaries(
        {"op": st.just("set_backend"), "pool": pools, "name": names},
        optional={"weight": st.integers(-1, 300), "draining": st.booleans()},
    ),
    st.fixed_dictionaries(
        {"op": st.just("set_algorithm"), "pool": pools, "algorithm": st.sampled_from(["random", "x"])}
    ),
    st.fixed_dictionaries(
        {
            "op": st.sampled_from(["acquire", "renew"]),
            "lease": st.just("vip"),
            "node": names,
            "now": numbers,
            "duration": numbers,
        },
        optional={"seen": seen},
    ),
    st.fixed_dictionaries({"op": st.just("release"), "lease": st.just("vip"), "node": names}),
    st.fixed_dictionaries(
        {
            "op": st.just("register"),
            "node": names,
            "address": addresses,
            "role": st.sampled_from(["witness", "x"]),
        }
    ),
    st.dictionaries(st.sampled_from(["op", "pool", "name"]), st.integers(), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(commands, max_size=25))
def test_any_command_sequence_gives_equal_replicas_and_rejections_change_nothing(
    sequence: list[dict[str, Any]],
) -> None:
    one, two = seeded(), seeded()
    for command in sequence:
        before = one.to_dict()
        r1 = one.apply(copy.deepcopy(command))
        r2 = two.apply(copy.deepcopy(command))
        assert r1 == r2
        assert one == two
        assert r1.get("code") != "internal", r1
        if not r1["ok"]:
            assert one.to_dict() == before
        for pool in one.pools.values():  # invariants
            names_ = [b["name"] for b in pool["backends"]]
            assert names_ and len(names_) == len(set(names_))
    assert ClusterState.from_dict(one.to_dict()) == one
