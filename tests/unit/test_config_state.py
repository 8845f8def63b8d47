"""[state], pool `sticky = {...}`, [ratelimits.NAME] and listener `ratelimits`: defaults, and every key's
errors name the file, the key and the problem; the generator turns them on for the lab (and Vagrant)."""

from __future__ import annotations

import copy
import tomllib
from typing import Any

import pytest

from halb.cluster_config import BackendSpec, ClusterSpec, NodeSpec, node_config
from halb.config import parse
from halb.config_model import HostPort, StickyConfig
from halb.config_state import redis_settings
from halb.errors import ConfigError
from halb.lab.topology import build

BASE: dict[str, Any] = {
    "node": {"name": "lb1", "admin": "127.0.0.1:9901"},
    "listeners": [{"name": "web", "bind": "127.0.0.1:8080", "pool": "app", "ratelimits": ["api"]}],
    "pools": {
        "app": {
            "backends": [{"name": "a", "address": "127.0.0.1:9001"}],
            "sticky": {"mode": "cookie"},
        }
    },
    "state": {"url": "redis://127.0.0.1:6379/0"},
    "ratelimits": {"api": {"rate": 10}},
}


def doc(**changes: Any) -> dict[str, Any]:
    """BASE with changes: "state.url": None deletes a key, "state": None a table."""
    out = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, last = path.split(".")
        table = out
        for part in parents:
            table = table[int(part)] if isinstance(table, list) else table.setdefault(part, {})
        if value is None:
            table.pop(last, None)
        else:
            table[last] = value
    return out


def load(**changes: Any) -> Any:
    return parse(doc(**changes), "lb1.toml")


def test_defaults() -> None:
    config = load()
    state = config.state
    assert state is not None
    assert (state.url, state.sentinels, state.key_prefix, state.ping_interval) == (
        "redis://127.0.0.1:6379/0",
        (),
        "halb:",
        1.0,
    )
    assert (state.connect_timeout, state.socket_timeout, state.call_timeout, state.retries) == (
        0.1,
        0.1,
        0.25,
        1,
    )
    assert config.pools["app"].sticky == StickyConfig()
    assert config.pools["app"].sticky.name == "HALBSID"  # type: ignore[union-attr]
    rule = config.ratelimits["api"]
    assert (rule.algorithm, rule.key, rule.rate, rule.burst, rule.paths, rule.tiers) == (
        "token_bucket",
        "client_ip",
        10.0,
        10.0,  # default burst: one second's worth
        (),
        (),
    )
    assert config.listeners[0].ratelimits == ("api",)
    # everything is optional
    plain = parse(
        {k: v for k, v in BASE.items() if k not in ("state", "ratelimits")}
        | {
            "listeners": [{"name": "web", "bind": "127.0.0.1:8080", "pool": "app"}],
            "pools": {"app": {"backends": [{"name": "a", "address": "127.0.0.1:9001"}]}},
        }
    )
    assert (plain.state, plain.ratelimits, plain.pools["app"].sticky) == (None, {}, None)


def test_sentinel_mode_and_secrets() -> None:
    config = load(
        **{
            "state.url": None,
            "state.sentinels": ["10.0.0.1:26379", "10.0.0.2:26379"],
            "state.service_name": "halb",
            "state.password": "s3cret/+@",
            "state.sentinel_password": "sentinel-pw",
            "state.db": 2,
        }
    )
    state = config.state
    assert state is not None
    assert state.sentinels == (HostPort("10.0.0.1", 26379), HostPort("10.0.0.2", 26379))
    assert "s3cret" not in repr(config) and "sentinel-pw" not in repr(config)
    settings = redis_settings(state)
    assert settings.kind == "sentinel" and settings.password == "s3cret/+@" and settings.db == 2
    assert state.target == "sentinel halb via 10.0.0.1:26379, 10.0.0.2:26379"
    # a plain url: the password goes into the URL (quoted), never into the status target
    plain = load(**{"state.password": "p@ss word"}).state
    assert redis_settings(plain).url == "redis://:p%40ss%20word@127.0.0.1:6379/0"
    assert plain.target == "redis://127.0.0.1:6379/0"
    assert load(**{"state.url": "redis://:pw@h:1/0"}).state.target == "redis://h:1/0"


