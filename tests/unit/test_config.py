"""Config validation: every error names the file, the key path and the problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from halb.config import load, parse_host_port
from halb.errors import ConfigError

GOOD = """
[node]
name = "lb1"
admin = "127.0.0.1:9901"
workers = 1

[[listeners]]
name = "web"
bind = "127.0.0.1:8080"
mode = "http"
pool = "app"

[pools.app]
algorithm = "round_robin"
backends = [
  { name = "a", address = "127.0.0.1:9001", weight = 1 },
  { name = "b", address = "127.0.0.1:9002", weight = 3 },
]
health = { kind = "http", path = "/healthz", interval = 0.5, timeout = 0.3, rise = 5, fall = 3 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "halb.toml"
    path.write_text(textwrap.dedent(text))
    return path


def error_for(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    return info.value


def test_contract_example_loads(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))
    assert config.node.name == "lb1"
    assert config.node.admin.port == 9901
    (listener,) = config.listeners
    assert (listener.name, listener.mode, listener.pool, listener.bind.port) == ("web", "http", "app", 8080)
    pool = config.pools["app"]
    assert [(b.name, b.weight) for b in pool.backends] == [("a", 1), ("b", 3)]
    assert (pool.health.kind, pool.health.rise, pool.health.fall) == ("http", 5, 3)
    assert pool.health.interval == 0.5


def test_health_defaults_are_haproxy_like(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD.replace("health = {", "# health = {")))
    health = config.pools["app"].health
    assert (health.rise, health.fall, health.kind) == (5, 3, "tcp")


@pytest.mark.parametrize(
    ("old", "new", "key", "problem"),
    [
        ("workers = 1", "workers = 0", "node.workers", "must be >= 1"),
        ("workers = 1", 'workers = "two"', "node.workers", "expected an integer"),
        ('mode = "http"', 'mode = "udp"', "listeners[0].mode", "must be one of"),
        ('pool = "app"', 'pool = "nope"', "listeners[0].pool", "no pool named 'nope'"),
        ('bind = "127.0.0.1:8080"', 'bind = "127.0.0.1:99999"', "listeners[0].bind", "outside 1..65535"),
        ('bind = "127.0.0.1:8080"', 'bind = "localhost8080"', "listeners[0].bind", "is not HOST:PORT"),
        ('algorithm = "round_robin"', 'algorithm = "fastest"', "pools.app.algorithm", "must be one of"),
        ("weight = 3", "weight = -1", "pools.app.backends[1].weight", "must be >= 0"),
        ('address = "127.0.0.1:9002"', 'address = "127.0.0.1"', "pools.app.backends[1].address", "HOST:PORT"),
        ('name = "b"', 'name = "a"', "pools.app.backends[1].name", "duplicate backend name"),
        ("rise = 5", "rise = 0", "pools.app.health.rise", "must be >= 1"),
        ("timeout = 0.3", "timeout = 0.9", "pools.app.health.timeout", "must not exceed interval"),
        ('kind = "http"', 'kind = "icmp"', "pools.app.health.kind", "must be one of"),
        ('path = "/healthz"', 'path = "healthz"', "pools.app.health.path", "must start with '/'"),
        ('name = "lb1"', 'name = "lb1"\ncolour = "blue"', "node.colour", "unknown key"),
        ('admin = "127.0.0.1:9901"', 'admin = "example.com:9901"', "node.admin", "not an IP address"),
    ],
)
def test_errors_name_file_key_and_problem(tmp_path: Path, old: str, new: str, key: str, problem: str) -> None:
    assert old in GOOD
    error = error_for(tmp_path, GOOD.replace(old, new, 1))
    assert error.file.endswith("halb.toml")
    assert error.key == key
    assert problem in error.problem
    assert str(error).startswith(f"{error.file}: {key}: ")


def test_missing_sections(tmp_path: Path) -> None:
    assert error_for(tmp_path, "[pools]\n").key == "node"
    error = error_for(tmp_path, '[node]\nname="x"\n')
    assert (error.key, error.problem) == ("pools", "is required")


def test_empty_pool(tmp_path: Path) -> None:
    text = GOOD.split("[pools.app]")[0] + "[pools.app]\nbackends = []\n"
    error = error_for(tmp_path, text)
    assert error.key == "pools.app.backends"


def test_duplicate_bind(tmp_path: Path) -> None:
    text = GOOD + '\n[[listeners]]\nname = "again"\nbind = "127.0.0.1:8080"\npool = "app"\n'
    error = error_for(tmp_path, text)
    assert error.key == "listeners[1].bind" and "already bound" in error.problem


def test_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    error = error_for(tmp_path, "[node\nname=")
    assert "TOML syntax error" in error.problem
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.toml")


def test_host_port_forms() -> None:
    assert parse_host_port("[::1]:80").host == "::1"
    assert parse_host_port("10.0.0.1:443").port == 443
    with pytest.raises(ValueError):
        parse_host_port("10.0.0.1:http")
