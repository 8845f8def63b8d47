"""Bad input at the front door, and TLS termination, against a real ProxyServer on loopback.

Every bad-input case here is answered without harming the other clients, counted in the listener's
stats and leaves no file descriptor behind; none may log an error. Runs on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import socket
import ssl
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest

from halb.config_model import TlsConfig
from halb.proxy.server import ProxyServer
from tests.certs import make_cert, peer_common_name
from tests.integration.test_proxy_http import (  # (event_loop_kind: every test on asyncio and uvloop)
    Client,
    Request,
    backends,
    default_handler,
    event_loop_kind,  # noqa: F401
    make_pool,
    poll,
    proxy,
    read_response,
    run,
    stream_backend,
)
from tests.integration.test_proxy_tcp import echo, open_fds

pytestmark = pytest.mark.timeout(30)


def stats(server: ProxyServer) -> dict[str, Any]:
    return server.stats()["listeners"]["web"]  # type: ignore[index]


def no_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# --------------------------------------------------------------------------------------- bad clients
def test_burst_of_bad_clients_is_counted_harms_nobody_and_leaks_no_fd(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    rng = random.Random(7)
    big = b"B" * (2 * 1024 * 1024)

    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        if req.target == "/big":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
            writer.write(big)
            await writer.drain()
            return True
        return await default_handler(req, reader, writer, conn_no)

    async def garbage(addr: tuple[str, int]) -> None:
        client = await Client.connect(addr)
        noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        client.writer.write(noise + b"\r\n\r\n")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            await asyncio.wait_for(client.reader.read(), 3)  # an answer (400...) then EOF, or just EOF
        client.close()

    async def half_open(addr: tuple[str, int]) -> None:
        client = await Client.connect(addr)
        client.writer.write(b"GET /half HTTP/1.1\r\nHo")
        client.writer.write_eof()
        resp = await read_response(client.reader)
        assert resp.status == 400
        client.close()

    async def abrupt(addr: tuple[str, int]) -> None:
        client = await Client.connect(addr)
        client.writer.write(b"GET /abrupt HTTP/1.1\r\nHost: t\r\nX-Partial: ")
        await client.writer.drain()
        await asyncio.sleep(0.01)
        client.reset()

    async def silent(addr: tuple[str, int]) -> None:
        client = await Client.connect(addr)
        client.close()

    async def slowloris(addr: tuple[str, int]) -> None:
        client = await Client.connect(addr)
        client.writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n")
        resp = await read_response(client.reader)
        assert resp.status == 408
        client.close()

    async def reset_mid_response(addr: tuple[str, int]) -> None:
        client = await Client.connect(addr)
        client.writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        await client.reader.readexactly(1000)
        client.reset()

    async def good(addr: tuple[str, int]) -> None:
        client = await Client.connect(addr)
        for i in range(5):
            resp = await client.get(f"/good{i}")
            assert resp.status == 200 and resp.body == f"GET /good{i} 0".encode()
        client.close()

    async def main() -> None:
        async with (
            backends(handler) as (be,),
            proxy(make_pool([be.port]), header_timeout=0.5) as (server, addr),
        ):
            warm = await Client.connect(addr)
            assert (await warm.get("/warm")).status == 200
            warm.close()
            await poll(lambda: server.open_connections() == 0)
            server.upstream.close_all()
            baseline = open_fds()
            kinds = [garbage, half_open, abrupt, silent, slowloris, reset_mid_response, good]
            jobs = [kind(addr) for _ in range(12) for kind in kinds]
            rng.shuffle(jobs)
            await asyncio.gather(*jobs)

            s = stats(server)
            bad = s["bad_requests"]
            assert bad.get("timeout") == 12 and bad.get("incomplete") == 12, bad
            assert sum(bad.values()) >= 12 * 3  # + the garbage, by whatever reason each one got
            assert s["client_aborts_total"] >= 12
            assert s["responses"]["2xx"] >= 12 * 5
            # Everything closes: the proxy holds no connection and no descriptor more than before.
            await poll(lambda: server.open_connections() == 0, timeout=5)
            server.upstream.close_all()
            await poll(lambda: open_fds() <= baseline, timeout=5)
        no_errors(caplog)

    run(main, timeout=25)


def test_request_line_and_single_header_limits_are_counted() -> None:
    async def main() -> None:
        async with (
            backends(None) as (be,),
            proxy(make_pool([be.port]), max_request_line=256, max_header_bytes=2048) as (server, addr),
        ):
            client = await Client.connect(addr)
            assert (await client.get("/" + "a" * 300)).status == 414
            client = await Client.connect(addr)
            assert (await client.get("/", "X-Huge: " + "b" * 3000 + "\r\n")).status == 431  # one header
            client = await Client.connect(addr)
            many = "".join(f"X-{i}: {'c' * 40}\r\n" for i in range(60))  # a block of small ones
            assert (await client.get("/", many)).status == 431
            assert stats(server)["bad_requests"] == {"line_too_long": 1, "head_too_large": 2}
            assert not be.requests

    run(main)


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_backend_reset_before_answering_gives_502(method: str) -> None:
    async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def main() -> None:
        async with stream_backend(resetting) as port, proxy(make_pool([port])) as (server, addr):
            client = await Client.connect(addr)
            body = b"x" * 10
            raw = f"{method} /r HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            resp = await client.request(raw)
            assert resp.status == 502
            # A fresh connection took the request bytes: nothing is resent, not even a GET.
            s = stats(server)
            assert s["backend_errors_total"] == 1 and s["reconnects_total"] == 0
            assert (await client.get("/again")).status == 502  # the client connection stays usable

    run(main)


# ---------------------------------------------------------------------------------------------- TLS
def client_context(cafile: Path, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    for key, value in kw.items():
        setattr(ctx, key, value)
    return ctx


async def tls_client(addr: tuple[str, int], ctx: ssl.SSLContext) -> Client:
    reader, writer = await asyncio.open_connection(*addr, ssl=ctx, server_hostname="localhost")
    return Client(reader, writer)


def test_tls_termination_forwards_plain_http(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "front")

    async def main() -> None:
        async with (
            backends(None) as (be,),
            proxy(make_pool([be.port]), tls=TlsConfig(str(cert), str(key))) as (_, addr),
        ):
            client = await tls_client(addr, client_context(cert))
            ssl_object = client.writer.get_extra_info("ssl_object")
            assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
            assert ssl_object.selected_alpn_protocol() in (None, "http/1.1")
            for i in range(3):  # keep-alive over TLS
                resp = await client.get(f"/t{i}")
                assert resp.status == 200 and resp.body == f"GET /t{i} 0".encode()
            assert be.requests[0].get("x-forwarded-proto") == "https"
            assert be.requests[0].get("x-forwarded-for") == "127.0.0.1"
            # TLS 1.2 explicitly, with the modern cipher list: still fine.
            ctx12 = client_context(cert, maximum_version=ssl.TLSVersion.TLSv1_2)
            client12 = await tls_client(addr, ctx12)
            assert client12.writer.get_extra_info("ssl_object").version() == "TLSv1.2"
            assert (await client12.get("/v12")).status == 200

    run(main)


def test_tls_refuses_old_versions_plain_text_and_stalled_handshakes(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "front")

    async def main() -> None:
        async with (
            backends(None) as (be,),
            proxy(make_pool([be.port]), tls=TlsConfig(str(cert), str(key)), header_timeout=0.3) as (
                server,
                addr,
            ),
        ):
            old = client_context(cert)
            with warnings.catch_warnings():  # (TLS 1.1 is deprecated: that is the point)
                warnings.simplefilter("ignore", DeprecationWarning)
                old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
                old.maximum_version = ssl.TLSVersion.TLSv1_1
            with contextlib.suppress(ssl.SSLError):  # (this OpenSSL may refuse TLS 1.1 itself)
                old.set_ciphers("ALL:@SECLEVEL=0")
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await tls_client(addr, old)
            plain = await Client.connect(addr)
            plain.writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert await plain.at_eof()
            stalled = await Client.connect(addr)  # sends nothing: dropped after header_timeout
            assert await stalled.at_eof()
            good = await tls_client(addr, client_context(cert))
            assert (await good.get("/")).status == 200
            await poll(lambda: server.open_connections() == 1)
            assert len(be.requests) == 1

    run(main)


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_tls_handshakes_hold_a_connection_slot_and_failed_ones_release_it(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection counts against the limits from the accept on, not from the end of its handshake: two
    clients that never start one fill `maxconn_per_ip = 2`, a third is refused at once. A handshake that
    fails (plain text) or times out gives its slot back and is counted; no socket is left open."""
    cert, key = make_cert(tmp_path, "front")

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            if mode == "http":
                (be,) = await stack.enter_async_context(backends(None))
                port = be.port
            else:
                port = await stack.enter_async_context(stream_backend(echo))
            server, addr = await stack.enter_async_context(
                proxy(
                    make_pool([port]),
                    mode=mode,
                    tls=TlsConfig(str(cert), str(key)),
                    header_timeout=1.0,
                    maxconn_per_ip=2,
                )
            )
            fds = open_fds()
            silent = [await Client.connect(addr) for _ in range(2)]  # TCP only: no ClientHello
            await poll(lambda: server.stats()["connections"]["current"] == 2)  # type: ignore[index]
            third = await Client.connect(addr)
            assert await third.at_eof()  # refused before any handshake work
            assert stats(server)["rejected"] == {"maxconn_per_ip": 1}
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await tls_client(addr, client_context(cert))  # refused too: the handshake fails

            silent[0].writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # plain text: a failed handshake
            assert await silent[0].at_eof()
            assert await silent[1].at_eof()  # no ClientHello within header_timeout: dropped
            await poll(lambda: server.stats()["connections"]["current"] == 0)  # type: ignore[index]
            s = stats(server)
            assert s["tls_handshake_failures_total"] == 2
            assert s["rejected"] == {"maxconn_per_ip": 2}

            good = await tls_client(addr, client_context(cert))  # both slots are free again
            if mode == "http":
                assert (await good.get("/")).status == 200
            else:
                good.writer.write(b"ping")
                assert await good.reader.readexactly(4) == b"ping"
            assert server.stats()["connections"]["current"] == 1  # type: ignore[index]
            good.writer.close()
            await poll(lambda: server.stats()["connections"]["current"] == 0)  # type: ignore[index]
            assert stats(server)["tls_handshake_failures_total"] == 2
            for client in (*silent, third):
                client.writer.close()
            server.upstream.close_all()  # (the pooled keep-alive connection to the backend, in HTTP mode)
            await poll(lambda: open_fds() <= fds)  # every socket of both sides is closed

    run(main)
    no_errors(caplog)


