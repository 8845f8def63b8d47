"""The HTTP reverse proxy against real asyncio backends on loopback (no subprocesses)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from halb.backend import Backend
from halb.config_model import BackendConfig, HealthConfig, HostPort, ListenerConfig, PoolConfig, RouteConfig
from halb.pool import Pool
from halb.proxy.access_log import AccessLog
from halb.proxy.http_codec import parse_request_head
from halb.proxy.http_proxy import HttpListener
from halb.proxy.server import ProxyServer
from halb.proxy.upstream_pool import UpstreamPool
from tests.integration.test_proxy_tcp import give_two_addresses, named_backend_pool

pytestmark = pytest.mark.timeout(10)

_LOOP = ["asyncio"]
_CLIENTS: list[Client] = []


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop_kind(request: pytest.FixtureRequest) -> str:
    """Every test runs on the stock asyncio loop and on uvloop (what worker processes use)."""
    _LOOP[0] = request.param
    return request.param


def run(main: Callable[[], Coroutine[Any, Any, None]], timeout: float = 5.0) -> None:
    loop = _LOOP[0]
    factory = None
    if loop == "uvloop":
        import uvloop  # a dependency on Linux: missing it is a failure, not a skip

        factory = uvloop.new_event_loop

    async def guarded() -> None:
        try:
            await asyncio.wait_for(main(), timeout)
        finally:  # client sockets are closed even when the test failed
            for client in _CLIENTS:
                client.writer.transport.abort()
            _CLIENTS.clear()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(guarded())


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------- backends
@dataclass
class Request:
    head: bytes
    method: str
    target: str
    headers: list[tuple[str, str]]
    body_sha: str = ""
    body_len: int = 0
    body: bytes = b""

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


Handler = Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


async def default_handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
    body = f"{req.method} {req.target} {req.body_len}".encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Backend: yes\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    return True


def gated_handler(gate: asyncio.Event) -> Handler:
    """The default answer, but requests for /slow... wait until `gate` is set."""

    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        if req.target.startswith("/slow"):
            await gate.wait()
        return await default_handler(req, reader, writer, conn_no)

    return handler


@dataclass
class FakeBackend:
    handler: Handler = default_handler
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None
    port: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    keep_body: bool = False

    async def start(self) -> FakeBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn_no = self.connections
        self.writers.add(writer)
        try:
            while True:
                try:
                    req = await read_request(reader, keep=self.keep_body)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(req)
                self.received.set()
                if not await self.handler(req, reader, writer, conn_no):
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()


async def read_request(reader: asyncio.StreamReader, keep: bool = False) -> Request:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")[:-2]
    method, target, _ = lines[0].split(" ")
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    req = Request(head, method, target, headers)
    sha = hashlib.sha256()
    body = bytearray()
    if (req.get("transfer-encoding") or "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            data = await reader.readexactly(size)
            sha.update(data)
            req.body_len += size
            if keep:
                body += data
            assert await reader.readexactly(2) == b"\r\n"
    elif req.get("content-length"):
        remaining = int(req.get("content-length") or 0)
        while remaining:
            data = await reader.read(min(remaining, 1 << 16))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            sha.update(data)
            req.body_len += len(data)
            if keep:
                body += data
    req.body_sha = sha.hexdigest()
    req.body = bytes(body)
    return req


# --------------------------------------------------------------------------------------------- client
@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> Response:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")[:-2]
        status = int(lines[0].split(" ")[1])
        headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        if status >= 200:
            break
    resp = Response(status, headers, b"")
    if method == "HEAD" or status in (204, 304):
        return resp
    if (resp.get("transfer-encoding") or "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        resp.body = bytes(body)
    elif resp.get("content-length") is not None:
        resp.body = await reader.readexactly(int(resp.get("content-length") or 0))
    else:
        resp.body = await reader.read()
    return resp


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        _CLIENTS.append(self)

    @classmethod
    async def connect(cls, addr: tuple[str, int]) -> Client:
        reader, writer = await asyncio.open_connection(*addr, limit=1 << 20)
        return cls(reader, writer)

    async def request(self, raw: bytes, method: str = "GET") -> Response:
        self.writer.write(raw)
        await self.writer.drain()
        return await read_response(self.reader, method)

    async def get(self, path: str = "/", extra: str = "") -> Response:
        return await self.request(f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())

    async def at_eof(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), 2) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.transport.abort()

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0) instead of FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


# ---------------------------------------------------------------------------------------------- proxy
def make_pool(ports: list[int], **pool_kw: Any) -> Pool:
    config = PoolConfig(
        name="app",
        backends=tuple(BackendConfig(f"b{i}", HostPort("127.0.0.1", p)) for i, p in enumerate(ports)),
        algorithm=pool_kw.pop("algorithm", "round_robin"),
        health=HealthConfig(kind="none"),
        **pool_kw,
    )
    return Pool(config)


@contextlib.asynccontextmanager
async def proxy(
    pool: Pool, access_log: AccessLog | None = None, **listener_kw: Any
) -> AsyncIterator[tuple[ProxyServer, tuple[str, int]]]:
    listener = ListenerConfig(name="web", bind=HostPort("127.0.0.1", 0), pool="app", **listener_kw)
    server = ProxyServer([listener], {"app": pool}, access_log=access_log)
    await server.start()
    try:
        yield server, server.address("web")
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def backends(*handlers: Handler | None, keep_body: bool = False) -> AsyncIterator[list[FakeBackend]]:
    started = [await FakeBackend(handler=h or default_handler, keep_body=keep_body).start() for h in handlers]
    try:
        yield started
    finally:
        for b in started:
            await b.stop()


@contextlib.asynccontextmanager
async def stream_backend(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A raw backend: `handler` gets each connection; every connection is closed at exit."""
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
            writers.discard(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in list(writers):
            writer.transport.abort()


async def upload(client: Client, size: int) -> None:
    """Send `size` bytes of body in 64 KiB writes; the proxy closing the connection ends it early."""
    with contextlib.suppress(ConnectionError):
        for _ in range(size // 65536):
            client.writer.write(b"u" * 65536)
            await client.writer.drain()


async def poll(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------------------------- tests
def test_every_address_of_a_backend_name_is_tried_before_the_backend_fails() -> None:
    # The name's first address refuses (nothing listens on 127.0.0.2 at that port), the second is the
    # backend. Each answer closes its connection, so every request opens a new upstream connection.
    async def closing(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        return False

    async def main() -> None:
        async with backends(closing) as (be,):
            pool = named_backend_pool("app", "app.internal", be.port)
            async with proxy(pool) as (server, addr):
                resolver = give_two_addresses(server, "127.0.0.2", "127.0.0.1")
                client = await Client.connect(addr)
                for i in range(3):
                    resp = await client.get(f"/n{i}")
                    assert resp.status == 200 and resp.body == b"ok"
                client.close()
                assert be.connections == 3
                assert pool.backends[0].connect_failures_total == 0
                assert resolver.lookups_total == 1  # looked up once, not per connection

    run(main)


def test_keep_alive_reuses_backend_connections_and_sets_headers() -> None:
    async def main() -> None:
        async with backends(None) as (be,), proxy(make_pool([be.port])) as (server, addr):
            c1 = await Client.connect(addr)
            for i in range(3):
                resp = await c1.get(f"/r{i}")
                assert resp.status == 200 and resp.body == f"GET /r{i} 0".encode()
            c2 = await Client.connect(addr)
            resp = await c2.get("/other", "X-Forwarded-For: 10.0.0.1\r\nX-Request-ID: my-id-1\r\n")
            assert resp.get("x-request-id") == "my-id-1"
            c1.close()
            c2.close()
            assert be.connections == 1  # one pooled connection served both clients
            assert len(be.requests) == 4
            first = be.requests[0]
            assert first.get("x-forwarded-for") == "127.0.0.1"
            assert first.get("x-forwarded-proto") == "http"
            rid = first.get("x-request-id")
            assert rid and re.fullmatch(r"[0-9a-f]{32}", rid)
            assert len({r.get("x-request-id") for r in be.requests}) == 4
            last = be.requests[3]
            assert last.get("x-forwarded-for") == "10.0.0.1, 127.0.0.1"
            assert last.get("x-request-id") == "my-id-1"
            stats = server.stats()["listeners"]["web"]  # type: ignore[index]
            assert stats["requests_total"] == 4 and stats["responses"]["2xx"] == 4
            assert stats["client_connections_total"] == 2
            assert server.stats()["upstream"]["reuses_total"] == 3  # type: ignore[index]
            b0 = server.pools["app"].backends[0]
            assert b0.requests_total == 4 and b0.bytes_to_backend > 0 and b0.bytes_from_backend > 0
            await poll(lambda: b0.active_connections == 0)

    run(main)


def test_request_id_returned_and_hop_by_hop_headers_stripped() -> None:
    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
            b"Keep-Alive: timeout=5\r\nX-Request-ID: backend-id\r\nX-End: 1\r\n\r\nok"
        )
        await writer.drain()
        return True

    async def main() -> None:
        async with backends(handler) as (be,), proxy(make_pool([be.port])) as (_, addr):
            client = await Client.connect(addr)
            resp = await client.get(
                "/",
                "Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nProxy-Connection: x\r\n"
                "TE: gzip\r\nUpgrade: websocket\r\nX-Forwarded-Proto: https\r\n",
            )
            client.close()
            seen = be.requests[0]
            for name in ("x-secret", "keep-alive", "proxy-connection", "te", "upgrade", "connection"):
                assert name not in seen.names(), name
            assert seen.get("x-forwarded-proto") == "http"
            names = {k.lower() for k, _ in resp.headers}
            assert {"x-hop", "keep-alive", "connection"}.isdisjoint(names)
            assert resp.get("x-end") == "1"
            assert resp.get("x-request-id") == seen.get("x-request-id") != "backend-id"

    run(main)


def test_pipelined_requests_are_answered_in_order() -> None:
    async def main() -> None:
        async with backends(None) as (be,), proxy(make_pool([be.port])) as (_, addr):
            client = await Client.connect(addr)
            raw = b"".join(
                b"GET /p%d HTTP/1.1\r\nHost: t\r\n\r\n" % i if i != 1 else
                b"POST /p1 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                for i in range(4)
            )  # fmt: skip
            client.writer.write(raw)
            bodies = [(await read_response(client.reader)).body for _ in range(4)]
            client.close()
            assert bodies == [b"GET /p0 0", b"POST /p1 3", b"GET /p2 0", b"GET /p3 0"]

    run(main)


def test_large_bodies_are_streamed_both_ways() -> None:
    size = 5 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Got: %d\r\nX-Sha: %s\r\n\r\n"
            % (size, req.body_len, req.body_sha.encode())
        )
        for i in range(0, size, 1 << 16):
            writer.write(payload[i : i + (1 << 16)])
            await writer.drain()
        return True

    async def main() -> None:
        async with backends(handler) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            client.writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, size, 100_000):
                piece = payload[i : i + 100_000]
                client.writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await client.writer.drain()
            client.writer.write(b"0\r\n\r\n")
            resp = await read_response(client.reader)
            assert resp.status == 200
            assert resp.get("x-got") == str(size)
            assert resp.get("x-sha") == hashlib.sha256(payload).hexdigest()
            assert resp.body == payload
            # The connection is still usable afterwards.
            assert (await client.get("/after")).status == 200
            client.close()
            b0 = server.pools["app"].backends[0]
            assert b0.bytes_to_backend > size and b0.bytes_from_backend > size

    run(main, timeout=8)


def test_slow_client_keeps_proxy_memory_bounded() -> None:
    size = 48 * 1024 * 1024
    sent = [0]
    chunk = b"x" * (1 << 16)

    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        while sent[0] < size:
            writer.write(chunk)
            sent[0] += len(chunk)
            await writer.drain()
        return True

    async def main() -> None:
        async with backends(handler) as (be,), proxy(make_pool([be.port])) as (server, addr):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.connect(addr)
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            Client(reader, writer)  # (closed at the end even on failure)
            writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            # Do not read: wait until the backend is blocked (its progress stops).
            last, stable = -1, 0
            while stable < 20:
                await asyncio.sleep(0.01)
                stable = stable + 1 if sent[0] == last else 0
                last = sent[0]
            assert sent[0] < size
            assert server.buffered_bytes() < 2 * 1024 * 1024, server.buffered_bytes()
            resp = await read_response(reader)
            assert len(resp.body) == size
            writer.transport.abort()

    run(main, timeout=8)


def test_connect_failure_is_retried_on_another_backend() -> None:
    async def main() -> None:
        dead = closed_port()
        async with backends(None) as (be,):
            pool = make_pool([dead, be.port], retries=2, connect_timeout=1.0)
            failed: list[str] = []
            pool.on_connect_failure = lambda backend: failed.append(backend.name)
            async with proxy(pool) as (server, addr):
                for _ in range(4):  # round robin: the dead backend is chosen at least once
                    client = await Client.connect(addr)
                    assert (await client.get("/")).status == 200
                    client.close()
            assert failed and set(failed) == {"b0"}
            assert pool.backends[0].connect_failures_total == len(failed)
            assert pool.backends[0].active_connections == 0
            stats = server.stats()["listeners"]["web"]  # type: ignore[index]
            assert stats["connect_failures_total"] == len(failed) and stats["responses"]["2xx"] == 4

    run(main)


def test_all_connects_failing_gives_503() -> None:
    async def main() -> None:
        pool = make_pool([closed_port(), closed_port()], retries=5)
        async with proxy(pool) as (_, addr):
            client = await Client.connect(addr)
            resp = await client.get("/")
            assert resp.status == 503  # as HAProxy once connection retries are exhausted
            assert sum(b.connect_failures_total for b in pool.backends) == 2  # each tried once
            assert (await client.get("/")).status == 503  # connection kept, nothing sent upstream
            client.close()

    run(main)


def test_no_available_backend_gives_503_quickly() -> None:
    async def main() -> None:
        async with backends(None) as (be,):
            pool = make_pool([be.port])
            pool.set_state("b0", healthy=False)
            async with proxy(pool) as (server, addr):
                client = await Client.connect(addr)
                resp = await client.get("/")
                assert resp.status == 503
                assert b'no healthy backend in pool "app"' in resp.body
                assert (await client.request(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n", "HEAD")).status == 503
                client.close()
                assert pool.no_backend_total == 2 and be.connections == 0
                stats = server.stats()["listeners"]["web"]  # type: ignore[index]
                assert stats["responses"]["5xx"] == 2 and stats["no_backend_total"] == 2

    run(main)


def test_error_answer_to_an_unread_upload_is_not_lost() -> None:
    """503 while the client still uploads: lingering close, the client reads the answer (no reset)."""

    async def main() -> None:
        pool = make_pool([closed_port()])
        pool.set_state("b0", healthy=False)
        async with proxy(pool) as (_, addr):
            client = await Client.connect(addr)
            size = 4 * 1024 * 1024
            client.writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
            uploading = asyncio.ensure_future(upload(client, size))
            resp = await read_response(client.reader)
            assert resp.status == 503 and resp.get("connection") == "close"
            await uploading
            assert await client.at_eof()
            client.close()

    run(main)


def test_backend_answering_before_the_body_ends_closes_the_client() -> None:
    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        # Like nginx: keep reading (and dropping) the upload so the answer is not destroyed by a reset.
        while await reader.read(65536):
            pass

    async def main() -> None:
        async with stream_backend(early) as port, proxy(make_pool([port])) as (_, addr):
            client = await Client.connect(addr)
            size = 2 * 1024 * 1024
            client.writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
            uploading = asyncio.ensure_future(upload(client, size))
            resp = await read_response(client.reader)
            assert resp.status == 413 and resp.body == b"big"
            assert resp.get("connection") == "close"
            await uploading
            assert await client.at_eof()
            client.close()

    run(main)


def test_bad_chunk_in_a_streamed_body_gives_400_and_aborts_the_backend_side() -> None:
    async def main() -> None:
        async with backends(None) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            client.writer.write(
                b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
            await poll(lambda: be.connections == 1)  # the head went upstream, the body is being streamed
            client.writer.write(b"zz\r\nbad\r\n")
            resp = await read_response(client.reader)
            assert resp.status == 400
            assert await client.at_eof()
            client.close()
            await poll(lambda: not be.writers)  # the backend connection was aborted, not reused
            assert not be.requests  # the backend never saw a complete request
            stats = server.stats()["listeners"]["web"]  # type: ignore[index]
            assert stats["bad_requests"] == {"bad_chunk": 1}
            assert server.stats()["upstream"]["idle"] == 0  # type: ignore[index]

    run(main)


def test_silent_backend_gives_504() -> None:
    async def silent(req: Request, reader: asyncio.StreamReader, writer: Any, conn_no: int) -> bool:
        await reader.read()  # never answers
        return False

    async def main() -> None:
        async with backends(silent) as (be,), proxy(make_pool([be.port], timeout=0.3)) as (server, addr):
            client = await Client.connect(addr)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            resp = await client.get("/")
            assert resp.status == 504 and 0.25 < loop.time() - t0 < 2
            client.close()
            await poll(lambda: server.pools["app"].backends[0].active_connections == 0)

    run(main)


def test_slow_request_head_gives_408() -> None:
    async def main() -> None:
        async with backends(None) as (be,), proxy(make_pool([be.port]), header_timeout=0.3) as (server, addr):
            client = await Client.connect(addr)
            client.writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")
            resp = await read_response(client.reader)
            assert resp.status == 408
            assert await client.at_eof()
            client.close()
            assert be.connections == 0
            stats = server.stats()["listeners"]["web"]  # type: ignore[index]
            assert stats["bad_requests"] == {"timeout": 1}

    run(main)


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n",
    ],
)
def test_smuggling_shapes_get_400_and_reach_no_backend(raw: bytes) -> None:
    async def main() -> None:
        async with backends(None) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            resp = await client.request(raw)
            assert resp.status == 400
            assert resp.get("connection") == "close"
            assert await client.at_eof()
            client.close()
            assert be.connections == 0 and not be.requests
            stats = server.stats()["listeners"]["web"]  # type: ignore[index]
            assert sum(stats["bad_requests"].values()) == 1

    run(main)


def test_oversized_heads() -> None:
    async def main() -> None:
        pool = make_pool([closed_port()])
        async with proxy(pool, max_request_line=100, max_header_bytes=400) as (_, addr):
            client = await Client.connect(addr)
            assert (await client.get("/" + "a" * 200)).status == 414
            client.close()
            client = await Client.connect(addr)
            assert (await client.get("/", "X: " + "b" * 500 + "\r\n")).status == 431
            client.close()

    run(main)


def test_drain_lets_an_in_flight_request_finish() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        async with backends(gated_handler(gate)) as (be,), proxy(make_pool([be.port])) as (server, addr):
            idle = await Client.connect(addr)
            assert (await idle.get("/quick")).status == 200
            busy = await Client.connect(addr)
            busy.writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            await poll(lambda: any(r.target == "/slow" for r in be.requests))
            drain = asyncio.ensure_future(server.drain(3.0))
            assert await idle.at_eof()  # the idle keep-alive connection is closed at once
            with pytest.raises(OSError):
                await asyncio.open_connection(*addr)  # no longer accepting
            assert not drain.done()
            gate.set()
            resp = await read_response(busy.reader)
            assert resp.status == 200 and resp.body == b"GET /slow 0"
            assert resp.get("connection") == "close"
            assert await busy.at_eof()
            assert await drain is True
            idle.close()
            busy.close()

    run(main)


def test_dead_pooled_connection_is_retried_for_idempotent_requests_only() -> None:
    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        if req.target.startswith("/die"):
            return False  # close without answering, as a backend closing an idle connection would
        return await default_handler(req, reader, writer, conn_no)

    async def main() -> None:
        async with backends(handler) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            assert (await client.get("/one")).status == 200
            # The pooled connection is reused for /die... and dies; the GET is resent on a fresh connection,
            # which dies too (same handler): the client gets 502, not a hang, and only one resend happened.
            assert (await client.get("/die")).status == 502
            assert be.connections == 2
            stats = server.stats()["listeners"]["web"]  # type: ignore[index]
            assert stats["reconnects_total"] == 1
            assert (await client.get("/two")).status == 200  # fresh connection (nothing pooled)
            resp = await client.request(b"POST /die-post HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx")
            assert resp.status == 502
            assert be.connections == 3  # the POST was not resent
            client.close()

    run(main)


def test_backend_reset_mid_response_closes_the_client() -> None:
    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()
        return False

    async def main() -> None:
        async with backends(handler) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            client.writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await read_response(client.reader)
            client.close()
            await poll(lambda: server.pools["app"].backends[0].active_connections == 0)

    run(main)


def test_expect_continue_head_and_http10() -> None:
    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        if req.method == "HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            await writer.drain()
            return True
        return await default_handler(req, reader, writer, conn_no)

    async def main() -> None:
        async with backends(handler) as (be,), proxy(make_pool([be.port])) as (_, addr):
            client = await Client.connect(addr)
            resp = await client.request(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n", "HEAD")
            assert resp.status == 200 and resp.get("content-length") == "1234"
            assert (await client.get("/after-head")).body == b"GET /after-head 0"
            client.close()
            # HTTP/1.0 without keep-alive: answered, then closed.
            client = await Client.connect(addr)
            resp = await client.request(b"GET /old HTTP/1.0\r\n\r\n")
            assert resp.body == b"GET /old 0" and resp.get("connection") == "close"
            assert await client.at_eof()
            client.close()
            # HTTP/1.0 with keep-alive stays open.
            client = await Client.connect(addr)
            resp = await client.request(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert resp.get("connection") == "keep-alive"
            assert (
                await client.request(b"GET /ka2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            ).status == 200
            client.close()
            assert be.requests[-1].head.startswith(b"GET /ka2 HTTP/1.0\r\n")

    run(main)


def test_expect_100_continue_is_relayed() -> None:
    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"Expect: 100-continue" in head
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await reader.readexactly(5)
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\n" + body)
            await writer.drain()
            await reader.read()

        async with stream_backend(serve) as port, proxy(make_pool([port])) as (_, addr):
            client = await Client.connect(addr)
            client.writer.write(
                b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
            )
            interim = await client.reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 ")
            client.writer.write(b"hello")
            resp = await read_response(client.reader)
            assert resp.status == 201 and resp.body == b"hello"
            client.close()

    run(main)


def test_chunked_response_with_trailers_passes_through() -> None:
    wire = b"4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\nX-Check: 1\r\n\r\n"

    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Check\r\n\r\n")
        for i in range(0, len(wire), 3):  # dribble it out in small pieces
            writer.write(wire[i : i + 3])
            await writer.drain()
        return True

    async def main() -> None:
        async with backends(handler) as (be,), proxy(make_pool([be.port])) as (_, addr):
            client = await Client.connect(addr)
            client.writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await client.reader.readuntil(b"\r\n\r\n")
            assert b"Transfer-Encoding: chunked" in head and b"Trailer: X-Check" in head
            assert await client.reader.readexactly(len(wire)) == wire
            assert (await client.get("/next")).status == 200
            client.close()
            assert be.connections == 1

    run(main)


def test_close_delimited_response_closes_the_client_connection() -> None:
    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
        await writer.drain()
        return False

    async def main() -> None:
        async with backends(handler) as (be,), proxy(make_pool([be.port])) as (_, addr):
            client = await Client.connect(addr)
            resp = await client.get("/")
            assert resp.body == b"until close" and resp.get("connection") == "close"
            client.close()

    run(main)


def test_hash_key_sources() -> None:
    async def main() -> None:
        def key(hash_key: str, raw: bytes) -> str:
            pool = make_pool([1], hash_key=hash_key)
            config = ListenerConfig(name="l", bind=HostPort("127.0.0.1", 0), pool="app")
            return HttpListener(config, pool, UpstreamPool()).router.default.hash_key(parse_request_head(raw))

        raw = b"GET /a/b?c=d HTTP/1.1\r\nHost: t\r\nX-User: alice\r\nCookie: x=1; sid=abc; y=2\r\n\r\n"
        assert key("client_ip", raw) == ""
        assert key("header:x-user", raw) == "alice"
        assert key("header:X-Missing", raw) == ""
        assert key("cookie:sid", raw) == "abc"
        assert key("cookie:SID", raw) == ""
        assert key("path", raw) == "/a/b"

    run(main)


def test_same_key_goes_to_the_same_backend() -> None:
    async def main() -> None:
        async with backends(None, None, None) as bes:
            pool = make_pool([b.port for b in bes], algorithm="consistent_hash", hash_key="header:X-User")
            async with proxy(pool) as (_, addr):
                client = await Client.connect(addr)
                for _ in range(6):
                    assert (await client.get("/", "X-User: alice\r\n")).status == 200
                client.close()
            assert sorted(len(b.requests) for b in bes) == [0, 0, 6]

    run(main)


def test_bind_error_names_the_listener() -> None:
    async def main() -> None:
        pool = make_pool([1])
        listener = ListenerConfig(name="public", bind=HostPort("192.0.2.1", 8080), pool="app")
        server = ProxyServer([listener], {"app": pool})
        with pytest.raises(OSError, match=r"listener 'public'.*192\.0\.2\.1:8080"):
            await server.start()
        await server.close()

    run(main)


def test_two_servers_share_a_port_with_reuseport() -> None:
    async def main() -> None:
        async with backends(None) as (be,):
            pool = make_pool([be.port])
            async with proxy(pool) as (_, addr):
                listener = ListenerConfig(name="web", bind=HostPort(*addr), pool="app")
                second = ProxyServer([listener], {"app": pool})
                await second.start()
                await second.close()

    run(main)


def test_client_disconnect_while_waiting_releases_the_backend() -> None:
    async def main() -> None:
        async def slow(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
            with contextlib.suppress(ConnectionError):
                await reader.read()  # until the proxy closes the connection
            return False

        async with backends(slow) as (be,), proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            client.writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            await poll(lambda: bool(be.requests))
            b0: Backend = server.pools["app"].backends[0]
            assert b0.active_connections == 1
            # A FIN alone is a half-close: the proxy keeps waiting for the answer (like HAProxy without
            # abortonclose). A reset means the client is gone: the exchange is abandoned at once.
            client.reset()
            await poll(lambda: b0.active_connections == 0)
            await poll(lambda: not be.writers)  # the backend connection was closed too
            stats = server.stats()["listeners"]["web"]  # type: ignore[index]
            assert stats["client_connections_active"] == 0 and stats["in_flight"] == 0

    run(main)


def test_redirect_to_https_answers_without_a_backend() -> None:
    async def main() -> None:
        async with backends(None) as (be,), proxy(make_pool([be.port]), redirect_to_https=True) as (_, addr):
            client = await Client.connect(addr)
            resp = await client.request(b"GET /a?b=1 HTTP/1.1\r\nHost: example.com:80\r\n\r\n")
            assert (resp.status, resp.get("location")) == (301, "https://example.com/a?b=1")
            resp = await client.request(  # another method must be kept: 308; the body is read
                b"POST /form HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello", "POST"
            )
            assert (resp.status, resp.get("location")) == (308, "https://example.com/form")
            resp = await client.request(b"GET /v6 HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
            assert resp.get("location") == "https://[::1]/v6"
            resp = await client.request(b"GET http://example.com/abs HTTP/1.1\r\nHost: example.com\r\n\r\n")
            assert resp.get("location") == "https://example.com/abs"
            for bad in (b"Host: evil.com/x\r\n", b"Host: a b\r\n"):
                bad_client = await Client.connect(addr)
                resp = await bad_client.request(b"GET / HTTP/1.1\r\n" + bad + b"\r\n")
                assert resp.status == 400
            assert be.requests == []
        async with (
            backends(None) as (be,),
            proxy(make_pool([be.port]), redirect_to_https=True, https_port=8443) as (_, addr),
        ):
            client = await Client.connect(addr)
            resp = await client.request(b"HEAD /x HTTP/1.1\r\nHost: example.com\r\n\r\n", "HEAD")
            assert (resp.status, resp.get("location")) == (301, "https://example.com:8443/x")

    run(main)


def test_routes_send_requests_to_other_pools_by_host_and_path(tmp_path: Path) -> None:
    """Content switching on one listener: by host, by path prefix, the rest to the listener's pool; on one
    keep-alive connection the route changes request by request. The `api` pool has a maxconn queue (so
    its requests go through the connection's task), the others are served inline."""
    log_path = tmp_path / "access.log"

    async def main() -> None:
        async with backends(None, None, None) as (app_be, api_be, static_be):
            pools = {
                "app": make_pool([app_be.port]),
                "api": Pool(
                    PoolConfig(
                        name="api",
                        backends=(BackendConfig("api1", HostPort("127.0.0.1", api_be.port)),),
                        health=HealthConfig(kind="none"),
                        maxconn=4,
                    )
                ),
                "static": Pool(
                    PoolConfig(
                        name="static",
                        backends=(BackendConfig("static1", HostPort("127.0.0.1", static_be.port)),),
                        health=HealthConfig(kind="none"),
                    )
                ),
            }
            listener = ListenerConfig(
                name="web",
                bind=HostPort("127.0.0.1", 0),
                pool="app",
                routes=(
                    RouteConfig(pool="api", host="api.example.com"),
                    RouteConfig(pool="static", path_prefix="/static/"),
                ),
            )
            access_log = AccessLog(str(log_path))
            server = ProxyServer([listener], pools, access_log=access_log)
            await server.start()
            try:
                client = await Client.connect(server.address("web"))
                asked = [
                    ("www.example.com", "/page"),
                    ("api.example.com", "/users"),
                    ("www.example.com", "/static/app.js"),
                    ("API.EXAMPLE.COM:8080", "/static/not-static"),  # the host route comes first
                    ("www.example.com", "/"),
                ]
                for host, path in asked * 2:
                    resp = await client.request(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                    assert resp.status == 200
                assert [r.target for r in app_be.requests] == ["/page", "/"] * 2
                assert [r.target for r in api_be.requests] == ["/users", "/static/not-static"] * 2
                assert [r.target for r in static_be.requests] == ["/static/app.js"] * 2
                # Inline once a pooled backend connection exists: app's "/" of the first round, then
                # app and static in the second; never api (its maxconn queue may have to wait).
                stats = server.stats()["listeners"]["web"]  # type: ignore[index]
                assert stats["inline_total"] == 4
            finally:
                await server.close()
                access_log.close()
            pools_logged = [line.split(" ")[3].split("/")[0] for line in log_path.read_text().splitlines()]
            assert pools_logged == ["app", "api", "static", "api", "app"] * 2

    run(main)


def test_response_headers_replace_the_backends_own() -> None:
    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=1\r\nX-Kept: yes\r\n"
            b"strict-transport-security: max-age=2\r\nContent-Length: 2\r\n\r\nok"
            if req.method == "GET"
            else b"HTTP/1.1 200 OK\r\nX-Kept: yes\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )
        await writer.drain()
        return True

    async def main() -> None:
        sets = (("Strict-Transport-Security", "max-age=63072000"), ("X-Frame-Options", "DENY"))
        async with backends(handler) as (be,), proxy(make_pool([be.port]), response_headers=sets) as (_, a):
            client = await Client.connect(a)
            for resp in (
                await client.get("/"),  # (the first: through the task; the second: inline)
                await client.get("/"),
                await client.request(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx", "POST"),
            ):
                assert resp.status == 200 and resp.body == b"ok"
                names = [k.lower() for k, _ in resp.headers]
                assert names.count("strict-transport-security") == 1 and names.count("x-frame-options") == 1
                assert resp.get("strict-transport-security") == "max-age=63072000"
                assert resp.get("x-frame-options") == "DENY" and resp.get("x-kept") == "yes"

    run(main)
