"""Active health probes: one TCP connect or one HTTP GET, turned into a `ProbeResult`.

How this works: each probe opens a fresh connection, does the least work that proves the backend alive,
and always closes the socket. The whole probe (name resolution, connect, request, status line) is bounded
by `timeout`. A probe never raises for a network problem: refused connects, timeouts, resets, garbage
answers and unexpected errors all become `ProbeResult(ok=False, detail=...)` with a short detail for logs
and the admin API ("connect refused", "timeout after 0.3s", "status 500", "bad status line"). Only task
cancellation propagates, so a checker can always be stopped.

The HTTP probe sends `GET <path> HTTP/1.1` with `Host`, `Connection: close` and `User-Agent: halb-health/1`,
reads the status line only and succeeds iff the status is in the inclusive `expect_status` range; the rest
of the response is discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass

USER_AGENT = "halb-health/1"
MAX_STATUS_LINE = 8192
_STATUS_LINE = re.compile(rb"HTTP/\d\.\d (\d{3})(?: [^\r\n]*)?\r?\n")
_CLOSE_TIMEOUT = 0.5


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str
    duration: float  # seconds the probe took


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _error_detail(exc: BaseException, timeout: float, connected: bool) -> str:
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is an OSError
        return f"timeout after {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connect refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc) or type(exc).__name__
        return f"{'i/o error' if connected else 'connect failed'}: {what}"
    return f"probe error: {type(exc).__name__}: {exc}"


async def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT)


async def tcp_probe(host: str, port: int, timeout: float) -> ProbeResult:
    """Connect to host:port and close again; ok iff the connect succeeded within `timeout`."""
    start = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
        return ProbeResult(True, "connected", time.monotonic() - start)
    except Exception as exc:
        return ProbeResult(False, _error_detail(exc, timeout, False), time.monotonic() - start)
    finally:
        await _close(writer)


async def http_probe(
    host: str,
    port: int,
    path: str,
    timeout: float,
    host_header: str = "",
    expect_status: tuple[int, int] = (200, 399),
) -> ProbeResult:
    """GET `path`; ok iff the status is within `expect_status` (inclusive). Host defaults to host:port."""
    start = time.monotonic()
    host_header = host_header or format_host_port(host, port)
    if any(c in s for s in (path, host_header) for c in "\r\n\0 "):
        return ProbeResult(False, "bad probe request: space or control character in path/Host", 0.0)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n"
        f"User-Agent: {USER_AGENT}\r\nAccept: */*\r\n\r\n"
    ).encode("latin-1", "replace")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_STATUS_LINE)
            writer.write(request)
            await writer.drain()
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                detail = "bad status line" if exc.partial else "connection closed before status line"
                return ProbeResult(False, detail, time.monotonic() - start)
            except asyncio.LimitOverrunError:
                return ProbeResult(False, "bad status line (too long)", time.monotonic() - start)
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            return ProbeResult(False, "bad status line", time.monotonic() - start)
        status = int(match.group(1))
        low, high = expect_status
        return ProbeResult(low <= status <= high, f"status {status}", time.monotonic() - start)
    except Exception as exc:
        detail = _error_detail(exc, timeout, writer is not None)
        return ProbeResult(False, detail, time.monotonic() - start)
    finally:
        await _close(writer)