def test_tls_reload_swaps_the_certificate_without_dropping_connections(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    old_cert, old_key = make_cert(tmp_path, "old-cert")
    new_cert, new_key = make_cert(tmp_path, "new-cert")
    cert, key = live / "tls.crt", live / "tls.key"
    shutil.copy(old_cert, cert)
    shutil.copy(old_key, key)
    trust = tmp_path / "trust.pem"
    trust.write_bytes(old_cert.read_bytes() + new_cert.read_bytes())

    async def main() -> None:
        async with (
            backends(None) as (be,),
            proxy(make_pool([be.port]), tls=TlsConfig(str(cert), str(key))) as (server, addr),
        ):
            ctx = client_context(trust)
            before = await tls_client(addr, ctx)
            assert (await before.get("/1")).status == 200
            der = before.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert peer_common_name(der) == "old-cert"

            shutil.copy(new_cert, cert)
            shutil.copy(new_key, key)
            assert server.reload_tls() == {"web": True}
            after = await tls_client(addr, ctx)
            der = after.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert peer_common_name(der) == "new-cert"
            assert (await after.get("/2")).status == 200
            assert (await before.get("/3")).status == 200  # the old connection was not dropped

            key.write_bytes(old_key.read_bytes())  # a key that does not match: the reload is refused
            assert server.reload_tls() == {"web": False}
            third = await tls_client(addr, ctx)
            der = third.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert peer_common_name(der) == "new-cert"
            s = stats(server)
            assert s["tls_reloads_total"] == 1 and s["tls_reload_failures_total"] == 1

    run(main)


def test_tls_on_a_tcp_listener(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "front")

    async def main() -> None:
        async with (
            stream_backend(echo) as port,
            proxy(make_pool([port]), mode="tcp", tls=TlsConfig(str(cert), str(key), min_version="1.3")) as (
                _,
                addr,
            ),
        ):
            client = await tls_client(addr, client_context(cert))
            assert client.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
            client.writer.write(b"hello over tls")
            assert await client.reader.readexactly(14) == b"hello over tls"

    run(main)
