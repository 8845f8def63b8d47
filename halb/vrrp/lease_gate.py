"""Quorum-safe VIP ownership: the VRRP driver may act as MASTER only while the Raft VIP lease allows it.

How this works
==============

With ``[cluster]`` on a balancer (and ``cluster.vip_lease``, the default), a node may hold a VIP only
while it holds a lease committed through Raft (``halb.cluster.lease``; the argument is in
docs/quorum.md). VRRP stays the fast failure detector and the announcement on the wire; the lease is the
arbiter. Three pieces, wired by the composition root (``halb.node``):

* :class:`LeasedVipPort` wraps the driver's :class:`~halb.vrrp.vip.VipPort`. ``add`` and ``send_garp``
  (the first GARP rounds and every refresh) ask ``lease.may_act()`` at that very instant and raise
  :class:`LeaseRequired` when it is false -- the driver counts that as *deferred*/*suppressed*, not as an
  error. Before an ``add`` the kernel fence (``halb.vrrp.fence``) is opened up to the lease's own expiry,
  and ``may_act`` is asked once more after that await. ``remove`` is always allowed.
* :class:`LeaseGuard` routes events between the driver, the lease keeper and the fence.
* The kernel fence makes the kernel itself stop answering for the VIP when the lease runs out, even
  while this process is frozen.

States of a balancer (the driver's VRRP state x the lease):

=================== ======================================================================================
BACKUP              lease not wanted (released); no VIP; fence closed
MASTER, no lease    "MASTER-pending": VRRP elected us (master-down, preemption, priority-0 advert from the
                    old master), ``want(True)`` asks for the lease. We keep sending adverts at our
                    priority, so the backups' VRRP stays quiet and a higher-priority node still preempts
                    as usual, but hold NO address: the machine's AddVips and GARP are refused by the
                    port. A free lease is granted in one commit; one held by another node only after it
                    has run out for us (2.2 s after we last saw it renewed) or was released.
MASTER, lease       ``LeaseGranted`` -> ``reclaim_vips()``: fence opened, VIP added, GARP rounds. Each
                    granted renewal re-opens the fence up to the new expiry (polled every 50 ms).
MASTER, unconfirmed after a pause of the event loop > 0.25 s (a freeze, a stall): the lease may still run
                    but no master action -- no AddVips, no GARP (refresh rounds included), and no
                    MASTER advert -- until a renewal SENT AFTER the pause is granted. The VIP stays on
                    the interface meanwhile; the kernel fence still expires it at the old deadline.
lease lost          ``LeaseLost`` (expired: no quorum, or we were frozen; renewal rejected: taken over)
                    -> the fence is flushed at once, the driver resigns: priority-0 advert, RemoveVips,
                    MASTER -> BACKUP (``VrrpMachine.resign``), and the check ``cluster:lease`` fails for
                    ``holddown`` seconds, so our tracked priority drops by ``track.weight`` (FAULT with
                    weight 0) and we do not preempt the new holder straight back.
=================== ======================================================================================

Leaving MASTER (a higher-priority advert, tracking FAULT, SIGTERM) removes the VIP first (the machine's
RemoveVips comes before its StateChanged), then the transition listener calls ``want(False)``, which
commits a ``release``: a peer acquires at once instead of after expiry. On SIGTERM the node waits for
that commit (``stop``), bounded.

**Before every MASTER advert** the driver asks :meth:`LeaseGuard.advert_allowed`: it runs the lease's clock
(``keeper.check()``: a lease that expired while we were frozen is reported as lost NOW, and we resign
before saying anything on the wire) and refuses while the lease is held but unconfirmed. Without this a
thawed node's first advert (priority 150) would make the new holder (140) step down. A MASTER without a
lease (never held one) advertises normally.

**Quorum tracking**: the check ``cluster:quorum`` follows this node's Raft member (a majority reachable):
a balancer cut off from the majority advertises ``priority - track.weight``, so a node that could get
the lease wins the VRRP election instead of a higher-priority one that cannot.

Lease times are ``lease.clock()`` readings (CLOCK_BOOTTIME); the hold-down and the 50 ms poll use the
event loop. Nothing here blocks: fence operations run as tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from halb.cluster.lease import LeaseGranted, LeaseLost
from halb.vrrp.fence import Fence, FenceError
from halb.vrrp.vip import VipError, VipPort

log = logging.getLogger("halb.vrrp.lease")

__all__ = ["LEASE_CHECK", "QUORUM_CHECK", "Lease", "LeaseGuard", "LeaseRequired", "LeasedVipPort"]

LEASE_CHECK = "cluster:lease"
QUORUM_CHECK = "cluster:quorum"
POLL = 0.05
HOLDDOWN_MIN = 5.0
RECLAIM_RETRY = 1.0


def holddown_for(lease_duration: float) -> float:
    """How long a node that lost its lease advertises a lowered priority: max(5 s, 2.5 leases)."""
    return max(HOLDDOWN_MIN, 2.5 * lease_duration)


class LeaseRequired(VipError):
    """A master action refused because the VIP lease does not allow it at this instant."""


class Lease(Protocol):
    """The keeper's surface (``halb.cluster.keeper.LeaseKeeper``)."""

    def may_act(self) -> bool: ...

    def check(self) -> bool: ...

    def holds(self) -> bool: ...

    def act_until(self) -> float | None: ...

    def want(self, wanted: bool) -> None: ...

    def add_listener(self, callback: Callable[[LeaseGranted | LeaseLost], None]) -> None: ...

    async def release(self, timeout: float) -> bool: ...


