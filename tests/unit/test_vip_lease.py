"""The VIP lease wired into the VRRP driver (halb.vrrp.lease_gate), on fakes: a fake VRRP clock, a fake
lease clock, FakeVipPort, a fake fence and a fake (or the real) lease keeper; no sockets, no netlink.

Every gate of docs/quorum.md "VIP ownership": no VIP without the lease, the fence opened before the VIP is
added, GARP refresh suppressed after a lease loss, a thawed process sends no GARP and no MASTER advert,
LeaseLost removes the VIP at once and resigns, leaving MASTER / SIGTERM releases the lease.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from halb.cluster.keeper import LeaseKeeper
from halb.cluster.lease import LeaseGranted, LeaseLost, LeaseTiming
from halb.config_model import GarpConfig, TrackConfig
from halb.vrrp.fence import FakeFence, FenceError
from halb.vrrp.lease_gate import (
    LEASE_CHECK,
    QUORUM_CHECK,
    LeasedVipPort,
    LeaseGuard,
    LeaseRequired,
    holddown_for,
)
from halb.vrrp.machine import (
    RemoveVips,
    SendAdvert,
    State,
    StateChanged,
    TransitionReason,
    VrrpConfig,
    VrrpMachine,
)
from halb.vrrp.vip import FakeVipPort, VipError
from tests.unit.vrrp_fakes import GROUP, ME, PEER, VIP, Clock, DriverRig, RaftMember, advert_from, run

VIP32 = f"{VIP}/32"


# --- fakes ------------------------------------------------------------------------------------------------
class FakeLease:
    """The LeaseKeeper surface with a hand-driven lease: grant(), lose(), expiry by the lease clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.until: float | None = None
        self.unconfirmed = False
        self.wanted: list[bool] = []
        self.releases: list[float] = []
        self.checks = 0
        self._listeners: list[Callable[[Any], None]] = []

    def may_act(self) -> bool:
        return self.holds() and not self.unconfirmed

    def holds(self) -> bool:
        return self.until is not None and self.clock() < self.until

    def check(self) -> bool:
        self.checks += 1
        if self.until is not None and self.clock() >= self.until:
            self.lose("lease expired before a renewal was committed (no quorum?)")
        return self.may_act()

    def act_until(self) -> float | None:
        return self.until if self.holds() else None

    def want(self, wanted: bool) -> None:
        self.wanted.append(wanted)

    def add_listener(self, callback: Callable[[Any], None]) -> None:
        self._listeners.append(callback)

    async def release(self, timeout: float) -> bool:
        self.releases.append(timeout)
        self.want(False)
        return True

    # driving it
    def grant(self, seconds: float = 1.8) -> None:
        self.until = self.clock() + seconds
        self.unconfirmed = False
        for cb in self._listeners:
            cb(LeaseGranted(self.until))

    def lose(self, reason: str = "renewal rejected") -> None:
        self.until = None
        for cb in self._listeners:
            cb(LeaseLost(reason))