def test_sticky_modes_and_rule_shapes() -> None:
    header = load(**{"pools.app.sticky": {"mode": "header", "name": "X-Session", "ttl": 60}})
    assert header.pools["app"].sticky == StickyConfig(mode="header", name="X-Session", ttl=60.0)
    source = load(**{"pools.app.sticky": {"mode": "source_ip"}}).pools["app"].sticky
    assert source is not None and source.mode == "source_ip"
    cookie = (
        load(
            **{
                "pools.app.sticky": {
                    "name": "SID",
                    "path": "/app",
                    "domain": "example.com",
                    "secure": True,
                    "httponly": False,
                    "samesite": "None",
                }
            }
        )
        .pools["app"]
        .sticky
    )
    assert cookie == StickyConfig("cookie", "SID", 1800.0, "/app", "example.com", True, False, "None")
    rules = load(
        **{
            "ratelimits": {
                "keys": {
                    "algorithm": "leaky_bucket",
                    "key": "header:X-API-Key",
                    "rate": 5,
                    "burst": 2,
                    "tiers": {
                        "gold": {"rate": 100, "keys": ["k1", "k2"]},
                        "free": {"rate": 1, "keys": ["k3"]},
                    },
                    "local_share": 0.5,
                },
                "prefix": {"key": "path_prefix", "paths": ["/api/", "/login"], "rate": 0.5},
            },
            "listeners.0.ratelimits": ["keys", "prefix"],
        }
    ).ratelimits
    keys, prefix = rules["keys"], rules["prefix"]
    assert (keys.algorithm, keys.key, keys.burst, keys.local_share) == (
        "leaky_bucket",
        "header:x-api-key",
        2,
        0.5,
    )
    assert [(t.name, t.rate, t.burst, t.keys) for t in keys.tiers] == [
        ("gold", 100.0, 100.0, ("k1", "k2")),
        ("free", 1.0, 1.0, ("k3",)),
    ]
    assert (prefix.paths, prefix.burst) == (("/api/", "/login"), 1.0)  # burst at least 1


TCP = [{"name": "web", "bind": "127.0.0.1:8080", "pool": "app", "mode": "tcp"}]


