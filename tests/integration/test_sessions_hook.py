"""Sticky sessions and rate limits in the HTTP proxy, in-process (ProxyServer + demo backends on loopback,
the state layer's MemoryStore in place of Redis): fast checks of every path of `halb.proxy.sessions_hook`.
The same behaviour against a real Redis and real `halb serve` processes: test_sticky_ratelimit.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from halb.balancing.consistent_hash import ConsistentHash
from halb.config import parse
from halb.config_model import Config
from halb.demo_backend import DemoBackend
from halb.pool import Pool
from halb.pools import build_pools
from halb.proxy.server import ProxyServer
from halb.proxy.sessions_hook import StateRuntime
from halb.state.memory import MemoryStore
from tests.conftest import free_port
from tests.integration.replies import Reply, read_reply
from tests.integration.test_proxy_http import poll

pytestmark = pytest.mark.timeout(20)


class Client:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def get(self, path: str = "/", **headers: str) -> Reply:
        lines = [f"GET {path} HTTP/1.1", "Host: test"] + [
            f"{k.replace('_', '-')}: {v}" for k, v in headers.items()
        ]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        return await read_reply(self.reader, time.monotonic())

    def close(self) -> None:
        self.writer.transport.abort()


@dataclass
class Rig:
    config: Config
    pools: dict[str, Pool]
    store: MemoryStore
    runtime: StateRuntime
    server: ProxyServer
    backends: dict[str, DemoBackend]
    port: int
    clients: list[Client]

    @property
    def pool(self) -> Pool:
        return self.pools["app"]

    async def client(self) -> Client:
        client = Client(*await asyncio.open_connection("127.0.0.1", self.port))
        self.clients.append(client)
        return client

    async def get(self, path: str = "/", **headers: str) -> Reply:
        """One request on a fresh connection."""
        client = await self.client()
        try:
            return await client.get(path, **headers)
        finally:
            client.close()

    def mapping(self, session: str) -> str | None:
        entry = self.store._sessions.get(("app", session))
        return entry[0] if entry else None

    def stats(self) -> dict[str, Any]:
        stats = self.runtime.stats()
        assert stats is not None
        return stats


async def start_proxy(
    doc: dict[str, Any],
) -> tuple[Config, dict[str, Pool], MemoryStore, StateRuntime, ProxyServer]:
    """A started ProxyServer for a config document, its [state] on a MemoryStore in place of Redis."""
    config = parse(doc, "test.toml")
    pools = build_pools(config)
    store = MemoryStore()
    runtime = StateRuntime(config, store=store)
    server = ProxyServer(list(config.listeners), pools, state=runtime)
    await server.start()
    return config, pools, store, runtime, server


@asynccontextmanager
async def rig(
    sticky: dict[str, Any] | None = None,
    ratelimits: dict[str, Any] | None = None,
    listener_rules: list[str] | None = None,
    backends: int = 3,
    algorithm: str = "round_robin",
    pool_extra: dict[str, Any] | None = None,
    edit: Callable[[dict[str, Any], dict[str, DemoBackend]], None] | None = None,
) -> AsyncIterator[Rig]:
    """Demo backends web1..webN in pool `app` behind listener `web`; `edit` may change the config
    document (more pools, routes) before the proxy starts."""
    demo = {f"web{i}": DemoBackend(f"web{i}", "127.0.0.1", 0) for i in range(1, backends + 1)}
    for b in demo.values():
        await b.start()
    port = free_port()
    doc: dict[str, Any] = {
        "node": {"name": "t", "admin": f"127.0.0.1:{free_port()}"},
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{port}", "pool": "app"}],
        "pools": {
            "app": {
                "algorithm": algorithm,
                "backends": [{"name": n, "address": f"127.0.0.1:{b.port}"} for n, b in demo.items()],
                "health": {"kind": "none"},
                "retries": 2,
                "connect_timeout": 0.5,
            }
        },
        "state": {"url": "redis://127.0.0.1:1/0"},  # replaced by the MemoryStore below
    }
    if sticky is not None:
        doc["pools"]["app"]["sticky"] = sticky
    doc["pools"]["app"].update(pool_extra or {})
    if ratelimits:
        doc["ratelimits"] = ratelimits
        doc["listeners"][0]["ratelimits"] = listener_rules or list(ratelimits)
    if edit is not None:
        edit(doc, demo)
    config, pools, store, runtime, server = await start_proxy(doc)
    runtime.start()
    r = Rig(config, pools, store, runtime, server, demo, port, [])
    try:
        yield r
    finally:
        for c in r.clients:
            c.close()
        await server.close()
        await runtime.aclose()
        for b in demo.values():
            await b.close()


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 15))


# --- sticky: cookie mode ---------------------------------------------------------------------------------
def test_a_sticky_session_waits_in_its_own_backends_queue_under_maxconn() -> None:
    """HAProxy's server queue: with `maxconn = 1` a session's second concurrent request waits for its own
    backend's slot instead of going to an idle backend, and gets 503 after `queue_timeout`."""

    async def main() -> None:
        extra = {"maxconn": 1, "queue_timeout": 1.0}
        async with rig(sticky={"mode": "cookie"}, pool_extra=extra) as r:
            first = await r.get()
            home, cookie = first.backend, f"HALBSID={first.cookie}"
            loop = asyncio.get_running_loop()
            started = loop.time()
            replies = await asyncio.gather(*(r.get("/slow?ms=300", Cookie=cookie) for _ in range(2)))
            took = loop.time() - started
            assert [x.status for x in replies] == [200, 200]
            assert [x.backend for x in replies] == [home, home]  # not moved to an idle backend
            assert took >= 0.55  # one after the other: the backend never had two at once
            stats = r.server.stats()["listeners"]["web"]  # type: ignore[index]
            assert stats["queued_total"] == 1 and stats["queue_timeouts_total"] == 0
            # a request that would wait longer than queue_timeout: 503, and the session stays home
            slow = asyncio.ensure_future(r.get("/slow?ms=1500", Cookie=cookie))
            await poll(lambda: r.pool.get(home).active_connections == 1)  # it holds the only slot
            late = await r.get("/", Cookie=cookie)
            assert late.status == 503 and "queue timeout" in late.body
            assert (await slow).backend == home
            assert (await r.get("/", Cookie=cookie)).backend == home
            queue = r.server.stats()["listeners"]["web"]  # type: ignore[index]
            assert queue["queue_timeouts_total"] == 1 and queue["queued"] == 0

    run(main())


