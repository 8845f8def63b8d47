"""Listeners with `accept_proxy`: every connection starts with a PROXY protocol header from a proxy in
front, and the client address it names is the one halb uses (limits, X-Forwarded-For, send_proxy, logs),
except for allow/deny, which judge the peer. TCP (the raw relay), HTTP and HTTPS; both event loops."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from halb.config_model import TlsConfig
from halb.proxy.proxy_protocol import V2_SIGNATURE, proxy_header
from tests.certs import make_cert
from tests.integration import test_proxy_http as http
from tests.integration.test_proxy_tcp import (
    backend,
    connect,
    echo,
    event_loop_kind,  # noqa: F401  (autouse: every test on asyncio and on uvloop)
    listener_stats,
    make_pool,
    open_fds,
    poll,
    proxy,
    run,
)

pytestmark = pytest.mark.timeout(20)

FRONT = ("127.0.0.1", 443)  # the address the proxy in front was reached at (named in its headers)


async def refused(reader: asyncio.StreamReader) -> bool:
    """The proxy closed the connection without relaying anything (a reset when bytes were left unread)."""
    try:
        return await asyncio.wait_for(reader.read(), 3) == b""
    except ConnectionResetError:
        return True


async def tell_the_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend behind `send_proxy = "v1"`: answers with the source its header named, then echoes."""
    line = await reader.readuntil(b"\r\n")
    _, _, src, _, sport, _ = line.decode().split()
    writer.write(f"from {src}:{sport};".encode())
    await echo(reader, writer)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_tcp_takes_the_client_address_from_the_header(version: str) -> None:
    async def main() -> None:
        async with (
            backend(tell_the_source) as (port, _),
            proxy(make_pool([port], send_proxy="v1"), accept_proxy=True) as (server, addr),
        ):
            reader, writer = await connect(addr)
            # The header and the first bytes in one segment: the bytes after the header are the client's.
            writer.write(proxy_header(version, ("203.0.113.9", 4321), FRONT) + b"hello")
            assert (
                await reader.readexactly(len(b"from 203.0.113.9:4321;hello"))
                == b"from 203.0.113.9:4321;hello"
            )
            writer.write(b" again")
            assert await reader.readexactly(6) == b" again"
            writer.close()
            await poll(lambda: listener_stats(server)["connections_active"] == 0)
            assert listener_stats(server)["rejected"] == {}

    run(main)


def test_tcp_a_header_in_pieces_and_a_local_header() -> None:
    async def main() -> None:
        async with (
            backend(tell_the_source) as (port, _),
            proxy(make_pool([port], send_proxy="v1"), accept_proxy=True) as (_, addr),
        ):
            reader, writer = await connect(addr)
            header = proxy_header("v2", ("198.51.100.20", 999), FRONT)
            for i in range(0, len(header), 5):  # a header that comes a few bytes at a time
                writer.write(header[i : i + 5])
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"x")
            assert await reader.readexactly(len(b"from 198.51.100.20:999;x")) == b"from 198.51.100.20:999;x"
            writer.close()
            # LOCAL (the front proxy's own health check): the connection's own address is used.
            reader, writer = await connect(addr)
            writer.write(V2_SIGNATURE + bytes([0x20, 0x00, 0, 0]) + b"y")
            own = f"from 127.0.0.1:{writer.get_extra_info('sockname')[1]};y".encode()
            assert await reader.readexactly(len(own)) == own
            writer.close()

    run(main)


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # no header: a client that reached the port directly
        b"PROXY TCP4 300.1.2.3 127.0.0.1 1 2\r\n",
        V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + bytes(4),
        b"PROXY TCP4 203.0.113.9",  # then silence: not complete within header_timeout
        b"",  # silence
    ],
)
def test_tcp_a_bad_missing_or_late_header_is_counted_and_closed(first: bytes) -> None:
    async def main() -> None:
        async with (
            backend(echo) as (port, accepted),
            proxy(make_pool([port]), accept_proxy=True, header_timeout=0.3) as (server, addr),
        ):
            baseline = open_fds()
            reader, writer = await connect(addr)
            writer.write(first)
            assert await refused(reader)
            writer.close()
            assert accepted == []  # no backend was asked
            assert listener_stats(server)["rejected"] == {"proxy_header": 1}
            await poll(lambda: open_fds() <= baseline)
            assert server.stats()["connections"] == {"current": 0, "limit": server.gate.limit}  # released
            # ...and the listener goes on serving.
            reader, writer = await connect(addr)
            writer.write(proxy_header("v1", ("203.0.113.9", 1), FRONT) + b"ok")
            assert await reader.readexactly(2) == b"ok"
            writer.close()

    run(main)


