"""The TCP proxy against real asyncio backends on loopback (no subprocesses)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest

from halb.config_model import BackendConfig, HealthConfig, HostPort, ListenerConfig, PoolConfig
from halb.pool import Pool
from halb.proxy.proxy_protocol import V2_SIGNATURE
from halb.proxy.resolve import BackendResolver
from halb.proxy.server import ProxyServer

pytestmark = pytest.mark.timeout(10)

_LOOP = ["asyncio"]
_WRITERS: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop_kind(request: pytest.FixtureRequest) -> str:
    """Every test runs on the stock asyncio loop and on uvloop (what worker processes use)."""
    _LOOP[0] = request.param
    return request.param


def run(main: Callable[[], Coroutine[Any, Any, None]], timeout: float = 5.0) -> None:
    factory = None
    if _LOOP[0] == "uvloop":
        import uvloop  # a dependency on Linux: missing it is a failure, not a skip

        factory = uvloop.new_event_loop

    async def guarded() -> None:
        try:
            await asyncio.wait_for(main(), timeout)
        finally:  # client sockets are closed even when the test failed
            for writer in _WRITERS:
                writer.transport.abort()
            _WRITERS.clear()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(guarded())


async def connect(
    addr: tuple[str, int] | None = None, **kw: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await (asyncio.open_connection(*addr, **kw) if addr else asyncio.open_connection(**kw))
    _WRITERS.append(writer)
    return reader, writer


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def flushed(writer: asyncio.StreamWriter) -> None:
    """Wait until the transport has handed everything written to the kernel."""
    while writer.transport.get_write_buffer_size():
        await asyncio.sleep(0.001)


async def count_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads until EOF (the client's half-close), then answers and closes."""
    total = 0
    while data := await reader.read(65536):
        total += len(data)
    writer.write(b"got %d bytes" % total)
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def backend(handler: StreamHandler) -> AsyncIterator[tuple[int, list[int]]]:
    accepted: list[int] = []
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


def make_pool(ports: list[int], **pool_kw: Any) -> Pool:
    config = PoolConfig(
        name="db",
        backends=tuple(BackendConfig(f"b{i}", HostPort("127.0.0.1", p)) for i, p in enumerate(ports)),
        algorithm="round_robin",
        health=HealthConfig(kind="none"),
        **pool_kw,
    )
    return Pool(config)


@contextlib.asynccontextmanager
async def proxy(pool: Pool, **listener_kw: Any) -> AsyncIterator[tuple[ProxyServer, tuple[str, int]]]:
    listener = ListenerConfig(name="tcp", bind=HostPort("127.0.0.1", 0), pool="db", mode="tcp", **listener_kw)
    server = ProxyServer([listener], {"db": pool})
    await server.start()
    try:
        yield server, server.address("tcp")
    finally:
        await server.close()