def test_cookie_sessions_stick_and_new_ones_follow_the_policy() -> None:
    async def main() -> None:
        async with rig(sticky={"mode": "cookie"}) as r:
            first = [await r.get() for _ in range(6)]
            # new sessions: round robin (the policy), each with a fresh cookie minted to hash there
            assert [f.backend for f in first] == ["web1", "web2", "web3"] * 2
            ring = ConsistentHash(r.pool.backends)
            from halb.balancing.base import Context

            for reply in first:
                assert reply.status == 200 and reply.cookie is not None
                assert "Path=/; HttpOnly; SameSite=Lax" in reply.headers["set-cookie"]
                assert r.mapping(reply.cookie) == reply.backend  # stored
                assert ring.choose(Context(key=reply.cookie)).name == reply.backend  # and ring-consistent
            # existing sessions: always their backend, no new cookie, on new and reused connections
            client = await r.client()
            for reply in first:
                again = await client.get(Cookie=f"other=1; HALBSID={reply.cookie}")
                assert (again.backend, again.cookie) == (reply.backend, None)
                assert (await r.get(Cookie=f"HALBSID={reply.cookie}")).backend == reply.backend
            # a malformed id is treated as absent: a new session
            forged = await r.get(Cookie="HALBSID=../../etc/passwd")
            assert forged.cookie is not None and forged.cookie != "../../etc/passwd"
            await asyncio.sleep(0)
            counts = r.stats()["sticky"]["app"]
            assert counts["new"] == 7 and counts["cookies_issued"] == 7 and counts["mint_misses"] == 0
            assert counts["cache"] == 12 and "store" not in counts  # hot sessions: the worker's cache

    run(main())


