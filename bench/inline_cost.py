#!/usr/bin/env python3
"""The Python cost of one HTTP keep-alive request through halb's proxy, without sockets.

How this works: an HTTP listener and one client connection are built on fake transports (no sockets, no
system calls), with one pooled backend connection; then, `--requests` times, the client connection
receives a request head and the backend connection receives nginx's answer to it, each as one segment,
the way the benchmark's wrk and nginx send them. Every request is served by the protocol callbacks (the
inline path), so the time per request is the Python that `bench/run.py`'s HTTP keep-alive cell runs per
request, less the event loop's and the kernel's share. It is repeatable to a few per cent, which a wrk
run on this VM is not, so it shows whether a change to that path saves anything before `bench/ab.py`
measures it for real. To see where the time goes, run it under py-spy (`py-spy record -r 500 -f raw -o
/tmp/inline.txt -- python bench/inline_cost.py --requests 2000000 --rounds 1`).

Usage: `python bench/inline_cost.py` (about 10 s), `--requests N`, `--rounds N` (the best is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # (the checkout this script is in)

from halb.config_model import HostPort, ListenerConfig
from halb.proxy.channel import Channel
from halb.proxy.http_proxy import HttpListener
from halb.proxy.upstream_pool import UpstreamPool
from tests.integration.test_proxy_http import make_pool

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"  # what wrk sends
BODY = b"hello from nginx, a small fixed response body for the benchmark\n"  # bench/run.py's nginx
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 03:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (len(BODY), BODY)
)


class FakeTransport:
    """Just enough of an asyncio transport for a Channel: writes are counted, never sent."""

    def __init__(self) -> None:
        self.writes = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True


async def measure(requests: int) -> float:
    """Seconds per request."""
    loop = asyncio.get_running_loop()
    pool = make_pool([9000])
    upstream = UpstreamPool()
    config = ListenerConfig(name="web", bind=HostPort("127.0.0.1", 0), pool="app")
    listener = HttpListener(config, pool, upstream, loop=loop)
    backend = pool.backends[0]
    up = Channel(loop, keep_open_on_eof=False)
    up.connection_made(FakeTransport())  # type: ignore[arg-type]
    upstream.release(backend, up, loop.time())
    conn = listener.protocol_factory()
    client = FakeTransport()
    conn.connection_made(client)  # type: ignore[arg-type]
    started = time.perf_counter()
    for _ in range(requests):
        conn.data_received(REQUEST)
        up.data_received(RESPONSE)
    took = time.perf_counter() - started
    inline = listener.stats.inline_total
    if inline != requests or client.writes != requests:
        raise SystemExit(f"inline_cost: {inline} of {requests} went inline ({client.writes} answers)")
    conn.connection_lost(None)
    return took / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    best = min(uvloop.run(measure(args.requests)) for _ in range(args.rounds))
    print(f"{best * 1e6:.2f} us of Python per inline request (best of {args.rounds} x {args.requests:,})")
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