class Driver(Protocol):
    """The VRRP driver's surface (``halb.vrrp.driver.VrrpDriver``)."""

    @property
    def state(self) -> str: ...

    def vips_held(self) -> list[str]: ...

    def add_listener(self, callback: Callable[[Any], None]) -> None: ...

    def set_check(self, check: str, ok: bool) -> None: ...

    def resign(self, reason: str) -> bool: ...

    def reclaim_vips(self) -> bool: ...


class LeasedVipPort:
    """A :class:`VipPort` whose ``add`` and ``send_garp`` need ``lease.may_act()`` (module docstring)."""

    def __init__(self, inner: VipPort, lease: Lease, fence: Fence | None = None) -> None:
        self.inner = inner
        self.lease = lease
        self.fence = fence
        self.refused_adds = 0
        self.refused_garps = 0

    async def add(self, vips: Sequence[str]) -> None:
        self._require("add", vips)
        if self.fence is not None:
            until = self.lease.act_until()
            try:
                opened = until is not None and await self.fence.open_until(until)
            except FenceError as exc:
                raise VipError(f"the kernel fence did not open: {exc}") from exc
            if not opened:
                self.refused_adds += 1
                raise LeaseRequired("the lease ends too soon to open the kernel fence")
        self._require("add", vips)  # asked again: the fence took an await
        await self.inner.add(vips)

    async def remove(self, vips: Sequence[str]) -> None:
        await self.inner.remove(vips)

    def held(self) -> set[str]:
        return self.inner.held()

    async def send_garp(self, vips: Sequence[str]) -> None:
        self._require("garp", vips)
        await self.inner.send_garp(vips)

    async def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            await close()

    def _require(self, what: str, vips: Sequence[str]) -> None:
        if self.lease.may_act():
            return
        if what == "add":
            self.refused_adds += 1
        else:
            self.refused_garps += 1
        raise LeaseRequired(f"{what} {', '.join(vips)}: this node does not hold the VIP lease right now")