def test_limits_count_the_named_client_and_allow_deny_judge_the_peer() -> None:
    async def main() -> None:
        async with (
            backend(echo) as (port, _),
            proxy(make_pool([port]), accept_proxy=True, maxconn_per_ip=1) as (server, addr),
        ):
            held = []
            for src in ("203.0.113.1", "203.0.113.2"):  # one each: both in (the same peer, 127.0.0.1)
                reader, writer = await connect(addr)
                writer.write(proxy_header("v1", (src, 1000), FRONT) + b"hi")
                assert await reader.readexactly(2) == b"hi"
                held.append(writer)
            reader, writer = await connect(addr)  # a second one from 203.0.113.1: over its limit
            writer.write(proxy_header("v1", ("203.0.113.1", 1001), FRONT) + b"hi")
            assert await refused(reader)
            assert listener_stats(server)["rejected"] == {"maxconn_per_ip": 1}
            for w in held:
                w.close()
            await poll(lambda: listener_stats(server)["connections_active"] == 0)
            assert server.stats()["connections"]["current"] == 0
            reader, writer = await connect(addr)  # 203.0.113.1's slot was given back
            writer.write(proxy_header("v1", ("203.0.113.1", 1002), FRONT) + b"hi")
            assert await reader.readexactly(2) == b"hi"
            writer.close()
        # deny judges the connection's peer (the proxy in front), whatever address its header names
        async with (
            backend(echo) as (port, _),
            proxy(make_pool([port]), accept_proxy=True, deny=("127.0.0.0/8",)) as (server, addr),
        ):
            reader, writer = await connect(addr)
            writer.write(proxy_header("v1", ("203.0.113.1", 1000), FRONT) + b"hi")
            assert await refused(reader)
            assert listener_stats(server)["rejected"] == {"denied": 1}

    run(main)


def test_connections_still_sending_their_header_when_the_proxy_closes_are_closed_and_released() -> None:
    async def main() -> None:
        async with backend(echo) as (port, accepted):
            async with proxy(make_pool([port]), accept_proxy=True) as (server, addr):
                readers = []
                for first in (b"", b"PROXY TCP4 203.0.113.9"):
                    reader, writer = await connect(addr)
                    writer.write(first)
                    readers.append(reader)
                relay = server._servers["tcp"]  # (white box: both accepted, their headers being read)
                await poll(lambda: len(relay.tasks()) == 2)
            assert server.stats()["connections"]["current"] == 0  # their slots were given back
            for reader in readers:
                assert await refused(reader)  # and their sockets closed
            assert accepted == []

    run(main)


def test_http_forwards_the_named_client_in_x_forwarded_for() -> None:
    async def main() -> None:
        async with (
            http.backends(None) as (be,),
            http.proxy(http.make_pool([be.port]), accept_proxy=True, header_timeout=0.3) as (server, addr),
        ):
            client = await http.Client.connect(addr)
            client.writer.write(proxy_header("v2", ("2001:db8::9", 5555), ("::1", 80)))
            for i in range(3):  # keep-alive: the header comes once, at the start
                resp = await client.get(f"/p{i}")
                assert resp.status == 200 and resp.body == f"GET /p{i} 0".encode()
            assert [r.get("x-forwarded-for") for r in be.requests] == ["2001:db8::9"] * 3
            client.close()
            bad = await http.Client.connect(addr)
            bad.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # no header: closed, no answer
            assert await bad.at_eof()
            bad.close()
            stats = server.stats()["listeners"]["web"]
            assert stats["rejected"] == {"proxy_header": 1}
            await poll(lambda: server.stats()["listeners"]["web"]["client_connections_active"] == 0)

    run(main)


def test_https_reads_the_header_before_the_handshake(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "front")

    async def main() -> None:
        async with (
            http.backends(None) as (be,),
            http.proxy(http.make_pool([be.port]), accept_proxy=True, tls=TlsConfig(str(cert), str(key))) as (
                _,
                addr,
            ),
        ):
            sock = socket.create_connection(addr)
            sock.sendall(proxy_header("v1", ("192.0.2.44", 7000), FRONT))  # in clear, then TLS
            sock.setblocking(False)
            ctx = ssl.create_default_context(cafile=str(cert))
            reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="localhost")
            client = http.Client(reader, writer)
            resp = await client.get("/tls")
            assert resp.status == 200 and be.requests[0].get("x-forwarded-for") == "192.0.2.44"
            assert be.requests[0].get("x-forwarded-proto") == "https"
            client.close()

    run(main)
