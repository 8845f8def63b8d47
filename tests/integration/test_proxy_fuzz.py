"""Hypothesis against the whole HTTP request path of a live proxy: no crash, no hang, no leak.

A real ProxyServer runs on uvloop in a background thread in front of a backend; every example is sent on
a fresh loopback connection (then half-closed) and must be answered with a well-formed status line or
closed, within a deadline. At the end nothing may have been logged at ERROR level, the proxy holds no
connection, and the backend never saw a request whose framing it could not follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from halb.config_model import BackendConfig, HealthConfig, HostPort, ListenerConfig, PoolConfig
from halb.pool import Pool
from halb.proxy.server import ProxyServer

pytestmark = pytest.mark.timeout(120)
STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] [^\r\n]*\r\n")
DEADLINE = 5.0


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class LiveProxy:
    """A proxy + backend on their own uvloop thread."""

    def __init__(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: ProxyServer | None = None
        self.backend: asyncio.Server | None = None
        self.bad_backend_requests: list[bytes] = []
        self.address = ("127.0.0.1", 0)

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.call(self._start())

    async def _serve_backend(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                length = re.search(rb"\r\ncontent-length: *([0-9]+)\r\n", lower)
                if b"transfer-encoding:" in lower:
                    if not lower.rstrip().endswith(b"transfer-encoding: chunked") and not re.search(
                        rb"\r\ntransfer-encoding: chunked\r\n", lower
                    ):
                        self.bad_backend_requests.append(head)
                        return
                    while True:  # chunked: sizes, data, trailers
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        if not size:
                            while await reader.readuntil(b"\r\n") != b"\r\n":
                                pass
                            break
                        await reader.readexactly(size + 2)
                elif length:
                    await reader.readexactly(int(length.group(1)))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.transport.abort()

    async def _start(self) -> None:
        self.backend = await asyncio.start_server(self._serve_backend, "127.0.0.1", 0)
        port = self.backend.sockets[0].getsockname()[1]
        pool = Pool(
            PoolConfig(
                name="app",
                backends=(BackendConfig("b", HostPort("127.0.0.1", port)),),
                health=HealthConfig(kind="none"),
                timeout=2.0,
            )
        )
        listener = ListenerConfig(
            name="web",
            bind=HostPort("127.0.0.1", 0),
            pool="app",
            header_timeout=1.0,
            client_timeout=2.0,
            max_request_line=1024,
            max_header_bytes=4096,
        )
        self.server = ProxyServer([listener], {"app": pool})
        await self.server.start()
        self.address = self.server.address("web")

    async def _stop(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.backend is not None:
            self.backend.close()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def open_connections(self) -> int:
        async def count() -> int:
            assert self.server is not None
            return self.server.open_connections()

        return int(self.call(count()))


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[LiveProxy, Recorder]]:
    import uvloop  # noqa: F401  (the live proxy runs on it; missing it is a failure, not a skip)

    recorder = Recorder()
    logging.getLogger().addHandler(recorder)
    proxy = LiveProxy()
    try:
        proxy.start()
        yield proxy, recorder
    finally:
        proxy.stop()
        logging.getLogger().removeHandler(recorder)


# --- strategies: mostly-valid requests with hostile parts, and plain noise ---------------------------
TOKENS = [b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"CONNECT", b"G ET", b"", b"get", b"\x00"]
TARGETS = [b"/", b"/a?b=c", b"*", b"http://h/x", b"/\x7f", b"/" + b"p" * 1100, b"", b"/ /"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.9", b"http/1.1", b"HTTP/1.1 ", b"HTTP/11"]
HEADERS = [
    b"Host: t",
    b"Host: t\r\nHost: u",
    b"Content-Length: 5",
    b"Content-Length: 5\r\nContent-Length: 6",
    b"Content-Length: 5, 5",
    b"Content-Length: -1",
    b"Content-Length: 99999999999999999999",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3",
    b"Transfer-Encoding: xchunked",
    b"Transfer-Encoding:  chunked",
    b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"Transfer-Encoding:\tchunked",
    b"Transfer-Encoding : chunked",
    b" Transfer-Encoding: chunked",
    b"X-Fold: a\r\n b",
    b"X-Bare: a\nb",
    b"X-Cr: a\rb",
    b"Connection: close, Host",
    b"Connection: keep-alive",
    b"Expect: 100-continue",
    b"Upgrade: websocket",
    b"X-Nul: a\x00b",
    b"X-" + b"v" * 5000 + b": 1",
]
BODIES = [
    b"",
    b"hello",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"zz\r\n",
    b"5\r\nhel",
    b"ffffffffffffffffff\r\n",
]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = b" ".join(
        [draw(st.sampled_from(TOKENS)), draw(st.sampled_from(TARGETS)), draw(st.sampled_from(VERSIONS))]
    )
    headers = draw(st.lists(st.sampled_from(HEADERS), max_size=4))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    head = eol.join([line, *headers]) + eol + eol
    return head + draw(st.sampled_from(BODIES)) + draw(st.binary(max_size=40))


@st.composite
def pieces(draw: st.DrawFn) -> list[bytes]:
    data = draw(st.one_of(requests(), st.binary(min_size=1, max_size=300)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    out, start = [], 0
    for cut in [*cuts, len(data)]:
        if cut > start:
            out.append(data[start:cut])
            start = cut
    return out


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pieces())
def test_any_bytes_get_a_status_or_a_close_in_time(
    live: tuple[LiveProxy, Recorder], parts: list[bytes]
) -> None:
    proxy, _ = live
    with socket.create_connection(proxy.address, timeout=DEADLINE) as sock:
        with contextlib.suppress(ConnectionError):
            for part in parts:
                sock.sendall(part)
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):  # socket timeout: a hang fails the test
                answer += chunk
    if answer:
        assert STATUS_LINE.match(answer), answer[:200]


def test_after_the_fuzzing_nothing_leaked_or_crashed(live: tuple[LiveProxy, Recorder]) -> None:
    proxy, recorder = live
    deadline = time.monotonic() + DEADLINE
    while proxy.open_connections() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.open_connections() == 0
    assert not recorder.records, [r.getMessage() for r in recorder.records]
    assert not proxy.bad_backend_requests, proxy.bad_backend_requests[:3]