class LoggingPort(FakeVipPort):
    """FakeVipPort writing into a log shared with the fence, to check the order of operations."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def add(self, vips: Sequence[str]) -> None:
        self.log.append("add")
        await super().add(vips)

    async def remove(self, vips: Sequence[str]) -> None:
        self.log.append("remove")
        await super().remove(vips)

    async def send_garp(self, vips: Sequence[str]) -> None:
        self.log.append("garp")
        await super().send_garp(vips)


class LoggingFence(FakeFence):
    def __init__(self, clock: Clock, log: list[str]) -> None:
        super().__init__(clock)
        self.log = log

    async def open_until(self, until: float) -> bool:
        self.log.append("fence-open")
        return await super().open_until(until)

    async def close(self) -> None:
        self.log.append("fence-close")
        await super().close()


class Rig(DriverRig):
    """A driver with a LeasedVipPort, a LeaseGuard, a fake lease and a fake fence."""

    def __init__(
        self, lease: Any = None, holddown: float = 5.0, quorum: Any = None, **overrides: Any
    ) -> None:
        self.lease_clock = Clock(500.0)
        self.log: list[str] = []
        self.vips = LoggingPort(self.log)
        self.fence = LoggingFence(self.lease_clock, self.log)
        self.lease = lease if lease is not None else FakeLease(self.lease_clock)
        self.port = LeasedVipPort(self.vips, self.lease, self.fence)
        overrides.setdefault("track", TrackConfig(weight=50))
        super().__init__(self.port, **overrides)  # self.clock: the VRRP clock
        self.guard = LeaseGuard(
            self.driver, self.lease, self.fence, holddown=holddown, quorum=quorum, poll=0.01, clock=self.clock
        )
        self.driver.advert_gate = self.guard.advert_allowed

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)
            await self.driver.settle()

    def priorities(self) -> list[int]:
        return [a.priority for a, _ in self.transport.adverts()]

    async def holding_master(self) -> None:
        """Started, MASTER, lease granted, VIP added and announced."""
        await self.start()
        await self.fire()
        assert self.driver.state == "MASTER"
        self.lease.grant()
        await self.settle()
        await asyncio.sleep(0.03)  # the GARP rounds
        assert self.driver.vips_held() == [VIP]


# --- LeasedVipPort ------------------------------------------------------------------------------------------
def test_the_leased_port_refuses_add_and_garp_without_the_lease_but_always_removes() -> None:
    async def go() -> None:
        clock = Clock(10.0)
        lease, inner, fence = FakeLease(clock), FakeVipPort(), FakeFence(clock)
        port = LeasedVipPort(inner, lease, fence)
        with pytest.raises(LeaseRequired):
            await port.add([VIP32])
        with pytest.raises(LeaseRequired):
            await port.send_garp([VIP])
        assert inner.calls == [] and fence.calls == []
        lease.until = 11.8
        await port.add([VIP32])
        await port.send_garp([VIP])
        assert fence.calls == [("open", 11.8)] and fence.is_open()
        assert inner.calls == [("add", (VIP32,)), ("garp", (VIP,))]
        lease.unconfirmed = True  # a pause was seen: held, but not to be acted on
        with pytest.raises(LeaseRequired):
            await port.send_garp([VIP])
        lease.until = None
        await port.remove([VIP32])  # always allowed
        assert inner.held() == set() and port.held() == set()
        assert (port.refused_adds, port.refused_garps) == (1, 2)
        # the fence cannot open: the VIP is not added (an error, counted by the driver)
        lease.until, lease.unconfirmed, fence.fail = 12.0, False, True
        with pytest.raises(VipError, match="fence"):
            await port.add([VIP32])
        assert inner.held() == set()
        # a lease about to end cannot open the fence either
        fence.fail, lease.until = False, clock.now + 1e-9
        clock.now += 2e-9
        with pytest.raises(LeaseRequired):
            await port.add([VIP32])

    run(go)


# --- MASTER without the lease -------------------------------------------------------------------------------
def test_a_master_without_the_lease_holds_no_vip_and_keeps_advertising() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.start()
        assert rig.lease.wanted == [False]  # BACKUP at start: nothing wanted
        await rig.fire()
        await asyncio.sleep(0.03)  # the GARP rounds fall due: refused
        d = rig.driver
        assert d.state == "MASTER" and rig.lease.wanted == [False, True]
        assert d.vips_held() == [] and rig.vips.calls == [] and rig.fence.calls == []
        snap = d.snapshot()["lease"]
        assert (snap["adds_deferred"], snap["garps_suppressed"]) == (1, 2)
        assert d.vip_errors == 0 and d.garp_errors == 0  # refusals are not errors
        await rig.fire()  # the Adver_Timer: a MASTER-pending node still advertises, at its priority
        assert rig.priorities() == [150, 150]
        await d.stop()

    run(go)


def test_the_grant_opens_the_fence_then_adds_the_vip_then_announces_it() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.holding_master()
        assert rig.log == ["fence-open", "add", "garp", "garp"]
        assert rig.fence.calls == [("open", rig.lease.until)]
        assert rig.driver.snapshot()["vips_held"] == [VIP]
        await rig.driver.stop()

    run(go)


def test_a_grant_after_leaving_master_adds_nothing() -> None:
    async def go() -> None:
        rig = Rig(priority=140)
        await rig.start()
        await rig.fire()
        await rig.receive(advert_from(PEER, 150))  # preempted before the lease came
        assert rig.driver.state == "BACKUP" and rig.lease.wanted[-1] is False
        rig.lease.grant()
        await rig.settle()
        assert rig.vips.ops("add") == [] and rig.driver.vips_held() == []
        await rig.driver.stop()

    run(go)


# --- losing the lease ---------------------------------------------------------------------------------------
def test_lease_lost_removes_the_vip_at_once_resigns_and_holds_down() -> None:
    async def go() -> None:
        rig = Rig(holddown=0.05)
        await rig.holding_master()
        d = rig.driver
        rig.log.clear()
        rig.lease.lose("renewal rejected: held by lb2")
        await rig.settle()
        assert d.state == "BACKUP" and d.vips_held() == []
        assert rig.log[:2] == ["fence-close", "remove"] or rig.log[:2] == ["remove", "fence-close"]
        assert not rig.fence.is_open()
        assert rig.priorities()[-1] == 0  # resigned like a stopping master: a backup takes over at once
        assert d.last_transition is not None and d.last_transition.reason == "resigned"
        assert rig.lease.wanted[-1] is False
        # hold-down: a lowered priority so we do not preempt the new holder straight back
        assert LEASE_CHECK in d.tracking.failing and d.priority == 100
        assert rig.guard.snapshot()["resignations"] == 1
        await asyncio.sleep(0.1)
        assert d.tracking.failing == [] and d.priority == 150
        await d.stop()

    run(go)


def test_garp_refresh_is_suppressed_once_the_lease_has_run_out() -> None:
    async def go() -> None:
        rig = Rig(garp=GarpConfig(repeat=1, interval=0.0, refresh=0.02))
        await rig.holding_master()
        d = rig.driver
        await asyncio.sleep(0.05)
        assert d.garp_rounds >= 2  # refreshing while the lease allows it
        # the lease runs out (our loop has not ticked yet: no LeaseLost): the next refresh is refused
        rig.lease_clock.now = rig.lease.until + 0.001  # type: ignore[operator]
        garps = len(rig.vips.ops("garp"))
        await asyncio.sleep(0.06)
        assert len(rig.vips.ops("garp")) == garps
        assert d.garps_suppressed >= 2
        await d.stop()

    run(go)


def test_a_lost_lease_stops_the_garp_schedule_and_the_adverts() -> None:
    async def go() -> None:
        rig = Rig(garp=GarpConfig(repeat=1, interval=0.0, refresh=0.02))
        await rig.holding_master()
        rig.lease.lose()
        await rig.settle()
        garps, suppressed = len(rig.vips.ops("garp")), rig.driver.garps_suppressed
        await asyncio.sleep(0.06)
        assert len(rig.vips.ops("garp")) == garps and rig.driver.garps_suppressed == suppressed
        await rig.driver.stop()

    run(go)


# --- freeze and resume --------------------------------------------------------------------------------------
def test_thawed_after_the_lease_ran_out_no_garp_no_master_advert_it_resigns() -> None:
    async def go() -> None:
        rig = Rig(garp=GarpConfig(repeat=1, interval=0.0, refresh=0.5))
        await rig.holding_master()
        d = rig.driver
        adverts = len(rig.priorities())
        rig.log.clear()
        # frozen for 5 s (lease 1.8 s): both clocks moved on; whichever timer fires first after the thaw
        # -- here the Adver_Timer -- must not claim mastership on the strength of the old lease
        rig.lease_clock.now += 5.0
        await rig.fire()
        assert rig.priorities()[adverts:] == [0]  # no 150 advert, only the resignation's priority-0 one
        assert d.adverts_suppressed == 1 and rig.lease.checks >= 1  # the 150 one, found stale
        assert d.state == "BACKUP" and d.vips_held() == []
        assert "garp" not in rig.log and "remove" in rig.log
        # the GARP refresh would have fallen due too: the schedule is gone with the VIP
        await asyncio.sleep(0.6)
        assert "garp" not in rig.log
        await d.stop()

    run(go)


def test_after_a_short_pause_no_master_action_until_a_fresh_renewal() -> None:
    async def go() -> None:
        rig = Rig(garp=GarpConfig(repeat=1, interval=0.0, refresh=0.02))
        await rig.holding_master()
        d = rig.driver
        rig.lease.unconfirmed = True  # a 0.4 s pause: the lease still runs but is unconfirmed
        adverts, garps = len(rig.priorities()), len(rig.vips.ops("garp"))
        await rig.fire()  # Adver_Timer: held back
        await asyncio.sleep(0.05)  # refresh rounds: suppressed
        assert len(rig.priorities()) == adverts and d.adverts_suppressed == 1
        assert len(rig.vips.ops("garp")) == garps and d.garps_suppressed >= 1
        assert d.state == "MASTER" and d.vips_held() == [VIP]  # the VIP stays: the lease still runs
        rig.lease.unconfirmed = False  # the renewal sent after the pause was granted
        await rig.fire()
        await asyncio.sleep(0.03)
        assert rig.priorities()[-1] == 150 and len(rig.vips.ops("garp")) > garps
        await d.stop()

    run(go)


def test_resume_with_the_real_keeper_suppresses_garp_until_a_renewal_sent_after_the_gap() -> None:
    async def go() -> None:
        lease_clock = Clock(100.0)
        member = RaftMember()
        keeper = LeaseKeeper(member, "lb1", LeaseTiming.for_duration(2.0), clock=lease_clock)
        member.keepers.append(keeper)  # the keeper's own loop is not started: the test is its clock
        rig = Rig(lease=keeper, garp=GarpConfig(repeat=1, interval=0.0, refresh=0.02))
        rig.lease_clock = lease_clock
        rig.fence.clock = lease_clock
        await rig.start()
        await rig.fire()  # MASTER -> want(True) -> acquire -> granted -> VIP
        for _ in range(20):
            await rig.settle()
        assert keeper.may_act() and rig.driver.vips_held() == [VIP]
        assert rig.fence.calls == [("open", keeper.act_until())]
        # a 0.4 s freeze (> gap_threshold 0.25 s, < the lease): the refresh rounds that fall due are refused
        member.down = True  # and the renewal after the gap cannot commit yet
        lease_clock.now += 0.4
        garps = len(rig.vips.ops("garp"))
        await asyncio.sleep(0.05)
        assert len(rig.vips.ops("garp")) == garps and rig.driver.garps_suppressed >= 1
        assert keeper.holds() and not keeper.may_act()
        # the renewal sent after the gap is granted: GARP allowed again
        member.down = False
        lease_clock.now += 0.05
        keeper.check()  # the loop's tick: sends the renewal (a gap makes it due at once)
        for _ in range(10):
            await rig.settle()
        assert keeper.may_act()
        await asyncio.sleep(0.05)
        assert len(rig.vips.ops("garp")) > garps
        # a freeze past the lease: the first check after it finds the lease gone and resigns
        lease_clock.now += 3.0
        await rig.fire()
        assert rig.driver.state == "BACKUP" and rig.driver.vips_held() == []
        assert rig.priorities()[-1] == 0
        await rig.driver.stop()
        await keeper.stop()

    run(go)


# --- leaving MASTER, SIGTERM --------------------------------------------------------------------------------
def test_leaving_master_removes_the_vip_before_giving_the_lease_up() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.holding_master()
        order: list[str] = []
        rig.vips.log = order
        original_want = rig.lease.want
        rig.lease.want = lambda w: (order.append(f"want {w}"), original_want(w))  # type: ignore[method-assign]
        await rig.receive(advert_from(PEER, 200))  # a higher priority: BACKUP
        await rig.settle()
        assert order[:2] == ["remove", "want False"]
        assert rig.driver.state == "BACKUP"
        await rig.driver.stop()

    run(go)


def test_sigterm_removes_the_vip_then_releases_the_lease_and_closes_the_fence() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.holding_master()
        await rig.driver.stop()  # the node's shutdown: VRRP first...
        assert rig.driver.vips_held() == [] and rig.priorities()[-1] == 0
        assert rig.lease.wanted[-1] is False
        released = await rig.guard.stop(release_timeout=0.5)  # ...then the committed release
        assert released and rig.lease.releases == [0.5]
        assert not rig.fence.is_open()

    run(go)


def test_sigterm_with_the_real_keeper_commits_the_release() -> None:
    async def go() -> None:
        lease_clock = Clock(100.0)
        member = RaftMember()
        keeper = LeaseKeeper(member, "lb1", LeaseTiming.for_duration(2.0), clock=lease_clock, tick=0.01)
        member.keepers.append(keeper)
        keeper.start()
        rig = Rig(lease=keeper)
        rig.lease_clock = rig.fence.clock = lease_clock
        await rig.start()
        await rig.fire()
        for _ in range(20):
            await rig.settle()
        assert member.state.leases["vip"]["holder"] == "lb1"
        await rig.driver.stop()
        assert await rig.guard.stop(release_timeout=1.0)
        assert member.state.leases["vip"]["holder"] is None  # a peer may acquire at once
        await keeper.stop()

    run(go)


# --- the poll: renewals, quorum, self-healing ---------------------------------------------------------------
def test_each_renewal_moves_the_fence_deadline() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.holding_master()
        rig.guard.start()
        first = rig.lease.until
        rig.lease.until = first + 0.67  # type: ignore[operator]  # a granted renewal
        await asyncio.sleep(0.05)
        assert rig.fence.calls[-1] == ("open", first + 0.67)  # type: ignore[operator]
        rig.lease.until = None  # gone without an event (belt and braces): the poll closes the fence
        await asyncio.sleep(0.05)
        assert rig.fence.calls[-1] == ("close", None)
        await rig.driver.stop()
        await rig.guard.stop()

    run(go)


def test_without_quorum_the_node_advertises_a_lowered_priority() -> None:
    async def go() -> None:
        quorum = {"ok": False}
        rig = Rig(quorum=lambda: quorum["ok"])
        await rig.start()
        rig.guard.start()
        await asyncio.sleep(0.03)
        assert rig.driver.tracking.failing == [QUORUM_CHECK] and rig.driver.priority == 100
        quorum["ok"] = True
        await asyncio.sleep(0.03)
        assert rig.driver.tracking.failing == [] and rig.driver.priority == 150
        await rig.driver.stop()
        await rig.guard.stop()

    run(go)


def test_a_master_holding_the_lease_but_not_the_vip_adds_it_again() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.start()
        await rig.fire()
        rig.vips.fail = {"add"}
        rig.lease.grant()
        await rig.settle()
        assert rig.driver.vips_held() == [] and rig.driver.vip_errors == 1
        rig.vips.fail = set()
        rig.clock.now += 1.5  # past RECLAIM_RETRY
        rig.guard.start()
        await asyncio.sleep(0.05)
        await rig.settle()
        assert rig.driver.vips_held() == [VIP]
        await rig.driver.stop()
        await rig.guard.stop()

    run(go)


def test_holddown_scales_with_the_lease() -> None:
    assert holddown_for(2.0) == 5.0 and holddown_for(4.0) == 10.0


# --- the machine's resign -----------------------------------------------------------------------------------
def test_machine_resign_leaves_master_like_a_shutdown_but_stays_backup() -> None:
    m = VrrpMachine(VrrpConfig(vrid=51, priority=150, primary_ip=ME, virtual_ips=(VIP,), advert_interval=1.0))
    assert m.resign(0.0) == []  # INITIALIZE: nothing to give up
    m.startup(0.0)
    assert m.resign(0.5) == []  # BACKUP: nothing either
    m.timer_fired(10.0)
    assert m.state is State.MASTER
    actions = m.resign(11.0)
    assert [type(a) for a in actions] == [SendAdvert, RemoveVips, StateChanged]
    assert isinstance(actions[0], SendAdvert) and actions[0].priority == 0
    assert actions[2] == StateChanged(State.MASTER, State.BACKUP, TransitionReason.RESIGNED)
    assert m.state is State.BACKUP and m.next_deadline() == pytest.approx(11.0 + m.master_down_interval)
    assert m.timer_fired(11.0 + m.master_down_interval)[1:3][0].__class__.__name__ == "AddVips"


def test_fence_errors_are_reported_not_raised_by_the_guard() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.holding_master()
        rig.fence.fail = True
        rig.lease.lose()
        await rig.settle()
        assert rig.driver.state == "BACKUP"
        with pytest.raises(FenceError):
            await rig.fence.open_until(rig.lease_clock() + 1)
        await rig.driver.stop()

    run(go)


def test_adverts_go_to_the_group_unchanged_without_a_lease_gate() -> None:
    async def go() -> None:
        rig = DriverRig(FakeVipPort(), track=TrackConfig(weight=50))
        await rig.start()
        await rig.fire()
        assert [dst for _, dst in rig.transport.sent] == [GROUP] and rig.driver.vips_held() == [VIP]
        await rig.driver.stop()

    run(go)
