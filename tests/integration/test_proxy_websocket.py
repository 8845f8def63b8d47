"""WebSocket through the HTTP proxy: the handshake is forwarded, a 101 turns the connection into a tunnel.

The backend here is a raw asyncio server that speaks just enough HTTP: it answers a WebSocket handshake
with `101 Switching Protocols` (and a first message in the same packet), then echoes what it gets; a few
paths make it misbehave. WebSocket frames are opaque bytes to a tunnel, so the messages are plain bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from halb.config_model import TlsConfig
from halb.proxy.access_log import AccessLog
from tests.certs import make_cert
from tests.integration.test_proxy_edge import client_context, stats, tls_client
from tests.integration.test_proxy_http import (  # (event_loop_kind: every test on asyncio and uvloop)
    Client,
    FakeBackend,
    event_loop_kind,  # noqa: F401
    make_pool,
    poll,
    proxy,
    read_response,
    run,
)

pytestmark = pytest.mark.timeout(30)

HANDSHAKE = (
    "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@dataclass
class WsBackend(FakeBackend):
    """Answers a WebSocket handshake with 101 + "hello", then echoes ("echo:" + data); after the client's
    EOF it sends "bye" and its own EOF. `/plain` answers 200 to anything, `/h2c-101` switches to the wrong
    protocol, `/reset` resets the connection after the first message. Records every request head."""

    heads: list[bytes] = field(default_factory=list)

    def headers(self, i: int) -> dict[str, str]:
        lines = self.heads[i].decode("latin-1").split("\r\n")[1:-2]
        return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # (not FakeBackend's: this one speaks raw bytes after the 101 and closes with a FIN, not a reset)
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                path = head.split(b" ")[1]
                lower = head.lower()
                wants_ws = b"\r\nupgrade: websocket\r\n" in lower and b"\r\nconnection: upgrade\r\n" in lower
                if not wants_ws or path == b"/plain":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
                    continue
                if path == b"/h2c-101":
                    writer.write(
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                    )
                    await reader.read()
                    return
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello"
                )
                if path == b"/close":  # the backend ends the conversation first
                    writer.write(b"bye")
                    writer.write_eof()
                    await reader.read()
                    return
                if path == b"/reset":
                    await reader.read(1)
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                while data := await reader.read(65536):
                    writer.write(b"echo:" + data)
                    await writer.drain()
                writer.write(b"bye")
                writer.write_eof()
                await writer.drain()
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()


@contextlib.asynccontextmanager
async def ws_backend() -> AsyncIterator[WsBackend]:
    backend = WsBackend()
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


async def handshake(client: Client, path: str = "/chat") -> dict[str, str]:
    """Send the WebSocket handshake; -> the 101's headers (the status is asserted)."""
    client.writer.write(HANDSHAKE.format(path=path).encode())
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 3)
    lines = head.decode("latin-1").split("\r\n")[:-2]
    assert lines[0].startswith("HTTP/1.1 101 "), lines
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}


async def read_exactly(client: Client, n: int) -> bytes:
    return await asyncio.wait_for(client.reader.readexactly(n), 3)


def test_websocket_handshake_becomes_a_tunnel_both_ways() -> None:
    async def main() -> None:
        async with ws_backend() as be, proxy(make_pool([be.port])) as (server, addr):
            pool_backend = server.pools["app"].backends[0]
            client = await Client.connect(addr)
            headers = await handshake(client)
            assert headers["upgrade"] == "websocket" and headers["connection"] == "Upgrade"
            assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
            assert await read_exactly(client, 5) == b"hello"  # came in the same packet as the 101

            seen = be.headers(0)  # the handshake reached the backend with what WebSocket needs
            assert seen["upgrade"] == "websocket" and seen["connection"] == "Upgrade"
            assert seen["sec-websocket-key"] == "dGhlIHNhbXBsZSBub25jZQ=="
            assert seen["sec-websocket-version"] == "13"
            assert seen["x-forwarded-for"] == "127.0.0.1"

            for message in (b"ping1", b"ping2"):
                client.writer.write(message)
                assert await read_exactly(client, 5 + len(message)) == b"echo:" + message
            big = bytes(range(256)) * 2048  # 512 KiB: through both directions' backpressure
            client.writer.write(big)
            echoed = bytearray()
            while len(echoed) < len(big):
                echoed += await asyncio.wait_for(client.reader.read(1 << 20), 3)
            assert echoed.replace(b"echo:", b"") == big

            s = stats(server)
            assert s["tunnels_active"] == 1 and s["tunnels_total"] == 1
            assert pool_backend.active_connections == 1  # the tunnel holds its backend connection

            client.writer.write_eof()  # half-close: the backend still answers, then closes its side
            assert await read_exactly(client, 3) == b"bye"
            assert await client.at_eof()
            await poll(lambda: stats(server)["tunnels_active"] == 0)
            await poll(lambda: server.open_connections() == 0)
            s = stats(server)
            assert s["responses"]["1xx"] == 1 and s["tunnels_total"] == 1
            assert s["backend_errors_total"] == 0
            assert pool_backend.active_connections == 0

    run(main)


