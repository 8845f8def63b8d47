"""Inline requests: what the HTTP proxy answers from its protocol callbacks, and every hand-over to the
connection's task (`HttpConnection._serve_inline`). Real asyncio backends on loopback, both event loops.

A simple request (no body, a pooled backend connection, a whole Content-Length response) is answered
without waking the connection's task; anything else is handed to the task at the stage the callbacks
reached. These tests check that a client sees exactly what the task-only path gives it in every
hand-over, and that nothing is left behind (backend connections, in-flight counts, timers).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from halb.backend import Backend
from tests.integration.test_proxy_http import (
    Client,
    Request,
    backends,
    default_handler,
    event_loop_kind,  # noqa: F401  (autouse: every test on asyncio and on uvloop)
    gated_handler,
    make_pool,
    poll,
    proxy,
    read_response,
    run,
)

pytestmark = pytest.mark.timeout(20)


def listener_stats(server: Any) -> dict[str, Any]:
    return dict(server.stats()["listeners"]["web"])


async def varied(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
    """A backend whose answer depends on the path: the shapes the callbacks hand over to the task."""
    target = req.target
    if req.method == "HEAD":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n")
    elif target == "/chunked":
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    elif target == "/large":
        body = b"L" * 200_000
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    elif target == "/hint":
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nhint")
    elif target == "/split":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"ngth: 5\r\n\r\nspl")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"it")
    elif target == "/head-first":  # the head and part of the body, the rest later
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhead")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"first")
    elif target == "/empty":
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    else:
        return await default_handler(req, reader, writer, conn_no)
    await writer.drain()
    return True


def test_simple_requests_are_answered_inline_with_the_usual_headers() -> None:
    async def main() -> None:
        async with backends(None) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            ids = set()
            for i in range(20):
                resp = await client.get(f"/n{i}", "X-Forwarded-For: 192.0.2.1\r\n")
                assert resp.status == 200 and resp.body == f"GET /n{i} 0".encode()
                assert resp.get("x-backend") == "yes"
                ids.add(resp.get("x-request-id"))
            assert len(ids) == 20 and None not in ids
            forwarded = be.requests[-1]
            assert forwarded.get("x-forwarded-for") == "192.0.2.1, 127.0.0.1"
            assert forwarded.get("x-forwarded-proto") == "http"
            assert forwarded.get("x-request-id") in ids
            stats = listener_stats(server)
            # the first request opened the backend connection (the task's path), the rest went inline
            assert stats["requests_total"] == 20 and stats["inline_total"] == 19
            assert stats["responses"]["2xx"] == 20 and stats["in_flight"] == 0
            assert be.connections == 1
            b0: Backend = server.pools["app"].backends[0]
            assert b0.active_connections == 0 and b0.requests_total == 20
            client.close()

    run(main)


def test_every_hand_over_gives_the_same_answers_as_the_task() -> None:
    async def main() -> None:
        async with backends(varied) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            assert (await client.get("/warm")).status == 200
            cases = [
                ("/chunked", b"hello"),
                ("/large", b"L" * 200_000),
                ("/hint", b"hint"),
                ("/split", b"split"),
                ("/head-first", b"headfirst"),
                ("/empty", b""),
                ("/after", b"GET /after 0"),
            ]
            for path, body in cases:
                resp = await client.get(path)
                assert resp.status in (200, 204) and resp.body == body, path
            # a body, a HEAD, a head that arrives in two pieces
            resp = await client.request(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
            assert resp.status == 200 and resp.body == b"POST /p 3"
            resp = await client.request(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n", method="HEAD")
            assert resp.status == 200 and resp.body == b"" and resp.get("content-length") == "8"
            client.writer.write(b"GET /two-pieces HTTP/1.1\r\nHo")
            await client.writer.drain()
            await asyncio.sleep(0.02)
            resp = await client.request(b"st: t\r\n\r\n")
            assert resp.status == 200 and resp.body == b"GET /two-pieces 0"
            # pipelined: simple, handed over, simple -- answered in order
            client.writer.write(
                b"".join(f"GET {p} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for p in ("/a", "/chunked", "/b"))
            )
            bodies = [(await read_response(client.reader)).body for _ in range(3)]
            assert bodies == [b"GET /a 0", b"hello", b"GET /b 0"]
            stats = listener_stats(server)
            assert stats["in_flight"] == 0 and stats["responses"]["5xx"] == 0
            # answered by the callbacks: /split and /head-first (waited for their pieces), /empty (204),
            # /after, the HEAD and the pipelined /a; everything else was handed over (and /b followed
            # /chunked in the task)
            assert stats["inline_total"] == 6
            assert be.connections == 1  # every hand-over kept the pooled connection usable
            client.close()

    run(main)


def test_a_bad_head_after_inline_requests_is_answered_400() -> None:
    async def main() -> None:
        async with backends(None) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            assert (await client.get("/ok")).status == 200
            assert (await client.get("/ok")).status == 200
            resp = await client.request(b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n")
            assert resp.status == 400 and resp.get("connection") == "close"
            assert await client.at_eof()
            stats = listener_stats(server)
            assert sum(stats["bad_requests"].values()) == 1 and len(be.requests) == 2
            client.close()

    run(main)


def test_a_late_response_to_an_inline_request_gives_504_and_frees_the_backend() -> None:
    async def slow_second(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        if req.target == "/silent":
            await reader.read()  # never answers
            return False
        return await default_handler(req, reader, writer, conn_no)

    async def main() -> None:
        async with backends(slow_second) as (be,), proxy(make_pool([be.port], timeout=0.3)) as (server, addr):
            client = await Client.connect(addr)
            assert (await client.get("/first")).status == 200
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            resp = await client.get("/silent")
            assert resp.status == 504 and 0.25 < loop.time() - t0 < 2
            b0: Backend = server.pools["app"].backends[0]
            await poll(lambda: b0.active_connections == 0)
            await poll(lambda: not be.writers)  # the silent connection was closed, not pooled
            assert (await client.get("/after")).status == 200  # the client connection goes on
            stats = listener_stats(server)
            assert stats["backend_timeouts_total"] == 1 and stats["in_flight"] == 0
            client.close()

    run(main)


def test_idle_timeout_counts_from_the_last_inline_response() -> None:
    async def main() -> None:
        async with backends(None) as (be,), proxy(make_pool([be.port]), client_timeout=0.4) as (_, addr):
            client = await Client.connect(addr)
            loop = asyncio.get_running_loop()
            for _ in range(5):  # 5 x 0.2 s: longer than client_timeout since the task last looked
                assert (await client.get("/")).status == 200
                await asyncio.sleep(0.2)
            last = loop.time() - 0.2
            assert await client.at_eof()  # closed for idleness...
            assert 0.3 < loop.time() - last < 1.5  # ...about client_timeout after the last response
            client.close()

    run(main)


def test_client_reset_during_an_inline_request_frees_the_backend() -> None:
    async def hang(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        if req.target == "/hang":
            with contextlib.suppress(ConnectionError):
                await reader.read()
            return False
        return await default_handler(req, reader, writer, conn_no)

    async def main() -> None:
        async with backends(hang) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            assert (await client.get("/first")).status == 200
            client.writer.write(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
            await poll(lambda: any(r.target == "/hang" for r in be.requests))
            b0: Backend = server.pools["app"].backends[0]
            assert b0.active_connections == 1
            client.reset()
            await poll(lambda: b0.active_connections == 0)
            await poll(lambda: not be.writers)
            stats = listener_stats(server)
            assert stats["in_flight"] == 0 and stats["client_connections_active"] == 0

    run(main)


def test_connection_close_and_drain_end_the_connection_after_an_inline_answer() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        async with backends(gated_handler(gate)) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            assert (await client.get("/warm")).status == 200
            resp = await client.get("/bye", "Connection: close\r\n")
            assert resp.status == 200 and resp.get("connection") == "close"
            assert await client.at_eof()
            client.close()

            busy = await Client.connect(addr)
            assert (await busy.get("/warm")).status == 200
            busy.writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            await poll(lambda: any(r.target == "/slow" for r in be.requests))
            drain = asyncio.ensure_future(server.drain(3.0))
            await asyncio.sleep(0.05)
            gate.set()
            resp = await read_response(busy.reader)
            assert resp.status == 200 and resp.get("connection") == "close"
            assert await busy.at_eof()
            assert await drain is True
            # /bye, then busy's /warm (the backend connection /bye left in the pool) and /slow
            assert listener_stats(server)["inline_total"] == 3
            busy.close()

    run(main)


@pytest.mark.parametrize("size", [10, 60_000])
def test_the_last_inline_answer_arrives_whole_before_the_close(size: int) -> None:
    # The last answer on a connection goes out corked with the FIN (one segment, HAProxy's way). The
    # client must still get all of it, then EOF -- also when it pipelined more requests after its
    # `Connection: close` one (they are dropped).
    body = b"b" * size

    async def sized(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        return True

    async def main() -> None:
        async with backends(sized) as (be,), proxy(make_pool([be.port])) as (server, addr):
            for extra in (b"", b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n" * 50):
                client = await Client.connect(addr)
                assert (await client.get("/warm")).body == body  # (the backend connection is pooled now)
                before = listener_stats(server)["inline_total"]
                client.writer.write(b"GET /bye HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" + extra)
                resp = await read_response(client.reader)
                assert resp.status == 200 and resp.get("connection") == "close" and resp.body == body
                assert await client.at_eof()
                assert listener_stats(server)["inline_total"] == before + 1  # answered inline
                client.close()

    run(main)


def test_a_client_half_close_during_an_inline_request_still_gets_the_answer() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        async with backends(gated_handler(gate)) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            assert (await client.get("/warm")).status == 200
            client.writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            client.writer.write_eof()  # the task wakes for the FIN and takes the request over
            await poll(lambda: any(r.target == "/slow" for r in be.requests))
            await asyncio.sleep(0.05)
            gate.set()
            resp = await read_response(client.reader)
            assert resp.status == 200 and resp.body == b"GET /slow 0"
            assert await client.at_eof()
            stats = listener_stats(server)
            assert stats["in_flight"] == 0 and stats["backend_timeouts_total"] == 0
            client.close()

    run(main)


def test_drain_waits_for_a_request_the_callbacks_handed_over() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        async with backends(gated_handler(gate)) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)  # no pooled backend connection yet: handed to the task
            client.writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            await poll(lambda: bool(be.requests))
            drain = asyncio.ensure_future(server.drain(3.0))
            await asyncio.sleep(0.05)
            assert not drain.done()  # the connection is busy, not idle: drain waits for it
            gate.set()
            resp = await read_response(client.reader)
            assert resp.status == 200 and resp.get("connection") == "close"
            assert await drain is True
            client.close()

    run(main)


def test_heads_in_small_pieces_and_bad_response_heads_on_the_inline_path() -> None:
    # The callbacks take a segment that is exactly one head without buffering it, and find a response
    # head with one search: a segment of 1-3 bytes is not a head, and a response head with bare LFs or
    # an over-long status line is still refused (502) on that path.
    async def shapes(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        if req.target == "/bare-lf":
            writer.write(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok\r\n\r\n")
        elif req.target == "/long-line":
            writer.write(b"HTTP/1.1 200 " + b"R" * 9000 + b"\r\nContent-Length: 2\r\n\r\nok")
        elif req.target == "/extra":  # more than the response: the connection cannot be reused
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokJUNK")
        else:
            return await default_handler(req, reader, writer, conn_no)
        await writer.drain()
        return True

    async def main() -> None:
        async with backends(shapes) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            assert (await client.get("/warm")).status == 200  # (the backend connection is pooled now)
            head = b"GET /pieces HTTP/1.1\r\nHost: t\r\n\r\n"
            for size in (1, 2, 3):
                for i in range(0, len(head), size):
                    client.writer.write(head[i : i + size])
                    await client.writer.drain()
                    await asyncio.sleep(0.002)
                resp = await read_response(client.reader)
                assert resp.status == 200 and resp.body == b"GET /pieces 0", size
            stats = listener_stats(server)
            assert sum(stats["bad_requests"].values()) == 0
            assert be.connections == 1
            resp = await client.get("/extra")
            assert resp.status == 200 and resp.body == b"ok"
            assert listener_stats(server)["inline_total"] == stats["inline_total"] + 1
            assert (await client.get("/next")).body == b"GET /next 0"
            assert be.connections == 2  # the connection that sent too much was closed, not pooled
            for path in ("/bare-lf", "/long-line"):
                client = await Client.connect(addr)
                assert (await client.get("/warm")).status == 200  # (a 502 drops the pooled connection)
                before = listener_stats(server)["inline_total"]
                resp = await client.get(path)
                assert resp.status == 502, path
                assert listener_stats(server)["inline_total"] == before  # handed over, not answered
                client.close()
            stats = listener_stats(server)
            assert stats["in_flight"] == 0 and stats["responses"]["5xx"] == 2

    run(main)


def test_a_pipelined_request_on_the_connection_just_answered_is_still_resent_when_it_dies() -> None:
    # /a is answered from the segment that carried its response (Channel.on_chunk); the pipelined /die
    # then goes out at once on the same pooled connection, which the backend closes without answering.
    # The connection had received nothing since /die went out, so the GET is resent on a new one: that
    # needs the connection's byte count to include /a's answer before /die was sent.
    async def first_dies(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        if req.target == "/die" and conn_no == 1:
            return False  # close without answering, as a backend closing an idle connection would
        return await default_handler(req, reader, writer, conn_no)

    async def main() -> None:
        async with backends(first_dies) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            assert (await client.get("/warm")).status == 200  # (backend connection 1 is pooled now)
            client.writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /die HTTP/1.1\r\nHost: t\r\n\r\n")
            first, second = await read_response(client.reader), await read_response(client.reader)
            assert (first.status, first.body) == (200, b"GET /a 0")
            assert (second.status, second.body) == (200, b"GET /die 0")
            stats = listener_stats(server)
            assert stats["reconnects_total"] == 1 and be.connections == 2
            client.close()

    run(main)
