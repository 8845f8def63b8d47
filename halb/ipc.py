"""Messages between the control process and its proxy workers.

How this works: each worker gets one end of a Unix socketpair (its fd is passed on exec). Both sides send
length-prefixed pickled dicts with a "type" key. Only halb's own processes are on either end, so pickle
is safe here. Messages, control -> worker: `config` (first), `state` (backend health/weight/drain),
`reconfigure` (`pools`: {name: PoolConfig}, changed pool definitions), `drain`. Worker -> control:
`ready` / `error` (once, after binding), `stats` (periodic), `connect_failed`.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

MAX_MESSAGE = 64 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(payload).to_bytes(4, "big") + payload


async def receive(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Next message; raises asyncio.IncompleteReadError at EOF."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"IPC message of {size} bytes is too large")
    message = pickle.loads(await reader.readexactly(size))
    if not isinstance(message, dict) or "type" not in message:
        raise ValueError("IPC message without a type")
    return message


def send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    if not writer.is_closing():
        writer.write(encode(message))