def test_the_worker_cache_sees_another_nodes_change_within_cache_seconds() -> None:
    async def main() -> None:
        async with rig(sticky={"mode": "cookie", "cache": 0.3}) as r:
            reply = await r.get()
            sid, home = reply.cookie, reply.backend
            assert sid is not None
            other = "web3" if home != "web3" else "web1"
            r.store._sessions[("app", sid)] = (other, r.store._clock() + 600)  # another node moved it
            assert (await r.get(Cookie=f"HALBSID={sid}")).backend == home  # cached
            await asyncio.sleep(0.35)
            assert (await r.get(Cookie=f"HALBSID={sid}")).backend == other  # asked the store again
            calls = r.store.calls
            for _ in range(5):
                await r.get(Cookie=f"HALBSID={sid}")
            assert r.store.calls == calls  # and cached again
        async with rig(sticky={"mode": "cookie", "cache": 0}) as r:
            sid = (await r.get()).cookie
            calls = r.store.calls
            for _ in range(3):
                await r.get(Cookie=f"HALBSID={sid}")
            assert r.store.calls == calls + 3  # cache = 0: the store every time
            assert r.stats()["sticky"]["app"]["store"] == 3

    run(main())


def test_cookie_attributes_from_the_config() -> None:
    async def main() -> None:
        sticky = {
            "name": "SID",
            "path": "/app",
            "domain": "example.com",
            "secure": True,
            "samesite": "Strict",
        }
        async with rig(sticky=sticky) as r:
            reply = await r.get()
            assert reply.headers["set-cookie"] == (
                f"SID={reply.cookie}; Path=/app; Domain=example.com; Secure; HttpOnly; SameSite=Strict"
            )
            assert (await r.get(Cookie=f"SID={reply.cookie}")).backend == reply.backend

    run(main())


def test_a_down_backends_sessions_move_and_the_mapping_follows() -> None:
    async def main() -> None:
        async with rig(sticky={"mode": "cookie"}) as r:
            sessions = {(await r.get()).cookie: b for b in ("web1", "web2", "web3")}
            on_web1 = next(c for c, b in sessions.items() if b == "web1")
            r.pool.set_state("web1", healthy=False)
            moved = await r.get(Cookie=f"HALBSID={on_web1}")
            assert moved.backend in ("web2", "web3")
            assert r.mapping(on_web1) == moved.backend  # the mapping follows
            r.pool.set_state("web1", healthy=True)  # back up: the session stays where it moved
            assert (await r.get(Cookie=f"HALBSID={on_web1}")).backend == moved.backend
            assert r.stats()["sticky"]["app"]["rehomed"] == 1
            # a backend removed from the pool (cluster reconfigure): its sessions move too
            on_web3 = next(c for c, b in sessions.items() if b == "web3")
            cfg = r.pool.config
            r.pool.reconfigure(type(cfg)(**{**cfg.__dict__, "backends": cfg.backends[:2]}))
            moved = await r.get(Cookie=f"HALBSID={on_web3}")
            assert moved.backend in ("web1", "web2") and r.mapping(on_web3) == moved.backend

    run(main())


def test_draining_keeps_existing_sessions_and_gets_no_new_ones() -> None:
    async def main() -> None:
        async with rig(sticky={"mode": "cookie"}) as r:
            on = {}
            for _ in range(3):
                reply = await r.get()
                on[reply.backend] = reply.cookie
            r.pool.set_state("web2", draining=True)
            for _ in range(5):
                assert (await r.get(Cookie=f"HALBSID={on['web2']}")).backend == "web2"
            fresh = [(await r.get()).backend for _ in range(12)]
            assert "web2" not in fresh and set(fresh) == {"web1", "web3"}

    run(main())


def test_connect_failure_retry_rehomes_the_session() -> None:
    async def main() -> None:
        async with rig(sticky={"mode": "cookie"}) as r:
            cookie = (await r.get()).cookie  # web1
            assert r.mapping(cookie) == "web1"
            await r.backends["web1"].close()  # still "healthy" (no checks): the connect fails, retried
            r.server.upstream.close_all()  # (no pooled keep-alive connection to it either)
            reply = await r.get(Cookie=f"HALBSID={cookie}")
            assert reply.status == 200 and reply.backend in ("web2", "web3")
            for _ in range(50):
                if r.mapping(cookie) == reply.backend:
                    break
                await asyncio.sleep(0.01)
            assert r.mapping(cookie) == reply.backend  # the background write landed
            assert r.stats()["sticky"]["app"]["retry_rehomed"] == 1
            assert (await r.get(Cookie=f"HALBSID={cookie}")).backend == reply.backend

    run(main())