class LeaseGuard:
    """Routes driver transitions, lease events and fence updates (see the module docstring)."""

    def __init__(
        self,
        driver: Driver,
        lease: Lease,
        fence: Fence | None = None,
        *,
        holddown: float = HOLDDOWN_MIN,
        quorum: Callable[[], bool] | None = None,
        poll: float = POLL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.driver = driver
        self.lease = lease
        self.fence = fence
        self.holddown = holddown
        self.quorum = quorum
        self.poll_interval = poll
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._fence_tasks: set[asyncio.Task[None]] = set()
        self._holddown_handle: asyncio.TimerHandle | None = None
        self._quorum_ok: bool | None = None
        self._next_reclaim = 0.0
        self.resignations = 0
        self.last_resign_reason: str | None = None
        self.adverts_held_back = 0
        driver.add_listener(self._on_transition)
        lease.add_listener(self._on_lease)

    # --- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="halb-vip-lease")

    async def stop(self, release_timeout: float = 1.0) -> bool:
        """After the driver has stopped (VIPs removed): close the fence, commit the release (bounded)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._holddown_handle is not None:
            self._holddown_handle.cancel()
        for pending in list(self._fence_tasks):
            with contextlib.suppress(Exception):
                await pending
        if self.fence is not None:
            with contextlib.suppress(FenceError):
                await self.fence.close()
        released = await self.lease.release(release_timeout)
        if not released:
            log.warning(
                "vip lease: the release was not confirmed within %.1fs (it expires anyway)", release_timeout
            )
        return released

    # --- what the driver asks ----------------------------------------------------------------------
    def advert_allowed(self) -> bool:
        """Before every MASTER advert: run the lease's clock (a lost lease resigns now); False while the
        lease is held but not confirmed since a pause."""
        resignations = self.resignations
        may = self.lease.check()
        if self.resignations != resignations:
            return False  # the check found the lease gone: we just resigned (priority-0 advert queued)
        if may or not self.lease.holds():
            return True
        self.adverts_held_back += 1
        return False

    # --- events --------------------------------------------------------------------------------------
    def _on_transition(self, transition: Any) -> None:
        if transition.new == "MASTER":
            self.lease.want(True)
            return
        # The machine removed the VIPs before this StateChanged: nothing is held any more.
        self._fence_close()
        self.lease.want(False)

    def _on_lease(self, event: LeaseGranted | LeaseLost) -> None:
        if isinstance(event, LeaseGranted):
            if self.driver.state == "MASTER":
                self._reclaim("lease granted")
            return
        reason = event.reason
        self._fence_close()
        if self.driver.state == "MASTER":
            self.resignations += 1
            self.last_resign_reason = reason
            self.driver.resign(f"VIP lease lost: {reason}")
        self._start_holddown(reason)

    # --- internals -----------------------------------------------------------------------------------
    def _reclaim(self, why: str) -> None:
        self._next_reclaim = self.clock() + RECLAIM_RETRY
        if self.driver.reclaim_vips():
            log.info("vip lease: %s, adding the VIPs", why)

    def _start_holddown(self, reason: str) -> None:
        if self.holddown <= 0:
            return
        if self._holddown_handle is not None:
            self._holddown_handle.cancel()
        log.warning(
            "vip lease: lost (%s): advertising a lowered priority for %.1fs (check %s)",
            reason,
            self.holddown,
            LEASE_CHECK,
        )
        self.driver.set_check(LEASE_CHECK, False)
        self._holddown_handle = asyncio.get_running_loop().call_later(self.holddown, self._end_holddown)

    def _end_holddown(self) -> None:
        self._holddown_handle = None
        self.driver.set_check(LEASE_CHECK, True)

    def _fence_close(self) -> None:
        if self.fence is None or self.fence.open_until_time is None:
            return  # closed, or its deadline has passed: the kernel has dropped the element already
        task = asyncio.get_running_loop().create_task(self._fence_op(self.fence.close()))
        self._fence_tasks.add(task)
        task.add_done_callback(self._fence_tasks.discard)

    @staticmethod
    async def _fence_op(op: Any) -> None:
        try:
            await op
        except FenceError as exc:
            log.error("vip lease: fence: %s", exc)

    async def _loop(self) -> None:
        while True:
            try:
                await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("vip lease: poll failed")
            await asyncio.sleep(self.poll_interval)

    async def _poll(self) -> None:
        if self.quorum is not None:
            ok = bool(self.quorum())
            if ok != self._quorum_ok:
                self._quorum_ok = ok
                self.driver.set_check(QUORUM_CHECK, ok)
        until = self.lease.act_until()
        fence = self.fence
        if fence is not None:
            programmed = fence.open_until_time
            if until is not None and (programmed is None or until > programmed + 0.001):
                if programmed is not None or self.driver.vips_held():
                    # a granted renewal: move the kernel's deadline (first opening: LeasedVipPort.add)
                    await self._fence_op(fence.open_until(until))
            elif until is None and programmed is not None:
                await self._fence_op(fence.close())
        if (
            self.driver.state == "MASTER"
            and not self.driver.vips_held()
            and self.clock() >= self._next_reclaim
            and self.lease.may_act()
        ):
            self._reclaim("lease held but the VIPs are not")

    def snapshot(self) -> dict[str, Any]:
        return {
            "resignations": self.resignations,
            "last_resign_reason": self.last_resign_reason,
            "adverts_held_back": self.adverts_held_back,
            "holddown_seconds": self.holddown,
            "in_holddown": self._holddown_handle is not None,
            "quorum": self._quorum_ok,
        }
