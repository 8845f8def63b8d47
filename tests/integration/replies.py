"""The answer of a halb listener as the sticky-session tests read it: status, headers, body, cookie."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: str
    seconds: float = 0.0  # from sending the request to the end of the body

    @property
    def backend(self) -> str:
        """The demo backend's name (its body)."""
        return self.body.strip()

    @property
    def cookie(self) -> str | None:
        """The value of the session cookie the proxy set, if any."""
        value = self.headers.get("set-cookie")
        return value.split(";", 1)[0].split("=", 1)[1] if value else None


async def read_reply(reader: asyncio.StreamReader, started: float, timeout: float = 5.0) -> Reply:
    """Read one response with a Content-Length body; `started` is when the request was sent (monotonic)."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)).decode("latin-1")
    status_line, *lines = head[:-4].split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Reply(int(status_line.split()[1]), headers, body.decode(), time.monotonic() - started)