def test_store_unavailable_falls_back_to_the_ring() -> None:
    async def main() -> None:
        async with rig(sticky={"mode": "cookie", "cache": 0}) as r:  # (every request asks the store)
            sessions = [(await r.get()) for _ in range(30)]
            r.store.fail = True
            started = time.monotonic()
            for s in sessions:
                assert (await r.get(Cookie=f"HALBSID={s.cookie}")).backend == s.backend  # all 30 land
            new = await r.get()
            assert new.status == 200 and new.cookie is not None  # new sessions still start
            assert time.monotonic() - started < 2
            stats = r.stats()
            assert stats["store"]["state"] == "degraded"
            assert (
                stats["sticky"]["app"]["fallback"] == 30 and stats["store"]["fallback_decisions_total"] == 30
            )
            r.store.fail = False  # recovery: the next call (here the housekeeping ping) says ok
            await r.store.ping()
            assert r.runtime.stats()["store"]["state"] == "ok"  # type: ignore[index]
            assert (await r.get(Cookie=f"HALBSID={new.cookie}")).backend == new.backend

    run(main())


def test_source_ip_and_header_modes() -> None:
    async def main() -> None:
        async with rig(sticky={"mode": "source_ip"}) as r:
            seen = {(await r.get()).backend for _ in range(6)}
            assert len(seen) == 1  # one client address, one backend
            assert r.mapping("127.0.0.1") == seen.pop()
        async with rig(sticky={"mode": "header", "name": "X-Session"}) as r:
            a = {(await r.get(X_Session="alice")).backend for _ in range(4)}
            b = {(await r.get(X_Session="bob")).backend for _ in range(4)}
            assert len(a) == len(b) == 1
            assert r.mapping("alice") == a.pop() and r.mapping("bob") == b.pop()
            plain = [(await r.get()).backend for _ in range(3)]  # no header: not sticky, the policy
            assert sorted(plain) == ["web1", "web2", "web3"] and (await r.get()).cookie is None
            assert r.stats()["sticky"]["app"]["unkeyed"] == 4

    run(main())


# --- rate limits ---------------------------------------------------------------------------------------
def test_token_bucket_429_with_retry_after_and_keep_alive() -> None:
    async def main() -> None:
        async with rig(ratelimits={"api": {"rate": 1, "burst": 3, "paths": ["/api/"]}}) as r:
            client = await r.client()
            replies = [await client.get("/api/x") for _ in range(5)]
            assert [x.status for x in replies] == [200, 200, 200, 429, 429]
            refused = replies[3]
            assert refused.headers["retry-after"] == "1"
            assert 'rate limit "api" exceeded for this client address' in refused.body
            assert "connection" not in refused.headers  # the connection stays open
            assert (await client.get("/other")).status == 200  # the rule covers /api/ only
            assert r.stats()["ratelimits"]["api"] == {"allowed": 3, "limited": 2, "local": 0}
            assert r.server.stats()["listeners"]["web"]["responses"].get("4xx") == 2  # type: ignore[index]

    run(main())


def test_header_key_with_tiers_and_path_prefix_buckets() -> None:
    rules = {
        "keys": {
            "key": "header:X-API-Key",
            "rate": 0.01,
            "burst": 1,
            "tiers": {"gold": {"rate": 0.01, "burst": 3, "keys": ["gold-key"]}},
        },
        "prefix": {"key": "path_prefix", "paths": ["/a/", "/b/"], "rate": 0.01, "burst": 2},
    }

    async def main() -> None:
        async with rig(ratelimits={"keys": rules["keys"]}) as r:
            assert [(await r.get(X_API_Key="free")).status for _ in range(2)] == [200, 429]
            assert [(await r.get(X_API_Key="gold-key")).status for _ in range(4)] == [200, 200, 200, 429]
            assert [(await r.get()).status for _ in range(2)] == [200, 429]  # no key: by client address
            refused = await r.get(X_API_Key="free")
            assert "x-api-key header value" in refused.body and int(refused.headers["retry-after"]) > 50
        async with rig(ratelimits={"prefix": rules["prefix"]}) as r:
            assert [(await r.get("/a/1")).status for _ in range(3)] == [200, 200, 429]
            assert [(await r.get("/b/1")).status for _ in range(3)] == [200, 200, 429]  # its own bucket
            assert (await r.get("/c")).status == 200  # not covered

    run(main())


