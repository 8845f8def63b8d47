"""Sentinel: a master, a replica and a sentinel on loopback; the same store object follows a failover."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from halb.errors import StoreUnavailable
from halb.state.redis_store import RedisSettings, RedisStore
from halb.state.sessions import FALLBACK, StickySessions
from halb.state.store import TOKEN_BUCKET
from tests.conftest import free_port, report
from tests.state.conftest import SentinelTopology, run, sync_client
from tests.state.test_degradation import BOUND, pool_of
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def sentinel_store(topo: SentinelTopology) -> RedisStore:
    dead = ("127.0.0.1", free_port())  # a sentinel that is down must not stall discovery
    return RedisStore(
        RedisSettings(
            sentinels=(dead, *topo.addresses),
            service_name=topo.service,
            connect_timeout=0.1,
            socket_timeout=0.2,
            call_timeout=0.5,
            open_min=0.2,
            open_max=0.5,
        )
    )


def test_store_follows_a_sentinel_failover(sentinel_topology: SentinelTopology) -> None:
    topo = sentinel_topology
    old_port, new_port = topo.master.port, topo.replica.port

    async def scenario() -> None:
        store = sentinel_store(topo)
        try:
            assert store.status.backend == "sentinel"
            await store.set_backend("app", "s1", "web1", 600)
            assert (await store.rate_limit("rl:k", TOKEN_BUCKET, 0.01, 3)).allowed
            with sync_client(old_port) as c:
                assert c.wait(1, 2000) == 1  # replicated before the failover
            with sync_client(topo.sentinels[0].port) as s:
                s.execute_command("SENTINEL", "FAILOVER", topo.service)
            wait_for(lambda: topo.master_port() == new_port, 20, "sentinel promoted the replica")
            # The old master is demoted only at the sentinel's next INFO of it (up to 10 s later) and takes
            # writes until then; the store must move to the new master on its own (its master watch).
            t0 = time.monotonic()
            with sync_client(new_port) as c:
                i = 0
                while True:
                    i += 1
                    with contextlib.suppress(StoreUnavailable):
                        await store.set_backend("app", f"w{i}", "web2", 600)
                    if c.get(f"halb:s:app:w{i}") == "web2":
                        break
                    assert time.monotonic() - t0 < 10, "the store kept writing to the old master"
                    await asyncio.sleep(0.05)
            took = time.monotonic() - t0
            assert await store.get_backend("app", "s1", 600) == "web1"  # data survived on the new master
            d = await store.rate_limit("rl:k", TOKEN_BUCKET, 0.01, 3)
            assert d.allowed and d.remaining == 1  # the bucket moved with the data
            report(
                "state: Sentinel failover (SENTINEL FAILOVER)",
                f"writes reach the new master {took:.2f}s after the sentinel reports it",
            )
        finally:
            await store.aclose()

    run(scenario(), 60)


def test_store_follows_when_the_master_is_killed(sentinel_topology: SentinelTopology) -> None:
    topo = sentinel_topology

    async def scenario() -> None:
        store = sentinel_store(topo)
        sticky = StickySessions("app", pool_of(), store, ttl=600)
        try:
            choice = await sticky.resolve("sess")
            await sticky.remember("sess", choice)
            with sync_client(topo.master.port) as c:
                assert c.wait(1, 2000) == 1
            topo.master.kill()
            t0 = time.monotonic()
            sources = []
            while time.monotonic() - t0 < 30:  # traffic continues through the failover
                a = time.monotonic()
                c = await sticky.resolve("sess")
                assert time.monotonic() - a < BOUND * 2
                assert c.backend is choice.backend  # fallback or store: the same backend
                sources.append(c.source)
                if c.source != FALLBACK and FALLBACK in sources:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("store did not follow the failover")
            took = time.monotonic() - t0
            assert topo.master_port() == topo.replica.port
            assert not store.degraded
            report(
                "state: Sentinel failover (master killed, down-after 400 ms)",
                f"store answered again after {took:.2f}s; {sources.count(FALLBACK)} fallback decisions",
            )
        finally:
            await store.aclose()

    run(scenario(), 60)