async def poll(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def listener_stats(server: ProxyServer) -> dict[str, Any]:
    return server.stats()["listeners"]["tcp"]  # type: ignore[index,no-any-return]


# ---------------------------------------------------------------------------------------------- tests
def test_echo_relay_and_stats() -> None:
    async def main() -> None:
        async with backend(echo) as (port, accepted), proxy(make_pool([port])) as (server, addr):
            reader, writer = await connect(addr)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            blob = bytes(range(256)) * 4096  # 1 MiB
            writer.write(blob)
            assert await reader.readexactly(len(blob)) == blob
            b0 = server.pools["db"].backends[0]
            assert b0.active_connections == 1
            assert listener_stats(server)["connections_active"] == 1
            writer.close()
            await poll(lambda: listener_stats(server)["connections_active"] == 0)
            assert b0.active_connections == 0
            assert b0.requests_total == 1 and b0.response_time_ewma is not None  # on_response at close
            assert b0.bytes_to_backend == b0.bytes_from_backend == len(blob) + 5
            stats = listener_stats(server)
            assert stats["connections_total"] == 1
            assert stats["bytes_in"] == stats["bytes_out"] == len(blob) + 5
            assert accepted == [1]

    run(main)


def test_half_close_keeps_the_other_direction_flowing() -> None:
    async def main() -> None:
        async with backend(count_then_reply) as (port, _), proxy(make_pool([port])) as (server, addr):
            reader, writer = await connect(addr)
            writer.write(b"x" * 100_000)
            await writer.drain()
            writer.write_eof()  # shut our sending side only
            assert await reader.read() == b"got 100000 bytes"  # ...and still receive until the backend closes
            writer.close()
            await poll(lambda: listener_stats(server)["connections_active"] == 0)

    run(main)


def test_backend_half_close_is_relayed_to_the_client() -> None:
    async def speaks_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        writer.write_eof()  # backend done sending, still reading
        data = await reader.read()
        assert data == b"late data"

    async def main() -> None:
        async with backend(speaks_first) as (port, _), proxy(make_pool([port])) as (server, addr):
            reader, writer = await connect(addr)
            assert await reader.read() == b"banner"  # EOF relayed
            writer.write(b"late data")  # the other direction still flows
            writer.write_eof()
            await poll(lambda: listener_stats(server)["connections_active"] == 0)
            writer.close()

    run(main)


@pytest.mark.parametrize("size", [5, 65535, 65536, 1_000_000])
def test_a_reply_sent_with_the_backends_fin_arrives_whole(size: int) -> None:
    # The backend answers and closes while the client does not read yet: the proxy stops reading the
    # backend (backpressure), so the reply's tail and the FIN wait together in its socket buffer, and
    # EPOLLRDHUP comes with every read after that. Only a read that does not fill the buffer is the last
    # one (it goes on with the FIN at once); a full one is not, whatever EPOLLRDHUP says.
    reply = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    written = asyncio.Event()

    async def answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(reply)
        writer.write_eof()
        await flushed(writer)
        written.set()

    async def main() -> None:
        async with backend(answer_and_close) as (port, _), proxy(make_pool([port])) as (server, addr):
            loop = asyncio.get_running_loop()
            with socket.socket() as sock:
                sock.setblocking(False)
                await loop.sock_connect(sock, addr)
                await loop.sock_sendall(sock, b"hello")
                await written.wait()  # (not reading meanwhile: the proxy holds back)
                await asyncio.sleep(0.05)  # (the FIN reaches the proxy's socket)
                received = bytearray()
                while data := await loop.sock_recv(sock, 1 << 20):
                    received += data
                assert received == reply  # every byte, then EOF
            await poll(lambda: listener_stats(server)["connections_active"] == 0)

    run(main)


def test_connect_failure_is_retried_on_another_backend() -> None:
    async def main() -> None:
        dead = closed_port()
        async with backend(echo) as (port, _):
            pool = make_pool([dead, port], retries=1)
            failed: list[str] = []
            pool.on_connect_failure = lambda b: failed.append(b.name)
            async with proxy(pool) as (server, addr):
                for i in range(4):
                    reader, writer = await connect(addr)
                    writer.write(b"ping %d" % i)
                    assert await reader.readexactly(6) == b"ping %d" % i
                    writer.close()
                assert failed and set(failed) == {"b0"}
                assert pool.backends[0].connect_failures_total == len(failed)
                await poll(lambda: listener_stats(server)["connections_active"] == 0)
                assert listener_stats(server)["connect_failures_total"] == len(failed)
                assert pool.backends[0].active_connections == 0 and pool.backends[1].active_connections == 0
                assert pool.backends[1].requests_total == 4

    run(main)


def test_no_backend_or_all_failed_closes_the_client() -> None:
    async def main() -> None:
        pool = make_pool([closed_port(), closed_port()], retries=3)
        async with proxy(pool) as (server, addr):
            reader, writer = await connect(addr)
            assert await reader.read() == b""
            writer.close()
            assert sum(b.connect_failures_total for b in pool.backends) == 2
            for b in pool.backends:
                pool.set_state(b.name, healthy=False)
            reader, writer = await connect(addr)
            assert await reader.read() == b""
            writer.close()
            await poll(lambda: listener_stats(server)["connections_active"] == 0)
            assert listener_stats(server)["no_backend_total"] == 1
            assert all(b.active_connections == 0 for b in pool.backends)

    run(main)


def test_idle_connections_time_out() -> None:
    async def main() -> None:
        async with backend(echo) as (port, _), proxy(make_pool([port]), client_timeout=0.3) as (server, addr):
            reader, writer = await connect(addr)
            writer.write(b"hi")
            assert await reader.readexactly(2) == b"hi"
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
            assert 0.25 < loop.time() - t0 < 2.0
            assert listener_stats(server)["idle_timeouts_total"] == 1
            writer.close()

    run(main)


def test_slow_reader_keeps_proxy_memory_bounded() -> None:
    total = 48 * 1024 * 1024
    progress = [0]

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"y" * 65536
        while progress[0] < total:
            writer.write(chunk)
            progress[0] += len(chunk)
            await writer.drain()
        await flushed(writer)  # (uvloop's close() can drop a non-empty write buffer: halb/proxy/flush.py)
        writer.close()

    async def main() -> None:
        async with backend(firehose) as (port, _), proxy(make_pool([port])) as (server, addr):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.connect(addr)
            sock.setblocking(False)
            reader, writer = await connect(sock=sock, limit=1 << 20)
            last, stable = -1, 0
            while stable < 20:
                await asyncio.sleep(0.01)
                stable = stable + 1 if progress[0] == last else 0
                last = progress[0]
            assert progress[0] < total
            assert server.buffered_bytes() < 2 * 1024 * 1024
            received = 0
            while data := await reader.read(1 << 20):
                received += len(data)
            assert received == total
            writer.close()

    run(main, timeout=8)


def test_client_reset_closes_the_backend_connection() -> None:
    closed = asyncio.Event

    async def main() -> None:
        gone = closed()

        async def waits(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                await reader.read()
            gone.set()

        async with backend(waits) as (port, _), proxy(make_pool([port])) as (server, addr):
            _, writer = await connect(addr)
            writer.write(b"x")
            await writer.drain()
            await poll(lambda: server.pools["db"].backends[0].active_connections == 1)
            writer.transport.abort()
            await asyncio.wait_for(gone.wait(), 2)
            await poll(lambda: listener_stats(server)["connections_active"] == 0)

    run(main)


def test_drain_waits_for_tcp_sessions() -> None:
    async def main() -> None:
        async with backend(echo) as (port, _), proxy(make_pool([port])) as (server, addr):
            reader, writer = await connect(addr)
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            drain = asyncio.ensure_future(server.drain(3.0))
            await asyncio.sleep(0.05)
            assert not drain.done()
            writer.write(b"b")  # still relayed while draining
            assert await reader.readexactly(1) == b"b"
            writer.close()
            assert await drain is True
            assert await server.drain(0.1) is True

    run(main)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_tells_the_backend_who_the_client_is(version: str) -> None:
    """With `send_proxy`, the backend reads a PROXY protocol header naming the client's address and port
    and the listener's, before the client's first byte (here it answers with what it parsed)."""

    async def parse_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if version == "v1":
            line = await reader.readuntil(b"\r\n")
            _, family, src, dst, sport, dport = line.decode().split()
        else:
            fixed = await reader.readexactly(16)
            assert fixed[:12] == V2_SIGNATURE and fixed[12] == 0x21 and fixed[13] == 0x11
            body = await reader.readexactly(struct.unpack("!H", fixed[14:16])[0])
            family = "TCP4"
            src, dst = socket.inet_ntoa(body[:4]), socket.inet_ntoa(body[4:8])
            sport, dport = (str(p) for p in struct.unpack("!HH", body[8:12]))
        first = await reader.readexactly(5)
        writer.write(f"{family} {src}:{sport} {dst}:{dport} then {first.decode()}".encode())
        await writer.drain()

    async def main() -> None:
        async with (
            backend(parse_header) as (port, _),
            proxy(make_pool([port], send_proxy=version)) as (_, addr),
        ):
            reader, writer = await connect(addr)
            writer.write(b"hello")
            answer = (await asyncio.wait_for(reader.read(), 2)).decode()
            client_port = writer.get_extra_info("sockname")[1]
            assert answer == f"TCP4 127.0.0.1:{client_port} 127.0.0.1:{addr[1]} then hello"

    run(main)


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A port whose SYNs go unanswered: a listener whose accept queue is full (Linux then drops SYNs)."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_a_connect_that_never_completes_times_out_and_is_retried() -> None:
    async def main() -> None:
        with unanswered_port() as silent:
            async with backend(echo) as (port, _):
                pool = make_pool([silent, port], retries=1, connect_timeout=0.3)
                async with proxy(pool) as (server, addr):
                    loop = asyncio.get_running_loop()
                    t0 = loop.time()
                    reader, writer = await connect(addr)  # round robin: the silent backend first
                    writer.write(b"ping")
                    assert await reader.readexactly(4) == b"ping"
                    assert 0.25 < loop.time() - t0 < 2.0
                    writer.close()
                    await poll(lambda: listener_stats(server)["connections_active"] == 0)
                    s = listener_stats(server)
                    assert s["connect_failures_total"] == 1 and s["retries_total"] == 1
                    assert pool.backends[0].connect_failures_total == 1
                    assert all(b.active_connections == 0 for b in pool.backends)

                only_silent = make_pool([silent], retries=0, connect_timeout=0.3)
                async with proxy(only_silent) as (server, addr):
                    reader, writer = await connect(addr)
                    assert await reader.read() == b""  # closed once the connect timed out
                    writer.close()
                    await poll(lambda: listener_stats(server)["connections_active"] == 0)
                    assert listener_stats(server)["connect_failures_total"] == 1

    run(main)


def test_a_backend_given_by_host_name_is_resolved() -> None:
    async def main() -> None:
        server_ = await asyncio.start_server(echo, "localhost", 0)  # every address of localhost
        try:
            pool = named_backend_pool("db", "localhost", server_.sockets[0].getsockname()[1])
            async with proxy(pool) as (server, addr):
                reader, writer = await connect(addr)
                writer.write(b"by name")
                assert await reader.readexactly(7) == b"by name"
                writer.close()
                await poll(lambda: listener_stats(server)["connections_active"] == 0)
        finally:
            server_.close()

    run(main)


def named_backend_pool(pool_name: str, host: str, port: int) -> Pool:
    """A pool of one backend given by host name."""
    backends = (BackendConfig("named", HostPort(host, port)),)
    return Pool(PoolConfig(name=pool_name, backends=backends, health=HealthConfig(kind="none")))


def give_two_addresses(server: ProxyServer, first: str, second: str) -> BackendResolver:
    """Make every backend name of `server` resolve to two addresses (no such name exists on a test
    machine); -> its resolver."""

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in (first, second)]

    resolver = server.upstream.resolver
    assert resolver is not None
    resolver.getaddrinfo = getaddrinfo
    return resolver


def test_every_address_of_a_backend_name_is_tried_before_the_backend_fails() -> None:
    async def main() -> None:
        # The name's first address refuses (nothing listens on 127.0.0.1 at that port); the second is the
        # backend. Connections get through, and the backend has no failed connect on its record.
        server_ = await asyncio.start_server(echo, "127.0.0.2", 0)
        try:
            pool = named_backend_pool("db", "app.internal", server_.sockets[0].getsockname()[1])
            async with proxy(pool) as (server, addr):
                resolver = give_two_addresses(server, "127.0.0.1", "127.0.0.2")
                for _ in range(3):
                    reader, writer = await connect(addr)
                    writer.write(b"second")
                    assert await reader.readexactly(6) == b"second"
                    writer.close()
                await poll(lambda: listener_stats(server)["connections_active"] == 0)
                assert pool.backends[0].connect_failures_total == 0
                assert listener_stats(server)["retries_total"] == 0
                assert resolver.lookups_total == 1  # looked up once, not per connection
        finally:
            server_.close()

    run(main)


def test_a_burst_of_short_reset_and_half_closed_connections_leaves_nothing_open() -> None:
    """Many connections ending every way at once: every session ends, every socket is closed, and the
    proxy keeps serving."""

    async def reset(addr: tuple[str, int]) -> None:
        _, writer = await connect(addr)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST at once, maybe before the backend is even connected

    async def half_close(addr: tuple[str, int]) -> None:
        reader, writer = await connect(addr)
        writer.write(b"x" * 1000)
        writer.write_eof()
        assert await reader.read() == b"got 1000 bytes"
        writer.close()

    async def vanish(addr: tuple[str, int]) -> None:
        _, writer = await connect(addr)
        writer.write(b"bye")
        writer.close()

    async def main() -> None:
        async with backend(count_then_reply) as (port, _), proxy(make_pool([port])) as (server, addr):
            await half_close(addr)
            await poll(lambda: listener_stats(server)["connections_active"] == 0)
            baseline = open_fds()
            jobs = [kind(addr) for _ in range(40) for kind in (reset, half_close, vanish)]
            await asyncio.gather(*jobs)
            await poll(lambda: listener_stats(server)["connections_active"] == 0, timeout=5)
            await poll(lambda: open_fds() <= baseline, timeout=5)
            await half_close(addr)  # still serving
            assert listener_stats(server)["connections_total"] == 122

    run(main, timeout=15)