def test_leaky_bucket_spaces_requests_out() -> None:
    async def main() -> None:
        async with rig(ratelimits={"shape": {"algorithm": "leaky_bucket", "rate": 20, "burst": 3}}) as r:
            client = await r.client()
            started = time.monotonic()
            statuses = [(await client.get()).status for _ in range(3)]
            elapsed = time.monotonic() - started
            assert statuses == [200, 200, 200]
            assert elapsed >= 0.09  # the 2nd and 3rd waited their turn: 1/20 s apart
            burst = await asyncio.gather(*(r.get() for _ in range(6)))
            assert sorted(x.status for x in burst).count(429) >= 2  # queue of 3: the rest refused

    run(main())


def test_rate_limits_fall_back_to_per_node_buckets() -> None:
    async def main() -> None:
        async with rig(ratelimits={"api": {"rate": 0.01, "burst": 2}}) as r:
            r.store.fail = True
            assert [(await r.get()).status for _ in range(3)] == [200, 200, 429]
            assert r.stats()["ratelimits"]["api"] == {"allowed": 2, "limited": 1, "local": 3}

    run(main())


def test_rules_and_stickiness_together() -> None:
    async def main() -> None:
        async with rig(sticky={"mode": "cookie"}, ratelimits={"api": {"rate": 0.01, "burst": 2}}) as r:
            first = await r.get()
            assert first.cookie is not None
            assert (await r.get(Cookie=f"HALBSID={first.cookie}")).backend == first.backend
            refused = await r.get(Cookie=f"HALBSID={first.cookie}")
            assert refused.status == 429 and refused.cookie is None
            assert r.stats()["sticky"]["app"]["cache"] == 1  # the refused request never reached stickiness

    run(main())


def test_listeners_without_rules_or_stickiness_get_no_hook() -> None:
    async def main() -> None:
        async with rig() as r:
            (listener,) = r.server._handlers.values()
            assert listener.router.default.sessions is None  # type: ignore[union-attr]
            assert (await r.get()).status == 200

    run(main())


def test_a_routed_pool_brings_its_own_sticky_sessions() -> None:
    """Routes: `/api/` goes to the sticky `api` pool (cookies, mappings under "api"), the rest to the
    listener's `app` pool, which has no stickiness (no cookie); the listener's rate limit counts both."""

    def routed(doc: dict[str, Any], demo: dict[str, DemoBackend]) -> None:
        def pool(names: list[str], **extra: Any) -> dict[str, Any]:
            backends = [{"name": n, "address": f"127.0.0.1:{demo[n].port}"} for n in names]
            return {"backends": backends, "health": {"kind": "none"}, **extra}

        doc["listeners"][0]["routes"] = [{"path_prefix": "/api/", "pool": "api"}]
        doc["pools"] = {
            "app": pool(["web1", "web2"]),
            "api": pool(["web3", "web4"], sticky={"mode": "cookie"}),
        }

    async def main() -> None:
        rules = {"all": {"key": "client_ip", "rate": 0.01, "burst": 6}}
        async with rig(ratelimits=rules, backends=4, edit=routed) as r:
            client = await r.client()
            api = [await client.get("/api/users") for _ in range(2)]
            assert [x.backend for x in api] == ["web3", "web4"] and all(x.cookie for x in api)
            for reply in api:
                assert r.store._sessions[("api", reply.cookie)][0] == reply.backend
                again = await client.get("/api/users", Cookie=f"HALBSID={reply.cookie}")
                assert (again.backend, again.cookie) == (reply.backend, None)
            site = [await client.get("/") for _ in range(2)]
            assert [x.backend for x in site] == ["web1", "web2"] and not any(x.cookie for x in site)
            assert (await client.get("/")).status == 429  # the 7th request: one budget for both pools

    run(main())
