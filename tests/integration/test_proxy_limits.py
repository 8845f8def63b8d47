"""Connection limits and the per-backend maxconn queue (halb.proxy.limits), on both event loops."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from halb.balancing.base import Context
from halb.config_model import BackendConfig, HealthConfig, HostPort, ListenerConfig, PoolConfig, TlsConfig
from halb.pool import Pool
from halb.proxy.limits import BackendQueue, QueueFull
from halb.proxy.server import ProxyServer
from tests.certs import make_cert
from tests.integration.test_proxy_edge import client_context, tls_client
from tests.integration.test_proxy_http import (  # (event_loop_kind: every test on asyncio and uvloop)
    Client,
    backends,
    event_loop_kind,  # noqa: F401
    gated_handler,
    poll,
    read_response,
    run,
)
from tests.integration.test_proxy_tcp import backend as tcp_backend
from tests.integration.test_proxy_tcp import echo

pytestmark = pytest.mark.timeout(20)


def pool_of(ports: list[int], **kw: Any) -> Pool:
    backend_kw = kw.pop("backend_kw", {})
    return Pool(
        PoolConfig(
            name="app",
            backends=tuple(
                BackendConfig(f"b{i}", HostPort("127.0.0.1", p), **backend_kw) for i, p in enumerate(ports)
            ),
            health=HealthConfig(kind="none"),
            **kw,
        )
    )


@contextlib.asynccontextmanager
async def serve(
    pool: Pool, *modes: str, maxconn: int = 0, **listener_kw: Any
) -> AsyncIterator[tuple[ProxyServer, list[tuple[str, int]]]]:
    listeners = [
        ListenerConfig(name=f"l{i}", bind=HostPort("127.0.0.1", 0), pool="app", mode=mode, **listener_kw)
        for i, mode in enumerate(modes or ("http",))
    ]
    server = ProxyServer(listeners, {"app": pool}, maxconn=maxconn)
    await server.start()
    try:
        yield server, [server.address(lc.name) for lc in listeners]
    finally:
        await server.close()


def lstats(server: ProxyServer, name: str = "l0") -> dict[str, Any]:
    return server.stats()["listeners"][name]  # type: ignore[index]


async def connect_from(addr: tuple[str, int], source_ip: str) -> Client:
    sock = socket.socket()
    sock.bind((source_ip, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, addr)
    reader, writer = await asyncio.open_connection(sock=sock)
    return Client(reader, writer)


# --------------------------------------------------------------------------------- connection limits
def test_listener_maxconn_answers_503_and_counts() -> None:
    async def main() -> None:
        async with backends(None) as (be,), serve(pool_of([be.port]), maxconn=0) as (server, _):
            pass
        async with backends(None) as (be,):
            pool = pool_of([be.port])
            listener = ListenerConfig(name="l0", bind=HostPort("127.0.0.1", 0), pool="app", maxconn=2)
            server = ProxyServer([listener], {"app": pool})
            await server.start()
            try:
                addr = server.address("l0")
                a, b = await Client.connect(addr), await Client.connect(addr)
                assert (await a.get("/")).status == 200 and (await b.get("/")).status == 200
                c = await Client.connect(addr)
                resp = await c.get("/")
                assert resp.status == 503 and b"listener_maxconn" in resp.body
                assert resp.get("connection") == "close" and await c.at_eof()
                stats = lstats(server)
                assert stats["rejected"] == {"listener_maxconn": 1}
                assert stats["connections_limit"] == 2
                a.close()
                await poll(lambda: lstats(server)["client_connections_active"] == 1)
                d = await Client.connect(addr)
                assert (await d.get("/")).status == 200  # a slot is free again
                assert (await b.get("/again")).status == 200  # admitted connections are unaffected
            finally:
                await server.close()

    run(main)


def test_maxconn_per_ip_only_limits_that_address() -> None:
    async def main() -> None:
        async with backends(None) as (be,), serve(pool_of([be.port]), maxconn_per_ip=1) as (server, addrs):
            first = await connect_from(addrs[0], "127.0.0.1")
            assert (await first.get("/")).status == 200
            second = await connect_from(addrs[0], "127.0.0.1")
            resp = await second.get("/")
            assert resp.status == 503 and b"maxconn_per_ip" in resp.body
            other = await connect_from(addrs[0], "127.0.0.2")  # another client address: still served
            assert (await other.get("/")).status == 200
            assert lstats(server)["rejected"] == {"maxconn_per_ip": 1}
            first.close()
            await poll(lambda: lstats(server)["client_connections_active"] == 1)
            again = await connect_from(addrs[0], "127.0.0.1")
            assert (await again.get("/")).status == 200

    run(main)


def test_node_maxconn_spans_listeners_and_tcp_rejections_close() -> None:
    async def main() -> None:
        async with (
            tcp_backend(echo) as (port, _),
            serve(pool_of([port]), "tcp", "tcp", maxconn=2) as (server, (a_addr, b_addr)),
        ):
            a = await Client.connect(a_addr)
            b = await Client.connect(b_addr)
            for client in (a, b):
                client.writer.write(b"ping")
                assert await client.reader.readexactly(4) == b"ping"
            c = await Client.connect(b_addr)
            assert await c.at_eof()  # refused: closed without a byte
            assert lstats(server, "l1")["rejected"] == {"node_maxconn": 1}
            assert server.stats()["connections"] == {"current": 2, "limit": 2}  # type: ignore[index]
            a.close()
            await poll(lambda: server.gate.current == 1)
            d = await Client.connect(a_addr)
            d.writer.write(b"pong")
            assert await d.reader.readexactly(4) == b"pong"

    run(main)


def test_automatic_node_maxconn_follows_the_fd_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    server = ProxyServer([], {})
    assert 64 <= server.gate.limit <= max(64, soft // 2)
    assert ProxyServer([], {}, maxconn=10, workers=3).gate.limit == 4  # each worker's share, rounded up


# ------------------------------------------------------------------------------- backend maxconn queue
async def occupy(addr: tuple[str, int], pool: Pool) -> Client:
    """A client whose GET /slow holds the pool's only backend slot (until the gate opens)."""
    slow = await Client.connect(addr)
    slow.writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    await poll(lambda: pool.backends[0].active_connections == 1)
    return slow


