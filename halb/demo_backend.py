"""A small HTTP backend for demos, tests and the lab: answers every request with its own name.

Endpoints: `/healthz` (200, or 503 after `POST /fail`... kept simple: `--unhealthy` starts it failing),
`/load` (custom_load agent: {"cpu": .., "mem": ..} from `--load`), `/slow?ms=N` (answers after N ms),
`/echo` (echoes the request body), anything else: "<name>\n". HTTP/1.1 keep-alive, Content-Length and
chunked request bodies. Run: `halb demo-backend web1 --listen 127.0.0.1:9001`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from urllib.parse import parse_qs, urlsplit


class DemoBackend:
    def __init__(
        self, name: str, host: str, port: int, load: float | None = None, delay: float = 0.0
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.load = load
        self.delay = delay
        self.healthy = True
        self.requests = 0
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # close_clients exists on 3.13+; on 3.11 closing the listener is enough for tests
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 0.5)

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await reader.readline()).split(b";")[0].strip(), 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += await reader.readexactly(size)
                await reader.readline()
        length = int(headers.get("content-length", "0") or 0)
        return await reader.readexactly(length) if length else b""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await self._read_body(reader, headers)
                self.requests += 1
                status, ctype, payload = await self._respond(method, target, body, headers)
                close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
                connection = "Connection: close\r\n" if close else ""
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
                    f"X-Backend: {self.name}\r\n{connection}\r\n".encode()
                    + (b"" if method == "HEAD" else payload)
                )
                await writer.drain()
                if close:
                    return
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _respond(
        self, method: str, target: str, body: bytes, headers: dict[str, str]
    ) -> tuple[str, str, bytes]:
        url = urlsplit(target)
        if url.path == "/healthz":
            return (
                ("200 OK", "text/plain", b"ok\n")
                if self.healthy
                else ("503 Unavailable", "text/plain", b"no\n")
            )
        if url.path == "/load":
            if self.load is None:
                return "404 Not Found", "text/plain", b"no agent\n"
            return "200 OK", "application/json", json.dumps({"cpu": self.load, "mem": self.load / 2}).encode()
        if url.path == "/echo":
            return "200 OK", "application/octet-stream", body
        delay = self.delay
        if url.path == "/slow":
            delay = int(parse_qs(url.query).get("ms", ["100"])[0]) / 1000
        if delay:
            await asyncio.sleep(delay)
        if url.path == "/headers":
            return "200 OK", "application/json", json.dumps(headers).encode()
        return "200 OK", "text/plain", f"{self.name}\n".encode()