def test_idle_tunnel_is_closed_after_tunnel_timeout() -> None:
    async def main() -> None:
        async with ws_backend() as be, proxy(make_pool([be.port]), tunnel_timeout=0.3) as (server, addr):
            client = await Client.connect(addr)
            await handshake(client)
            assert await read_exactly(client, 5) == b"hello"
            client.writer.write(b"x")
            assert await read_exactly(client, 6) == b"echo:x"
            loop = asyncio.get_running_loop()
            quiet_since = loop.time()
            assert await client.at_eof()  # nothing moved for tunnel_timeout: both sides cut
            assert loop.time() - quiet_since >= 0.25
            await poll(lambda: stats(server)["tunnels_active"] == 0)
            await poll(lambda: server.open_connections() == 0)

    run(main)


def test_backend_reset_cuts_the_tunnel() -> None:
    async def main() -> None:
        async with ws_backend() as be, proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            await handshake(client, "/reset")
            assert await read_exactly(client, 5) == b"hello"
            client.writer.write(b"x")
            assert await client.at_eof()
            await poll(lambda: stats(server)["tunnels_active"] == 0)
            await poll(lambda: server.open_connections() == 0)
            client.close()

    run(main)


def test_backend_that_declines_the_upgrade_keeps_the_connection_http() -> None:
    async def main() -> None:
        async with ws_backend() as be, proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            resp = await client.request(HANDSHAKE.format(path="/plain").encode())
            assert resp.status == 200 and resp.body == b"plain"
            assert (await client.get("/next")).status == 200  # still a keep-alive HTTP connection
            assert stats(server)["tunnels_total"] == 0
            client.close()

    run(main)


@pytest.mark.parametrize(
    "request_head",
    [
        # h2c would carry HTTP/2 past every check of the proxy: never forwarded
        "GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
        # not a WebSocket handshake: a body, or not GET, or HTTP/1.0, or no Connection: Upgrade
        "POST / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Content-Length: 2\r\n\r\nhi",
        "PUT / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "GET / HTTP/1.0\r\nHost: t\r\nConnection: Upgrade, keep-alive\r\nUpgrade: websocket\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\r\n",
    ],
)
def test_other_upgrades_are_stripped_and_answered_as_plain_requests(request_head: str) -> None:
    async def main() -> None:
        async with ws_backend() as be, proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            method = request_head.split(" ")[0]
            resp = await client.request(request_head.encode(), method)
            assert resp.status == 200 and resp.body == b"plain"
            seen = be.headers(0)
            assert "upgrade" not in seen and "http2-settings" not in seen
            assert seen.get("connection", "keep-alive") == "keep-alive"
            assert stats(server)["tunnels_total"] == 0
            client.close()

    run(main)


def test_a_101_to_another_protocol_is_a_502() -> None:
    async def main() -> None:
        async with ws_backend() as be, proxy(make_pool([be.port])) as (server, addr):
            client = await Client.connect(addr)
            client.writer.write(HANDSHAKE.format(path="/h2c-101").encode())
            resp = await asyncio.wait_for(read_response(client.reader), 3)
            assert resp.status == 502
            s = stats(server)
            assert s["tunnels_total"] == 0 and s["backend_errors_total"] == 1
            client.close()

    run(main)


def test_websocket_over_tls(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "front")

    async def main() -> None:
        async with (
            ws_backend() as be,
            proxy(make_pool([be.port]), tls=TlsConfig(str(cert), str(key))) as (server, addr),
        ):
            client = await tls_client(addr, client_context(cert))
            await handshake(client)
            assert await read_exactly(client, 5) == b"hello"
            client.writer.write(b"over tls")
            assert await read_exactly(client, 13) == b"echo:over tls"
            assert be.headers(0)["x-forwarded-proto"] == "https"
            client.writer.close()  # close_notify, then FIN: the tunnel ends, both connections close
            await poll(lambda: stats(server)["tunnels_active"] == 0)
            await poll(lambda: server.open_connections() == 0)

            # The backend ends first: TLS cannot half-close, so the client connection is closed once
            # the backend's last bytes are written (not left open until tunnel_timeout, 3600 s here).
            client = await tls_client(addr, client_context(cert))
            await handshake(client, "/close")
            assert await read_exactly(client, 8) == b"hellobye"
            assert await asyncio.wait_for(client.reader.read(), 3) == b""
            await poll(lambda: stats(server)["tunnels_active"] == 0)
            await poll(lambda: server.open_connections() == 0)

    run(main)


def test_a_websocket_connection_is_one_access_log_line(tmp_path: Path) -> None:
    path = tmp_path / "access.log"

    async def main() -> None:
        access_log = AccessLog(str(path))
        async with ws_backend() as be, proxy(make_pool([be.port]), access_log=access_log) as (server, addr):
            client = await Client.connect(addr)
            await handshake(client)
            assert await read_exactly(client, 5) == b"hello"
            client.writer.write(b"12345")
            assert await read_exactly(client, 10) == b"echo:12345"
            client.writer.write_eof()
            assert await read_exactly(client, 3) == b"bye"
            await poll(lambda: server.open_connections() == 0)
        access_log.close()
        (line,) = path.read_text().splitlines()
        assert " web app/b0 " in line and " 101 " in line and '"GET /chat HTTP/1.1"' in line
        head_and_frames = int(line.split(" 101 ")[1].split(" ")[0])
        assert head_and_frames > len(b"hello" + b"echo:12345" + b"bye")

    run(main)