def test_backend_maxconn_queues_requests_in_order() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        async with backends(gated_handler(gate)) as (be,):
            pool = pool_of([be.port], maxconn=1, queue_timeout=5.0)
            async with serve(pool) as (server, (addr,)):
                slow = await occupy(addr, pool)
                waiting = [await Client.connect(addr) for _ in range(2)]
                for i, client in enumerate(waiting):
                    client.writer.write(f"GET /q{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                    await poll(lambda i=i: lstats(server)["queued"] == i + 1)
                assert len(be.requests) == 1  # nothing else reached the backend
                gate.set()
                assert (await read_response(slow.reader)).status == 200
                bodies = [(await read_response(c.reader)).body for c in waiting]
                assert bodies == [b"GET /q0 0", b"GET /q1 0"]
                assert [r.target for r in be.requests] == ["/slow", "/q0", "/q1"]  # FIFO
                stats = lstats(server)
                assert stats["queued_total"] == 2 and stats["queued"] == 0
                assert pool.backends[0].active_connections == 0

    run(main)


def test_a_backend_maxconn_that_arrives_at_run_time_gets_its_queue() -> None:
    # The cluster's shared configuration gives a backend a maxconn that its pool did not have when the
    # proxy started (Pool.reconfigure, then pools_changed, as a worker does): it is enforced at once.
    async def main() -> None:
        gate = asyncio.Event()
        async with backends(gated_handler(gate)) as (be,):
            pool = pool_of([be.port], queue_timeout=5.0)
            async with serve(pool, "http", "tcp") as (server, (addr, _)):
                assert (await (await Client.connect(addr)).get("/warm")).status == 200  # inline, no queue
                config = pool.config
                limited = tuple(dataclasses.replace(b, maxconn=1) for b in config.backends)
                pool.reconfigure(dataclasses.replace(config, backends=limited))
                server.pools_changed(["app"])
                slow = await occupy(addr, pool)
                waiting = await Client.connect(addr)
                waiting.writer.write(b"GET /q HTTP/1.1\r\nHost: t\r\n\r\n")
                await poll(lambda: lstats(server)["queued"] == 1)
                assert [r.target for r in be.requests] == ["/warm", "/slow"]  # /q waits for the slot
                gate.set()
                assert (await read_response(slow.reader)).status == 200
                assert (await read_response(waiting.reader)).body == b"GET /q 0"
                assert lstats(server)["queued_total"] == 1
                assert server._handlers["l1"].queue is not None  # (white box: the TCP listener's too)

    run(main)


def test_queue_timeout_and_full_queue_answer_503() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        async with backends(gated_handler(gate)) as (be,):
            pool = pool_of([be.port], maxconn=1, maxqueue=1, queue_timeout=0.3)
            async with serve(pool) as (server, (addr,)):
                slow = await occupy(addr, pool)
                queued = await Client.connect(addr)
                queued.writer.write(b"GET /q HTTP/1.1\r\nHost: t\r\n\r\n")
                await poll(lambda: lstats(server)["queued"] == 1)
                over = await Client.connect(addr)
                resp = await over.get("/over")
                assert resp.status == 503 and b"queue is full" in resp.body
                resp = await read_response(queued.reader)
                assert resp.status == 503 and b"queue timeout" in resp.body
                assert (await queued.get("/next")).status == 503  # keep-alive: the connection is usable
                gate.set()
                assert (await read_response(slow.reader)).status == 200
                assert (await queued.get("/after")).status == 200
                stats = lstats(server)
                assert stats["queue_full_total"] == 1 and stats["queue_timeouts_total"] == 2
                assert [r.target for r in be.requests] == ["/slow", "/after"]

    run(main)


def test_backend_maxconn_spreads_to_backends_with_free_slots() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        async with backends(gated_handler(gate), gated_handler(gate)) as (b0, b1):
            pool = pool_of([b0.port, b1.port], backend_kw={"maxconn": 1})
            async with serve(pool) as (server, (addr,)):
                clients = [await Client.connect(addr) for _ in range(3)]
                for client in clients:
                    client.writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
                await poll(lambda: lstats(server)["queued"] == 1)
                assert [b.active_connections for b in pool.backends] == [1, 1]
                gate.set()
                for client in clients:
                    assert (await read_response(client.reader)).status == 200
                assert len(b0.requests) + len(b1.requests) == 3

    run(main)


def test_client_leaving_the_queue_does_not_leak_the_slot() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        async with backends(gated_handler(gate)) as (be,):
            pool = pool_of([be.port], maxconn=1, queue_timeout=5.0)
            async with serve(pool) as (server, (addr,)):
                slow = await occupy(addr, pool)
                leaver = await Client.connect(addr)
                leaver.writer.write(b"GET /gone HTTP/1.1\r\nHost: t\r\n\r\n")
                await poll(lambda: lstats(server)["queued"] == 1)
                leaver.close()
                await poll(lambda: lstats(server)["queued"] == 0)
                gate.set()
                assert (await read_response(slow.reader)).status == 200
                late = await Client.connect(addr)
                assert (await late.get("/late")).status == 200
                assert [r.target for r in be.requests] == ["/slow", "/late"]

    run(main)


def test_tcp_backend_maxconn_holds_the_next_connection_until_a_slot_frees() -> None:
    async def main() -> None:
        async with tcp_backend(echo) as (port, _):
            pool = pool_of([port], maxconn=1, queue_timeout=5.0)
            async with serve(pool, "tcp") as (server, (addr,)):
                first = await Client.connect(addr)
                first.writer.write(b"one")
                assert await first.reader.readexactly(3) == b"one"
                second = await Client.connect(addr)
                second.writer.write(b"two")
                await poll(lambda: lstats(server)["queued"] == 1)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(second.reader.readexactly(3), 0.2)
                first.writer.write_eof()
                assert await first.at_eof()
                assert await second.reader.readexactly(3) == b"two"
                assert lstats(server)["queued_total"] == 1

    run(main)


def test_a_backends_own_queue_is_served_before_the_pools_and_a_leaver_frees_its_place() -> None:
    """`BackendQueue.acquire` (a sticky session's request for one backend) against `choose` (any backend),
    on the queue alone: a slot freed on b0 goes to b0's own waiter first, even though a pool waiter came
    earlier; a waiter cancelled after being handed a slot passes it on; maxqueue counts both queues."""

    async def main() -> None:
        pool = pool_of([1, 2], maxconn=1, maxqueue=3, queue_timeout=5.0)
        queue = BackendQueue(pool)
        b0, b1 = pool.backends
        for b in (b0, b1):
            b.on_connection_opened()  # both backends busy
        ctx = Context("192.0.2.1", "", 0.0)
        general = asyncio.ensure_future(queue.choose(ctx))
        await asyncio.sleep(0)
        own = asyncio.ensure_future(queue.acquire(b0))
        leaver = asyncio.ensure_future(queue.acquire(b0))
        await asyncio.sleep(0)
        assert queue.waiting == 3
        with pytest.raises(QueueFull):
            await queue.acquire(b1)
        b0.on_connection_closed()
        queue.slot_freed(b0)  # b0's own queue first, although the pool waiter came first
        await asyncio.wait_for(own, 1)
        assert not general.done() and not leaver.done()
        b0.on_connection_opened()  # `own` takes its slot
        leaver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaver
        b1.on_connection_closed()
        queue.slot_freed(b1)  # nobody waits for b1 itself: the pool's waiter gets it
        assert await asyncio.wait_for(general, 1) is b1
        assert queue.waiting == 0

    run(main)


def test_allow_and_deny_networks_refuse_sources_before_anything_is_read(tmp_path: Path) -> None:
    """allow 127.0.0.0/24 but deny 127.0.0.3: 127.0.0.1 is served, 127.0.0.3 and 127.0.1.1 are closed
    without an answer (HTTP, TCP and TLS listeners alike) and counted as "denied"."""
    cert, key = make_cert(tmp_path, "front")
    acl = {"allow": ("127.0.0.0/24",), "deny": ("127.0.0.3",)}

    async def main() -> None:
        async with (
            backends(None) as (be,),
            tcp_backend(echo) as (echo_port, _),
            serve(pool_of([be.port]), "http", **acl) as (http_server, (http_addr,)),
            serve(pool_of([echo_port]), "tcp", **acl) as (tcp_server, (tcp_addr,)),
            serve(pool_of([be.port]), "http", tls=TlsConfig(str(cert), str(key)), **acl) as (
                tls_server,
                (tls_addr,),
            ),
        ):
            allowed = await connect_from(http_addr, "127.0.0.1")
            assert (await allowed.get("/")).status == 200
            relayed = await connect_from(tcp_addr, "127.0.0.1")
            relayed.writer.write(b"ping")
            assert await asyncio.wait_for(relayed.reader.readexactly(4), 2) == b"ping"
            for source in ("127.0.0.3", "127.0.1.1"):  # denied, and outside allow
                for addr in (http_addr, tcp_addr, tls_addr):
                    refused = await connect_from(addr, source)
                    refused.writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    assert await refused.at_eof()
            for server in (http_server, tcp_server, tls_server):
                assert lstats(server)["rejected"] == {"denied": 2}
            trusted = await tls_client(tls_addr, client_context(cert))  # (from 127.0.0.1: allowed)
            assert (await trusted.get("/")).status == 200

    run(main)
