"""A steady HTTP client for the lab: R requests per second to one URL, one JSON line per request.

How this works: run it inside a lab namespace (the lab's failover runner starts it as
`ip netns exec <prefix>-client python -m halb.lab.traffic --url http://VIP/ --rate 20 --stdin`). Request n
is started at `t0 + n / rate` whatever happened to the earlier ones, each on a fresh TCP connection
(`Connection: close`), so a request that hangs during a failover never delays the next: several may be
in flight at once. A request fails when the connect takes longer than `--connect-timeout` (a SYN sent to
a dead MAC is never answered, and the kernel would only retry it after 1 s), when the whole exchange
takes longer than `--timeout`, on any socket error, or when the answer is not a 2xx. When it ends, one
line goes to stdout:

    {"seq": 7, "start": 1234.5678, "end": 1234.5702, "ok": true, "status": 200, "body": "web1", "error": ""}

`start` and `end` are `time.monotonic()` (CLOCK_MONOTONIC is the same in every network namespace, so the
parent can compare them with its own clock). It stops after `--count` requests or `--duration` seconds, on
SIGTERM/SIGINT, or -- with `--stdin` -- when its stdin reaches end of file, i.e. when the parent that holds
the other end of the pipe exits, however it exits; in-flight requests are then abandoned.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any
from urllib.parse import urlsplit

MAX_IN_FLIGHT = 1000


async def request(
    host: str, port: int, path: str, connect_timeout: float, timeout: float
) -> tuple[bool, int | None, str, str]:
    """One GET on a fresh connection: (ok, status, body, error)."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
    except TimeoutError:
        return False, None, "", "connect timeout"
    except OSError as exc:
        return False, None, "", f"connect: {exc.strerror or exc}"
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        left = max(0.001, timeout - (time.monotonic() - started))
        data = await asyncio.wait_for(reader.read(), left)
    except TimeoutError:
        return False, None, "", "timeout"
    except OSError as exc:
        return False, None, "", f"io: {exc.strerror or exc}"
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    words = head.split(b"\r\n", 1)[0].split()
    if len(words) < 2 or not words[1].isdigit():
        return False, None, "", "bad response" if data else "closed without a response"
    status = int(words[1])
    text = body.decode(errors="replace").strip()[:80]
    return 200 <= status < 300, status, text, "" if status < 300 else f"HTTP {status}"


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def run(
    url: str,
    rate: float,
    connect_timeout: float,
    timeout: float,
    count: int | None = None,
    duration: float | None = None,
    watch_stdin: bool = False,
) -> int:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"traffic: only http://HOST[:PORT]/PATH URLs, got {url!r}")
    host, port = parts.hostname, parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if watch_stdin:

        def on_stdin() -> None:
            if not os.read(sys.stdin.fileno(), 4096):
                loop.remove_reader(sys.stdin.fileno())
                stop.set()

        loop.add_reader(sys.stdin.fileno(), on_stdin)

    tasks: set[asyncio.Task[None]] = set()

    async def one(seq: int) -> None:
        start = time.monotonic()
        ok, status, body, error = await request(host, port, path, connect_timeout, timeout)
        emit(
            {
                "seq": seq,
                "start": start,
                "end": time.monotonic(),
                "ok": ok,
                "status": status,
                "body": body,
                "error": error,
            }
        )

    t0 = time.monotonic()
    seq = 0
    while not stop.is_set():
        if count is not None and seq >= count:
            break
        due = t0 + seq / rate
        if duration is not None and due - t0 >= duration:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, due - time.monotonic()))
        if stop.is_set():
            break
        if len(tasks) < MAX_IN_FLIGHT:
            task = loop.create_task(one(seq))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        seq += 1
    if tasks and not stop.is_set():
        await asyncio.wait(tasks, timeout=timeout + 1)
    for task in tasks:
        task.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halb.lab.traffic", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="http://HOST[:PORT]/PATH")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    parser.add_argument("--connect-timeout", type=float, default=0.25, help="seconds (default 0.25)")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds per request (default 1.0)")
    parser.add_argument("--count", type=int, default=None, help="stop after this many requests")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--stdin", action="store_true", help="stop when stdin reaches end of file")
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be > 0")
    return asyncio.run(
        run(args.url, args.rate, args.connect_timeout, args.timeout, args.count, args.duration, args.stdin)
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        sys.exit(main())