@pytest.mark.parametrize(
    ("changes", "key", "problem"),
    [
        # [state]
        ({"state.url": None}, "state", "exactly one of url"),
        ({"state.sentinels": ["h:1"]}, "state.sentinels", "exactly one of url"),
        ({"state.url": "http://h:1/0"}, "state.url", "redis://"),
        ({"state.url": 6379}, "state.url", "expected a string"),
        ({"state.url": "redis://"}, "state.url", "no host"),
        ({"state.url": "redis://h:99999/0"}, "state.url", "bad port"),
        ({"state.url": "redis://h:1/zero"}, "state.url", "database number"),
        ({"state.url": "redis://h:1/0 x"}, "state.url", "spaces"),
        ({"state.url": "unix://sock"}, "state.url", "absolute socket path"),
        ({"state.url": None, "state.sentinels": []}, "state.sentinels", "at least one sentinel"),
        ({"state.url": None, "state.sentinels": "h:1"}, "state.sentinels", "array of strings"),
        ({"state.url": None, "state.sentinels": ["h"]}, "state.sentinels[0]", "HOST:PORT"),
        ({"state.url": None, "state.sentinels": ["h:1", "h:1"]}, "state.sentinels[1]", "listed twice"),
        ({"state.service_name": "x"}, "state.service_name", "only with sentinels"),
        ({"state.db": 1}, "state.db", "only with sentinels"),
        ({"state.sentinel_password": "x"}, "state.sentinel_password", "only with sentinels"),
        ({"state.sentinel_check_interval": 1}, "state.sentinel_check_interval", "only with sentinels"),
        (
            {"state.url": None, "state.sentinels": ["h:1"], "state.service_name": "my master"},
            "state.service_name",
            "without spaces",
        ),
        (
            {"state.url": None, "state.sentinels": ["h:1"], "state.db": -1},
            "state.db",
            ">= 0",
        ),
        (
            {"state.url": None, "state.sentinels": ["h:1"], "state.sentinel_check_interval": 0},
            "state.sentinel_check_interval",
            ">= 0.05",
        ),
        (
            {"state.url": None, "state.sentinels": ["h:1"], "state.sentinel_password": ""},
            "state.sentinel_password",
            "must not be empty",
        ),
        ({"state.password": ""}, "state.password", "must not be empty"),
        ({"state.password": 123}, "state.password", "expected a string"),
        ({"state.url": "redis://:pw@h:1/0", "state.password": "x"}, "state.password", "password already"),
        ({"state.url": "unix:///run/redis.sock", "state.password": "x"}, "state.password", "?password="),
        ({"state.connect_timeout": 0}, "state.connect_timeout", ">= 0.001"),
        ({"state.socket_timeout": "1s"}, "state.socket_timeout", "number of seconds"),
        ({"state.call_timeout": 120}, "state.call_timeout", "<= 60"),
        ({"state.retries": -1}, "state.retries", ">= 0"),
        ({"state.retries": 1.5}, "state.retries", "expected an integer"),
        ({"state.backoff_base": -1}, "state.backoff_base", ">= 0"),
        ({"state.backoff_base": 0.5, "state.backoff_cap": 0.1}, "state.backoff_cap", ">= backoff_base"),
        ({"state.max_connections": 0}, "state.max_connections", ">= 1"),
        ({"state.failure_threshold": 0}, "state.failure_threshold", ">= 1"),
        ({"state.open_min": 0}, "state.open_min", ">= 0.001"),
        ({"state.open_min": 5, "state.open_max": 1}, "state.open_max", ">= open_min"),
        ({"state.key_prefix": "my prefix"}, "state.key_prefix", "without spaces"),
        ({"state.ping_interval": 0.001}, "state.ping_interval", ">= 0.05"),
        ({"state.urll": "x"}, "state.urll", "unknown key"),
        ({"state": "redis://h:1"}, "state", "expected a table"),
        # pool sticky
        ({"pools.app.sticky.mode": "ip"}, "pools.app.sticky.mode", "'cookie', 'source_ip', 'header'"),
        ({"pools.app.sticky.name": "HALB SID"}, "pools.app.sticky.name", "is not a cookie name"),
        ({"pools.app.sticky.name": ""}, "pools.app.sticky.name", "is not a cookie name"),
        ({"pools.app.sticky": {"mode": "header"}}, "pools.app.sticky.name", 'required with mode = "header"'),
        (
            {"pools.app.sticky": {"mode": "header", "name": "X Session"}},
            "pools.app.sticky.name",
            "is not a header name",
        ),
        ({"pools.app.sticky": {"mode": "source_ip", "name": "x"}}, "pools.app.sticky.name", "not used"),
        (
            {"pools.app.sticky": {"mode": "source_ip", "secure": True}},
            "pools.app.sticky.secure",
            'only with mode = "cookie"',
        ),
        (
            {"pools.app.sticky": {"mode": "header", "name": "X-S", "path": "/"}},
            "pools.app.sticky.path",
            "a cookie attribute",
        ),
        ({"pools.app.sticky.ttl": 0}, "pools.app.sticky.ttl", ">= 1"),
        ({"pools.app.sticky.ttl": "30m"}, "pools.app.sticky.ttl", "number of seconds"),
        ({"pools.app.sticky.path": "app"}, "pools.app.sticky.path", "must start with '/'"),
        ({"pools.app.sticky.path": "/a;b"}, "pools.app.sticky.path", "';'"),
        ({"pools.app.sticky.domain": "exa mple.com"}, "pools.app.sticky.domain", "not a domain name"),
        ({"pools.app.sticky.secure": "yes"}, "pools.app.sticky.secure", "true or false"),
        ({"pools.app.sticky.httponly": 1}, "pools.app.sticky.httponly", "true or false"),
        ({"pools.app.sticky.samesite": "lax"}, "pools.app.sticky.samesite", "'Lax', 'Strict', 'None'"),
        ({"pools.app.sticky.samesite": "None"}, "pools.app.sticky.samesite", "set secure = true"),
        ({"pools.app.sticky.cookie": "x"}, "pools.app.sticky.cookie", "unknown key"),
        ({"pools.app.sticky": "cookie"}, "pools.app.sticky", "expected a table"),
        ({"state": None}, "pools.app.sticky", "add a [state] table"),
        ({"listeners": TCP}, "pools.app.sticky", "HTTP listeners only"),
        # [ratelimits.NAME]
        ({"ratelimits.api.rate": None}, "ratelimits.api.rate", "is required"),
        ({"ratelimits.api.rate": 0}, "ratelimits.api.rate", "must be > 0"),
        ({"ratelimits.api.rate": "10/s"}, "ratelimits.api.rate", "expected a number"),
        ({"ratelimits.api.rate": 1e7}, "ratelimits.api.rate", "<= 1e+06"),
        ({"ratelimits.api.burst": 0.5}, "ratelimits.api.burst", ">= 1"),
        ({"ratelimits.api.algorithm": "gcra"}, "ratelimits.api.algorithm", "'token_bucket', 'leaky_bucket'"),
        ({"ratelimits.api.key": "ip"}, "ratelimits.api.key", '"header:NAME"'),
        ({"ratelimits.api.key": "header:"}, "ratelimits.api.key", '"header:NAME"'),
        ({"ratelimits.api.key": "header:X Key"}, "ratelimits.api.key", '"header:NAME"'),
        ({"ratelimits.api.key": "path_prefix"}, "ratelimits.api.paths", 'required with key = "path_prefix"'),
        ({"ratelimits.api.paths": "/api"}, "ratelimits.api.paths", "array of strings"),
        ({"ratelimits.api.paths": ["api"]}, "ratelimits.api.paths[0]", "must start with '/'"),
        ({"ratelimits.api.paths": ["/a", "/a"]}, "ratelimits.api.paths[1]", "listed twice"),
        ({"ratelimits.api.local_share": 0}, "ratelimits.api.local_share", "must be > 0"),
        ({"ratelimits.api.local_share": 2}, "ratelimits.api.local_share", "<= 1"),
        (
            {"ratelimits.api.tiers": {"gold": {"keys": ["k"]}}},
            "ratelimits.api.tiers.gold.rate",
            "is required",
        ),
        (
            {"ratelimits.api.tiers": {"gold": {"rate": 1}}},
            "ratelimits.api.tiers.gold.keys",
            "at least one key",
        ),
        (
            {"ratelimits.api.tiers": {"gold": {"rate": 1, "keys": [""]}}},
            "ratelimits.api.tiers.gold.keys[0]",
            "must not be empty",
        ),
        (
            {"ratelimits.api.tiers": {"a": {"rate": 1, "keys": ["k"]}, "b": {"rate": 2, "keys": ["k"]}}},
            "ratelimits.api.tiers.b.keys[0]",
            "also in tier 'a'",
        ),
        (
            {"ratelimits.api.tiers": {"gold": {"rate": 1, "burst": 0, "keys": ["k"]}}},
            "ratelimits.api.tiers.gold.burst",
            ">= 1",
        ),
        (
            {"ratelimits.api.tiers": {"gold": {"rate": 1, "keys": ["k"], "limit": 3}}},
            "ratelimits.api.tiers.gold.limit",
            "unknown key",
        ),
        (
            {"ratelimits.api.tiers": {"g o": {"rate": 1, "keys": ["k"]}}},
            "ratelimits.api.tiers.g o",
            "tier name",
        ),
        (
            {
                "ratelimits.api": {
                    "rate": 1,
                    "key": "path_prefix",
                    "paths": ["/a"],
                    "tiers": {"t": {"rate": 2, "keys": ["/b"]}},
                }
            },
            "ratelimits.api.tiers.t.keys",
            "not one of paths",
        ),
        ({"ratelimits.api.per": "second"}, "ratelimits.api.per", "unknown key"),
        ({"ratelimits": {"a b": {"rate": 1}}}, "ratelimits.a b", "rule name"),
        ({"ratelimits.api": 5}, "ratelimits.api", "expected a table"),
        # listener ratelimits
        ({"listeners.0.ratelimits": ["apii"]}, "listeners[0].ratelimits[0]", "no rule [ratelimits.apii]"),
        ({"listeners.0.ratelimits": "api"}, "listeners[0].ratelimits", "array of strings"),
        ({"listeners.0.ratelimits": ["api", "api"]}, "listeners[0].ratelimits[1]", "listed twice"),
        ({"ratelimits": None}, "listeners[0].ratelimits[0]", "(rules: none)"),
        (
            {"listeners": [{**TCP[0], "ratelimits": ["api"]}], "pools.app.sticky": None},
            "listeners[0].ratelimits",
            "HTTP listeners only",
        ),
    ],
)
def test_every_key_error_names_file_key_and_problem(changes: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**changes)
    assert info.value.file == "lb1.toml"
    assert info.value.key == key
    assert problem in info.value.problem, info.value.problem


