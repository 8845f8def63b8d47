"""From the shared configuration to runtime pools; the admin API's token check; pysyncobj's configuration
and the state's dump round trip (no network)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from halb.admin import AdminServer
from halb.cluster.api import ClusterApi
from halb.cluster.raft import Applied, CommandFailed, RaftTimings, _Store, make_conf, raft_id
from halb.cluster.state import ClusterState, seed_command
from halb.cluster.sync import change_kind, merge_pools
from halb.config import parse
from halb.config_model import ClusterSettings, HostPort
from halb.pool import Pool

TOML = parse(
    {
        "node": {"name": "lb1"},
        "pools": {
            "app": {
                "algorithm": "round_robin",
                "health": {"kind": "http", "interval": 0.5, "timeout": 0.3},
                "backends": [
                    {"name": "a", "address": "10.0.0.1:80"},
                    {"name": "b", "address": "10.0.0.2:80"},
                ],
            },
            "local": {"backends": [{"name": "x", "address": "10.0.0.9:80"}]},
        },
    }
)


def shared(*backends: dict[str, Any], algorithm: str = "round_robin") -> dict[str, Any]:
    return {"app": {"algorithm": algorithm, "backends": list(backends)}}


def rec(name: str, address: str, weight: int = 1, draining: bool = False) -> dict[str, Any]:
    return {"name": name, "address": address, "weight": weight, "draining": draining, "agent": None}


def test_merge_keeps_local_health_and_pools_the_cluster_lacks() -> None:
    merged = merge_pools(TOML.pools, {**shared(rec("a", "10.0.0.1:80", 5)), "other": {}})
    assert set(merged) == {"app", "local"}  # a shared pool no listener here uses is ignored
    app = merged["app"]
    assert [(b.name, b.weight) for b in app.backends] == [("a", 5)]
    assert app.health == TOML.pools["app"].health  # health checks stay per node
    assert merged["local"] is TOML.pools["local"]


def test_change_kinds() -> None:
    old = TOML.pools["app"]
    same = merge_pools(TOML.pools, shared(rec("a", "10.0.0.1:80"), rec("b", "10.0.0.2:80")))["app"]
    assert change_kind(old, same) == "none"
    drained = merge_pools(TOML.pools, shared(rec("a", "10.0.0.1:80"), rec("b", "10.0.0.2:80", 3, True)))
    assert change_kind(old, drained["app"]) == "state"
    added = merge_pools(
        TOML.pools, shared(rec("a", "10.0.0.1:80"), rec("b", "10.0.0.2:80"), rec("c", "10.0.0.3:80"))
    )
    assert change_kind(old, added["app"]) == "rebuild"
    moved = merge_pools(TOML.pools, shared(rec("a", "10.0.0.1:80"), rec("b", "10.0.0.7:80")))
    assert change_kind(old, moved["app"]) == "rebuild"
    other = merge_pools(
        TOML.pools, shared(rec("a", "10.0.0.1:80"), rec("b", "10.0.0.2:80"), algorithm="least_connections")
    )
    assert change_kind(old, other["app"]) == "rebuild"


def test_pool_reconfigure_keeps_unchanged_backends() -> None:
    pool = Pool(TOML.pools["app"])
    a, b = pool.backends
    a.healthy, a.requests_total = False, 7
    new = merge_pools(
        TOML.pools,
        shared(
            rec("a", "10.0.0.1:80", 4), rec("b", "10.0.0.8:80"), rec("c", "10.0.0.3:80"), algorithm="random"
        ),
    )["app"]
    kept = pool.reconfigure(new)
    assert kept == {"a"}
    assert pool.backends[0] is a and (a.weight, a.healthy, a.requests_total) == (4, False, 7)
    assert pool.backends[1] is not b and pool.backends[1].port == 80 and pool.backends[1].host == "10.0.0.8"
    assert [x.name for x in pool.backends] == ["a", "b", "c"]
    assert pool.get("c") is pool.backends[2]
    assert pool.policy.name == "random"
    assert pool.config is new


def test_a_backends_maxconn_and_backup_flag_survive_the_shared_configuration() -> None:
    # The TOML seeds the cluster; every node then builds its pools from the shared records. A backend's
    # own maxconn and its backup flag must come back out (maxconn used to be dropped here).
    toml = parse(
        {
            "node": {"name": "lb1"},
            "pools": {
                "app": {
                    "backends": [
                        {"name": "a", "address": "10.0.0.1:80", "maxconn": 7},
                        {"name": "b", "address": "10.0.0.2:80"},
                        {"name": "sorry", "address": "10.0.0.3:80", "backup": True},
                    ]
                }
            },
        }
    )
    state = ClusterState()
    assert state.apply(seed_command(toml.pools))["ok"]
    records = state.config_view()["pools"]["app"]["backends"]
    assert "maxconn" not in records[1] and "backup" not in records[1]  # unset: as older members wrote
    merged = merge_pools(toml.pools, state.config_view()["pools"])["app"]
    assert [(b.name, b.maxconn, b.backup) for b in merged.backends] == [
        ("a", 7, False),
        ("b", None, False),
        ("sorry", None, True),
    ]
    assert change_kind(toml.pools["app"], merged) == "none"
    result = state.apply(
        {"op": "add_backend", "pool": "app", "backend": {"name": "c", "address": "10.0.0.4:80", "backup": 1}}
    )
    assert result == {"ok": False, "code": "invalid", "error": "backup must be true or false, got 1"}
    # At least one backend that is not a backup stays, as the TOML loader requires.
    assert state.apply({"op": "remove_backend", "pool": "app", "name": "a"})["ok"]
    refused = state.apply({"op": "remove_backend", "pool": "app", "name": "b"})
    assert refused == {"ok": False, "code": "conflict", "error": "pool 'app' would have only backup backends"}


# --- the admin API: token and routing -----------------------------------------------------------------------
class _Member:
    def __init__(self) -> None:
        self.state_ = ClusterState()
        self.state_.apply({"op": "seed", "pools": shared(rec("a", "10.0.0.1:80"))})
        self.fail: CommandFailed | None = None

    async def submit(self, command: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        return self.state_.apply(command)

    def state(self) -> dict[str, Any]:
        return self.state_.to_dict()


class _Node:
    state = "serving"

    def status(self) -> dict[str, Any]:
        return {}


def call(server: AdminServer, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    async def go() -> tuple[int, dict[str, Any]]:
        raw = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(raw)}\r\n"
        if token is not None:
            head += f"Authorization: Bearer {token}\r\n"
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await server._api((head + "\r\n").encode(), reader)

    return asyncio.run(go())


TOKEN = "0123456789abcdef-token"


def test_mutations_need_the_token() -> None:
    server = AdminServer(HostPort("127.0.0.1", 0), _Node(), ClusterApi(_Member(), "lb1"), TOKEN)
    body = {"name": "b", "address": "10.0.0.2:80"}
    status, doc = call(server, "POST", "/api/pools/app/backends", body)
    assert status == 401 and "Authorization: Bearer" in doc["error"]
    status, doc = call(server, "POST", "/api/pools/app/backends", body, token="wrong-token-wrong")
    assert status == 403 and "invalid token" in doc["error"]
    status, doc = call(server, "POST", "/api/pools/app/backends", body, token=TOKEN)
    assert status == 201 and doc["ok"] and doc["result"]["backend"]["name"] == "b"
    status, doc = call(server, "GET", "/api/config")  # reading needs no token
    assert status == 200 and [b["name"] for b in doc["pools"]["app"]["backends"]] == ["a", "b"]


def test_api_routes_and_errors() -> None:
    member = _Member()
    server = AdminServer(HostPort("127.0.0.1", 0), _Node(), ClusterApi(member, "lb1"), TOKEN)
    assert call(server, "PUT", "/api/pools/app/backends/a", {"draining": True}, TOKEN)[0] == 200
    assert call(server, "PUT", "/api/pools/app/backends/a", {"weight": 9}, TOKEN)[0] == 200
    assert member.state_.pools["app"]["backends"][0]["weight"] == 9
    assert call(server, "PUT", "/api/pools/app/backends/a", {"colour": 1}, TOKEN)[0] == 400
    assert call(server, "PUT", "/api/pools/app", {"algorithm": "ip_hash"}, TOKEN)[0] == 200
    assert call(server, "DELETE", "/api/pools/app/backends/zz", None, TOKEN)[0] == 404
    assert call(server, "DELETE", "/api/pools/app/backends/a", None, TOKEN)[0] == 409  # the last one
    assert call(server, "POST", "/api/pools/app/backends", [1, 2], TOKEN)[0] == 400
    assert call(server, "GET", "/api/nothing")[0] == 404
    member.fail = CommandFailed("the Raft leader changed before committing", retryable=False)
    status, doc = call(server, "PUT", "/api/pools/app/backends/a", {"weight": 1}, TOKEN)
    assert status == 503 and "leader changed" in doc["error"]


def test_without_a_cluster_the_api_says_so() -> None:
    server = AdminServer(HostPort("127.0.0.1", 0), _Node())
    status, doc = call(server, "POST", "/api/pools/app/backends", {}, TOKEN)
    assert status == 409 and "[cluster]" in doc["error"]
    status, doc = call(server, "GET", "/api/config")
    assert status == 404 and "[cluster]" in doc["error"]


# --- pysyncobj's configuration and the dump -----------------------------------------------------------------
SETTINGS = ClusterSettings(
    address=HostPort("127.0.0.1", 7001),
    peers=(HostPort("127.0.0.1", 7002),),
    secret="0123456789abcdef-secret",
    token=TOKEN,
    data_dir="/tmp/halb-test",
)


def test_conf_passes_pysyncobj_validate_and_never_falls_back_after_30s() -> None:
    conf = make_conf(SETTINGS)
    assert conf.leaderFallbackTimeout == conf.raftMaxTimeout == 0.7
    assert conf.raftMinTimeout > 3 * conf.appendEntriesPeriod
    assert conf.connectionTimeout >= conf.raftMaxTimeout
    assert (conf.password, conf.useFork, conf.commandsWaitLeader) == (SETTINGS.secret, False, False)
    assert conf.journalFile == "/tmp/halb-test/raft.journal"
    assert conf.fullDumpFile == "/tmp/halb-test/raft.dump"
    assert conf.bindAddress == "127.0.0.1:7001"  # not 0.0.0.0
    with pytest.raises(AssertionError):
        make_conf(SETTINGS, RaftTimings(raft_min_timeout=0.1))  # < 3 heartbeats
    assert raft_id(HostPort("::1", 7000)) == "::1:7000"


def test_store_dump_round_trip_announces_the_whole_state() -> None:
    events: list[Applied] = []
    store = _Store(events.append)
    store.apply({"op": "seed", "pools": shared(rec("a", "10.0.0.1:80"))})
    store.apply({"op": "acquire", "lease": "vip", "node": "lb1", "now": 1.0, "duration": 2.0})
    assert events[0].config is not None and events[0].config["version"] == 1
    assert events[1].config is None and events[1].leases["vip"]["holder"] == "lb1"
    dump = store._serialize()
    json.dumps(dump)  # plain builtins only
    other = _Store(events.append)
    other._deserialize(dump)
    assert other.state == store.state
    assert events[-1].command is None and events[-1].config == store.state.config_view()
