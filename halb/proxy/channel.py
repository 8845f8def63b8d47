"""A lean buffered connection for coroutine code: an asyncio Protocol plus a few awaitables.

How this works: `Channel` is the protocol of one TCP connection (client side or backend side of the HTTP
proxy). Incoming bytes are appended to `buf`; when `buf` grows past `high_water` the channel pauses reading
from the socket and resumes once the consumer `take()`s it below `low_water`, so a fast sender can never
make it buffer without bound. A coroutine waits for more bytes with `await wait_more(deadline)`, and for the
transport's write buffer to drain with `await drain(deadline)` (the transport calls `pause_writing` above
its own high-water mark). Deadlines are absolute `loop.time()` values and an expired deadline raises
`TimeoutError`. Timers are costly (uvloop's call_at + cancel is ~4 us), so each channel keeps a single
lazily re-armed timer: a wait only records its deadline; the timer, armed at or before the earliest
deadline, expires what is due when it fires and re-arms itself for what is left. Deadlines mostly move
forward, so a busy keep-alive connection re-arms about once per timeout period, not per request.
There is one reader waiter and one drain waiter: one coroutine reads a channel at a time, and one writes.
Code that reads a channel from callbacks instead of a coroutine sets `on_ready`: it is called after each
arrival of bytes, EOF or the loss of the connection, in place of waking the reader; with no coroutine
waiting, a deadline set by `move_read_deadline` calls `on_read_timeout` when it passes (same lazy timer).
Such code may also set `on_chunk`: bytes that arrive while nothing is buffered are offered to it first,
and when it returns True it has used them all, so they are never buffered (and `on_ready` is not called).
`stop_callbacks()` clears both.

`eof` is set when the peer shut down its sending side; `closed` when the connection is gone (`error` holds
the reason if it was not a clean close). `write()` raises ConnectionResetError on a closed channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

DEFAULT_HIGH_WATER = 256 * 1024
DEFAULT_LOW_WATER = 64 * 1024
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class Channel(asyncio.Protocol):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        keep_open_on_eof: bool = True,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
    ) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.closed = False
        self.error: BaseException | None = None
        self.received = 0  # bytes received over the channel's lifetime
        self.write_paused = False
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_deadline: float | None = None
        self._drain_deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.keep_open_on_eof = keep_open_on_eof  # after the peer's EOF, keep the connection (half-close)
        self._high = high_water
        self._low = low_water
        self.on_ready: Callable[[], None] | None = None  # a callback reader (see the module docstring)
        self.on_chunk: Callable[[bytes], bool] | None = None  # its taker of whole chunks (ditto)
        self.on_read_timeout: Callable[[], None] | None = None  # its deadline (move_read_deadline) passed

    # --- protocol callbacks ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        on_chunk = self.on_chunk
        if on_chunk is not None and not self.buf:
            # Counted first: on_chunk may already send the next request on this channel, and whoever does
            # notes `received` then, to tell later whether the backend has answered since.
            self.received += len(data)
            if on_chunk(data):
                return
            self.received -= len(data)  # (append counts it)
        self.append(data)
        on_ready = self.on_ready  # (read after on_chunk, which may have stopped the callbacks)
        if on_ready is not None:
            on_ready()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def append(self, data: bytes) -> None:
        """Buffer received bytes (pausing the socket above the high-water mark); wakes nobody."""
        buf = self.buf
        buf += data
        self.received += len(data)
        if len(buf) >= self._high and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.on_ready is not None:
            self.on_ready()
        self.wake()
        return self.keep_open_on_eof

    def stop_callbacks(self) -> None:
        """A callback reader is done with this channel (a coroutine may read it from now on)."""
        self.on_ready = None
        self.on_chunk = None

    def wake(self) -> None:
        """Wake the coroutine waiting in `wait_more`, if any."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for waiter in (self._waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self.on_ready is not None:
            self.on_ready()
        self.on_lost()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_lost(self) -> None:
        """Hook for subclasses: the connection is gone."""

    # --- for the coroutine that owns the channel ---------------------------------------------------
    async def wait_more(self, deadline: float | None = None) -> None:
        """Wait until more bytes arrive, the peer sends EOF or the connection closes."""
        if self.eof or self.closed:
            return
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        fut = self.loop.create_future()
        self._waiter = fut
        if deadline is not None:
            self._read_deadline = deadline
            if self._timer is None or self._timer_at > deadline:
                self._arm(deadline)
        try:
            await fut
        finally:
            self._waiter = None
            self._read_deadline = None

    def move_read_deadline(self, deadline: float) -> None:
        """Give the pending `wait_more` a new deadline (earlier or later); with no `wait_more` pending,
        `on_read_timeout` is called when it passes."""
        self._read_deadline = deadline
        if self._timer is None or self._timer_at > deadline:
            self._arm(deadline)

    def take(self, n: int) -> bytes | bytearray:
        """Remove and return the first `n` bytes of `buf` (all of it without copying when n >= len)."""
        buf = self.buf
        if n >= len(buf):
            self.buf = bytearray()
            data: bytes | bytearray = buf
        else:
            data = buf[:n]
            del buf[:n]
        if self._read_paused and len(self.buf) < self._low and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes | bytearray) -> None:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("connection closed")
        transport.write(data)

    async def drain(self, deadline: float | None = None) -> None:
        """Wait until the transport's write buffer is below its low-water mark."""
        if self.closed:
            raise ConnectionResetError("connection closed")
        if not self.write_paused:
            return
        fut = self.loop.create_future()
        self._drain_waiter = fut
        if deadline is not None:
            self._drain_deadline = deadline
            if self._timer is None or self._timer_at > deadline:
                self._arm(deadline)
        try:
            await fut
        finally:
            self._drain_waiter = None
            self._drain_deadline = None
        if self.closed:
            raise ConnectionResetError("connection closed")

    # --- the lazy timer ----------------------------------------------------------------------------------
    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self.loop.time()
        pending: float | None = None
        deadline, waiter = self._read_deadline, self._waiter
        if deadline is not None and waiter is not None and not waiter.done():
            if deadline <= now:
                waiter.set_exception(TimeoutError())
            else:
                pending = deadline
        elif deadline is not None and waiter is None and self.on_read_timeout is not None:
            if deadline <= now:
                self._read_deadline = None
                self.on_read_timeout()
            else:
                pending = deadline
        deadline, waiter = self._drain_deadline, self._drain_waiter
        if deadline is not None and waiter is not None and not waiter.done():
            if deadline <= now:
                waiter.set_exception(TimeoutError())
            elif pending is None or deadline < pending:
                pending = deadline
        if pending is not None:
            self._arm(pending)

    @property
    def buffered(self) -> int:
        """Bytes held in user space for this connection (read buffer + transport write buffer)."""
        transport = self.transport
        out = 0
        if transport is not None and not self.closed:
            try:
                out = transport.get_write_buffer_size()
            except Exception:
                out = 0
        return len(self.buf) + out

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