def test_a_witness_takes_no_state_or_ratelimits() -> None:
    witness = {
        "node": {"name": "w", "admin": "127.0.0.1:9901"},
        "cluster": {
            "address": "10.0.0.3:7000",
            "peers": ["10.0.0.1:7000"],
            "secret": "0123456789abcdef-secret",
            "token": "0123456789abcdef-token",
            "data_dir": "/var/lib/halb/w",
            "role": "witness",
        },
    }
    for key, table in (("state", BASE["state"]), ("ratelimits", BASE["ratelimits"])):
        with pytest.raises(ConfigError, match="witness"):
            parse({**witness, key: table}, "w.toml")


def test_the_generator_turns_on_redis_and_cookie_stickiness_for_the_lab() -> None:
    topo = build("gen", lbs=2, backends=2, witness=True)
    spec = topo.cluster_spec()
    config = parse(tomllib.loads(node_config(spec, "lb1")), "lb1.toml")
    assert config.state is not None and config.state.url == "redis://10.99.0.200:6379/0"
    assert config.pools["app"].sticky == StickyConfig(mode="cookie", name="HALBSID")
    # Vagrant renders through the same generator: other subnet, same tables
    vagrant = build("gen", lbs=3, backends=2, witness=True, subnet="192.168.56.0/24").cluster_spec()
    config = parse(tomllib.loads(node_config(vagrant, "lb3")), "lb3.toml")
    assert config.state is not None and config.state.url == "redis://192.168.56.200:6379/0"
    assert config.pools["app"].sticky is not None
    # no Redis on the spec: no [state], no stickiness; sticky=None turns it off
    bare = ClusterSpec(
        lbs=(NodeSpec("lb1", "10.0.0.1"),), backends=(BackendSpec("w", "10.0.0.5"),), vip="10.0.0.100"
    )
    config = parse(tomllib.loads(node_config(bare, "lb1")), "lb1.toml")
    assert config.state is None and config.pools["app"].sticky is None
    off = ClusterSpec(lbs=spec.lbs, backends=spec.backends, vip=spec.vip, redis=spec.redis, sticky=None)
    config = parse(tomllib.loads(node_config(off, "lb1")), "lb1.toml")
    assert config.state is not None and config.pools["app"].sticky is None


def test_the_lab_sentinel_option_adds_a_replica_a_sentinel_and_sentinel_state() -> None:
    topo = build("gen", lbs=2, backends=2, sentinel=True)
    names = [h.name for h in topo.hosts]
    assert names == ["lb1", "lb2", "web1", "web2", "redis", "redis2", "sentinel", "client"]
    assert (topo.host("redis2").address, topo.host("sentinel").address) == ("10.99.0.201", "10.99.0.210")
    config = parse(tomllib.loads(node_config(topo.cluster_spec(), "lb2")), "lb2.toml")
    assert config.state is not None and config.state.url == ""
    assert config.state.sentinels == (HostPort("10.99.0.210", 26379),)
    assert config.state.service_name == "halb"
    assert config.pools["app"].sticky is not None
    assert [h.name for h in build("gen").hosts] == ["lb1", "lb2", "web1", "web2", "redis", "client"]
