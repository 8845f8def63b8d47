"""A byte tunnel between two channels: what an HTTP connection becomes after `101 Switching Protocols`.

How this works: `relay_tunnel(client, server, idle_timeout)` copies whatever each side sends to the other,
one coroutine per direction (the calling task carries server -> client, a helper task client -> server),
with the channels' backpressure: a direction stops reading while the other side's transport is above its
write high-water mark (`drain`), so a slow reader never makes the proxy buffer. An EOF is passed on as
a half-close once the bytes before it are written (`flush.write_eof_after_flush`; a transport that
cannot half-close, TLS, is closed then), and the other direction goes on until its own EOF: the tunnel
ends when both directions ended. It is cut (ConnectionError) when either connection is
lost, and (TimeoutError) when no byte moved either way for `idle_timeout` seconds (HAProxy's
`timeout tunnel`). Each direction counts its bytes even when the tunnel is cut (`TunnelBytes`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from halb.proxy.channel import Channel
from halb.proxy.flush import write_eof_after_flush


@dataclass
class TunnelBytes:
    up: int = 0  # client -> server
    down: int = 0  # server -> client
    last_activity: float = 0.0


async def relay_tunnel(client: Channel, server: Channel, idle_timeout: float, moved: TunnelBytes) -> None:
    """Relay both ways until both directions ended; raises ConnectionError or TimeoutError when cut."""
    loop = client.loop
    moved.last_activity = loop.time()
    client.keep_open_on_eof = server.keep_open_on_eof = True  # a half-close leaves the other way open
    upward = loop.create_task(_one_way(client, server, idle_timeout, moved, upward=True))
    try:
        await _one_way(server, client, idle_timeout, moved, upward=False)
        await upward
    finally:
        if not upward.done():
            upward.cancel()
            await asyncio.gather(upward, return_exceptions=True)


async def _one_way(
    src: Channel, dst: Channel, idle_timeout: float, moved: TunnelBytes, *, upward: bool
) -> None:
    loop = src.loop
    while True:
        buf = src.buf
        if buf:
            data = src.take(len(buf))
            dst.write(data)  # ConnectionResetError when dst is gone
            n = len(data)
            if upward:
                moved.up += n
            else:
                moved.down += n
            moved.last_activity = loop.time()
            if dst.write_paused:
                await dst.drain(moved.last_activity + idle_timeout)
            continue
        if src.eof:
            transport = dst.transport
            if transport is not None and not dst.closed:
                write_eof_after_flush(transport, loop)  # (closes instead where half-close cannot be sent)
            return
        if src.closed:
            raise ConnectionResetError("tunnel: connection lost")
        try:
            await src.wait_more(moved.last_activity + idle_timeout)
        except TimeoutError:
            if loop.time() - moved.last_activity >= idle_timeout:
                raise  # nothing moved either way: the tunnel is idle
