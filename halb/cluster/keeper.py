"""Runs the pure `LeaseHolder` against Raft inside the node's event loop: the lease's I/O adapter.

How this works: a task ticks the holder every `TICK` (50 ms) with `lease_clock()` -- also how a frozen
and resumed process notices its gap -- and wakes early at the holder's own deadlines. `SendCommand`
actions become `RaftMember.submit` calls (each bounded by the timing's `request_timeout`; a failure or
a timeout is reported to the holder as None, "no grant"). Every applied command's lease record is fed to
`observe`. `LeaseGranted` / `LeaseLost` go to the listeners, on the loop.

What the VRRP side calls (docs/quorum.md, "wiring"):

    keeper.want(True)       when it wants to be MASTER (before adding the VIP)
    keeper.may_act()        immediately before EVERY master action: adding the VIP, each GARP round;
                            False -> do not act; remove the VIP if it is held
    keeper.want(False)      after the VIP has been removed (resign, shutdown): releases the lease
    await keeper.release(t) the same on the way out (SIGTERM): waits until the release is committed
    keeper.check()          may_act() after running the holder's clock at once (expiry is reported now,
                            not at the next tick): what the VRRP side asks before a MASTER advert
    keeper.add_listener(f)  f(LeaseGranted) -> may now add the VIP; f(LeaseLost) -> remove it NOW
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from halb.cluster.lease import (
    DEFAULT_LEASE,
    Action,
    LeaseGranted,
    LeaseHolder,
    LeaseLost,
    LeaseTiming,
    SendCommand,
    lease_clock,
)
from halb.cluster.raft import Applied, ClusterError

log = logging.getLogger("halb.cluster.lease")
TICK = 0.05


class Submitter(Protocol):
    def submit(self, command: dict[str, Any], timeout: float = ...) -> Awaitable[dict[str, Any]]: ...


class LeaseKeeper:
    def __init__(
        self,
        member: Submitter,
        node: str,
        timing: LeaseTiming,
        lease: str = DEFAULT_LEASE,
        clock: Callable[[], float] = lease_clock,
        tick: float = TICK,
    ) -> None:
        self.member = member
        self.holder = LeaseHolder(node, timing, lease)
        self.clock = clock
        self.tick_interval = tick
        self._listeners: list[Callable[[LeaseGranted | LeaseLost], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._requests: set[asyncio.Task[None]] = set()

    # --- what the VRRP side calls -----------------------------------------------------------------
    def may_act(self) -> bool:
        """The check before every master action (see the module docstring)."""
        return self.holder.may_act(self.clock())

    def want(self, wanted: bool) -> None:
        self._run(self.holder.set_wanted(wanted, self.clock()))

    def add_listener(self, callback: Callable[[LeaseGranted | LeaseLost], None]) -> None:
        self._listeners.append(callback)

    def check(self) -> bool:
        """Run the holder's clock now (expiry -> `LeaseLost` to the listeners, synchronously); may_act()."""
        self._run(self.holder.tick(self.clock()))
        return self.may_act()

    def holds(self) -> bool:
        """Holds a lease that has not run out (after a loop gap it may be held but not yet confirmed)."""
        return self.holder.holds(self.clock())

    def act_until(self) -> float | None:
        """The holder's own expiry in `clock()` time (None: holds nothing); the kernel fence's deadline."""
        return self.holder.act_until if self.holds() else None

    async def release(self, timeout: float) -> bool:
        """want(False), then wait up to `timeout` until the release is no longer pending. True when the
        replicated record (as seen here) no longer names this node: released, or never held."""
        self.want(False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.holder.releasing and self._task is not None and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # let the applied release reach `observe`
        seen = self.holder.observed
        return not self.holder.releasing and (seen is None or seen.holder != self.holder.node)

    # --- wiring -------------------------------------------------------------------------------------
    def on_applied(self, event: Applied) -> None:
        """RaftMember listener: feed the lease record to the holder."""
        self._run(self.holder.observe(event.leases.get(self.holder.lease), self.clock()))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="halb-lease")

    async def stop(self) -> None:
        task, self._task = self._task, None
        tasks = [t for t in (task, *self._requests) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def status(self) -> dict[str, Any]:
        return self.holder.status(self.clock())

    # --- internals --------------------------------------------------------------------------------
    async def _loop(self) -> None:
        # `while` checks `_task` (stop() clears it first): Python 3.11's wait_for swallows a cancellation
        # that lands while `_wake` is being set (want()/release() just before stop()), and the loop
        # would otherwise go on forever with stop() awaiting it.
        while self._task is not None:
            now = self.clock()
            self._run(self.holder.tick(now))
            delay = self.tick_interval
            wakeup = self.holder.next_wakeup(now)
            if wakeup is not None:
                delay = min(delay, max(0.0, wakeup - now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendCommand):
                task = asyncio.get_running_loop().create_task(self._submit(action))
                self._requests.add(task)
                task.add_done_callback(self._requests.discard)
            else:
                if isinstance(action, LeaseLost):
                    log.warning("lease %s lost: %s", self.holder.lease, action.reason)
                else:
                    log.warning("lease %s granted to %s", self.holder.lease, self.holder.node)
                for callback in self._listeners:
                    try:
                        callback(action)
                    except Exception:
                        log.exception("lease listener failed")
        self._wake.set()

    async def _submit(self, action: SendCommand) -> None:
        result: dict[str, Any] | None
        try:
            result = await self.member.submit(action.command, self.holder.timing.request_timeout)
        except ClusterError as exc:
            log.debug("lease %s: %s not committed: %s", self.holder.lease, action.command["op"], exc)
            result = None
        self._run(self.holder.on_result(action.request_id, result, self.clock()))
