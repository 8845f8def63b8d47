"""Backup backends (`backup = true`, HAProxy's `backup` servers): used only while no other backend of the
pool is available, and given up as soon as one is again. Pure: no sockets, no clock."""

from __future__ import annotations

import pytest

from halb.balancing.base import Context
from halb.config_model import BackendConfig, HealthConfig, HostPort, PoolConfig
from halb.pool import Pool

CTX = Context("192.0.2.1", "", 0.0)


def pool(algorithm: str = "round_robin") -> Pool:
    backends = (
        BackendConfig("a", HostPort("10.0.0.1", 80)),
        BackendConfig("b", HostPort("10.0.0.2", 80)),
        BackendConfig("sorry1", HostPort("10.0.0.8", 80), backup=True),
        BackendConfig("sorry2", HostPort("10.0.0.9", 80), backup=True),
    )
    return Pool(
        PoolConfig(name="app", backends=backends, algorithm=algorithm, health=HealthConfig(kind="none"))
    )


def chosen(p: Pool, n: int = 8) -> set[str]:
    names = set()
    for _ in range(n):
        backend = p.choose(CTX)
        names.add(backend.name if backend is not None else "-")
    return names


@pytest.mark.parametrize(
    "algorithm", ["round_robin", "least_connections", "ip_hash", "consistent_hash", "random"]
)
def test_backups_serve_only_while_no_other_backend_is_available(algorithm: str) -> None:
    p = pool(algorithm)
    assert chosen(p, 50) == {"a", "b"} or algorithm in ("ip_hash", "consistent_hash")
    assert chosen(p, 50) <= {"a", "b"}  # the backups idle
    p.set_state("a", healthy=False)
    assert chosen(p) == {"b"}  # one left: still no backup
    p.set_state("b", draining=True)
    assert chosen(p, 40) <= {"sorry1", "sorry2"}  # none left: the backups, balanced the pool's way
    p.set_state("a", healthy=True)
    assert chosen(p) == {"a"}  # back as soon as one recovers
    assert p.no_backend_total == 0


def test_busy_backends_do_not_send_traffic_to_the_backups() -> None:
    p = pool()
    a, b = p.backends[:2]
    # Both are excluded (at their maxconn, or already tried): the caller waits or fails; the backups
    # are for backends that are down, not busy.
    assert p.choose(CTX, exclude=[a, b]) is None


def test_with_every_backend_down_nothing_is_chosen_and_it_is_counted() -> None:
    p = pool()
    for name in ("a", "b", "sorry1", "sorry2"):
        p.set_state(name, healthy=False)
    assert p.choose(CTX) is None and p.no_backend_total == 1
    p.set_state("sorry2", healthy=True)
    assert chosen(p) == {"sorry2"}


def test_reconfigure_can_turn_a_backend_into_a_backup_and_back() -> None:
    p = pool()
    config = p.config
    flipped = tuple(
        BackendConfig(b.name, b.address, backup=b.name in ("b", "sorry1")) for b in config.backends
    )
    kept = p.reconfigure(PoolConfig(name="app", backends=flipped, health=config.health))
    assert kept == {"a", "b", "sorry1", "sorry2"}  # same records, new roles
    assert [b.name for b in p.primaries] == ["a", "sorry2"]
    assert chosen(p) == {"a", "sorry2"}
    p.set_state("a", healthy=False)
    p.set_state("sorry2", healthy=False)
    assert chosen(p) == {"b", "sorry1"}
