"""The VRRP driver without sockets: fake transport, FakeVipPort, a fake clock; plus tracking, notify, GARP
frames, the netlink port's idempotence, and the status/metrics rendering of an instance."""

from __future__ import annotations

import asyncio
import io
import struct
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from halb import metrics
from halb.config_model import GarpConfig, TrackConfig
from halb.status_view import render_vrrp
from halb.vrrp.codec import Advert, encode
from halb.vrrp.driver import RX_ERROR_REASONS, NotifyRunner
from halb.vrrp.link import IFF_RUNNING, IFF_UP, LinkWatch, link_up, read_link
from halb.vrrp.tracking import Tracking
from halb.vrrp.vip import FakeVipPort, NetlinkVipPort, VipError, build_garp_frames, release_stale
from tests.unit.vrrp_fakes import (
    GROUP,
    ME,
    OTHER,
    PEER,
    VIP,
    DriverRig,
    FakeTransport,
    advert_from,
    ip_packet,
    run,
)
from tests.unit.vrrp_fakes import Clock as Clock


class Rig(DriverRig):
    def __init__(self, **overrides: Any) -> None:
        self.vips = FakeVipPort()
        super().__init__(self.vips, **overrides)

    async def master(self) -> None:
        await self.start()
        await self.fire()
        assert self.driver.state == "MASTER"


# --------------------------------------------------------------------------------------------- driver
def test_start_is_backup_then_master_after_master_down_interval() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.start()
        d = rig.driver
        assert d.state == "BACKUP"
        assert rig.vips.calls == [] and rig.transport.sent == []
        machine = d.machine
        assert machine is not None
        assert machine.next_deadline() == pytest.approx(1000.0 + 3 * 1.0 + (256 - 150) / 256)
        await rig.fire()
        assert d.state == "MASTER"
        ((advert, dst),) = rig.transport.adverts()
        assert (advert.vrid, advert.priority, advert.max_advert_interval_cs, dst) == (51, 150, 100, GROUP)
        assert advert.addresses == (VIP,)
        await asyncio.sleep(0.05)  # the GARP schedule: 2 rounds 0.01 s apart
        # in order: the VIP is added before any GARP announces it
        assert rig.vips.calls == [("add", (f"{VIP}/32",)), ("garp", (VIP,)), ("garp", (VIP,))]
        assert d.vips_held() == [VIP]
        assert (d.adverts_sent, d.transitions, d.garp_rounds) == (1, 2, 2)
        snap = d.snapshot()
        assert (snap["state"], snap["master_ip"], snap["vips_held"]) == ("MASTER", ME, [VIP])
        # the master's Adver_Timer
        await rig.fire()
        assert [a.priority for a, _ in rig.transport.adverts()] == [150, 150]
        await d.stop()

    run(go)


def test_backup_follows_a_higher_master_and_takes_over_when_it_goes_quiet() -> None:
    async def go() -> None:
        rig = Rig(priority=140)
        await rig.start()
        await rig.receive(advert_from(PEER, 150))
        d = rig.driver
        assert (d.state, d.adverts_received, d.snapshot()["master_ip"]) == ("BACKUP", 1, PEER)
        assert d.snapshot()["last_advert"] == {"at_seconds_ago": 0.0, "source": PEER, "priority": 150}
        rig.clock.now += 0.5
        assert d.snapshot()["last_advert"]["at_seconds_ago"] == 0.5
        await rig.fire()  # the master went quiet
        assert d.state == "MASTER" and d.vips_held() == [VIP]
        # the old master comes back with a higher priority: we step down and drop the VIP
        await rig.receive(advert_from(PEER, 150))
        assert d.state == "BACKUP"
        assert d.vips_held() == []
        assert rig.vips.ops("remove") == [(f"{VIP}/32",)]
        assert d.transitions == 3
        await d.stop()

    run(go)


def test_priority_zero_advert_makes_the_backup_take_over_after_skew_time() -> None:
    async def go() -> None:
        rig = Rig(priority=140)
        await rig.start()
        await rig.receive(advert_from(PEER, 150))
        await rig.receive(advert_from(PEER, 0))
        machine = rig.driver.machine
        assert machine is not None
        assert machine.next_deadline() == pytest.approx(rig.clock.now + (256 - 140) / 256 * 1.0)
        await rig.fire()
        assert rig.driver.state == "MASTER"
        await rig.driver.stop()

    run(go)


def test_every_rejection_is_counted_by_reason_and_nothing_raises() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.master()
        d = rig.driver
        good = advert_from(PEER, 100)
        bad_checksum = bytearray(good)
        bad_checksum[-1] ^= 0xFF
        await rig.receive(ip_packet(encode(Advert(51, 100, 100, (VIP,)), PEER, GROUP), PEER, ttl=64))
        await rig.receive(bytes(bad_checksum))
        await rig.receive(good[:24])  # a 4-byte VRRP message
        await rig.receive(b"\x45garbage")
        await rig.receive(advert_from(PEER, 200, vrid=52))
        await rig.receive(ip_packet(b"\x00" * 8, PEER, proto=17))
        await rig.receive(b"")
        errors = d.snapshot()["rx_errors"]
        assert set(errors) == set(RX_ERROR_REASONS)
        assert errors["ttl"] == 1 and errors["checksum"] == 1 and errors["vrid"] == 1
        assert errors["truncated"] == 3 and errors["protocol"] == 1
        assert errors["internal"] == 0
        assert d.adverts_received == 0
        # own packets (looped back) are ignored, not errors
        await rig.receive(advert_from(ME, 150))
        assert d.rx_own == 1
        assert d.state == "MASTER" and d.vips_held() == [VIP]
        await d.stop()

    run(go)


def test_master_reasserts_against_a_lower_priority_advert() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.master()
        sent = len(rig.transport.sent)
        await rig.receive(advert_from(PEER, 100))
        assert rig.driver.state == "MASTER"
        assert [a.priority for a, _ in rig.transport.adverts()[sent:]] == [150]
        await rig.driver.stop()

    run(go)


def test_unicast_sends_to_each_peer_with_its_own_checksum_and_drops_strangers() -> None:
    async def go() -> None:
        rig = Rig(unicast_peers=(PEER, OTHER))
        await rig.master()
        adverts = rig.transport.adverts()  # decode() verifies each checksum against its real dst
        assert [dst for _, dst in adverts] == [PEER, OTHER]
        d = rig.driver
        await rig.receive(advert_from("10.0.0.99", 200, dst=ME))
        assert d.rx_errors["peer"] == 1 and d.state == "MASTER"
        await rig.receive(advert_from(PEER, 200, dst=ME))
        assert d.state == "BACKUP"
        assert d.snapshot()["mode"] == "unicast"
        await d.stop()

    run(go)


def test_rfc9568_checksum_mode_talks_to_its_own_kind_only() -> None:
    async def go() -> None:
        rig = Rig(checksum_mode="rfc9568", priority=140)
        await rig.start()
        pseudo = advert_from(PEER, 150)
        await rig.receive(pseudo)
        assert rig.driver.rx_errors["checksum"] == 1
        plain = encode(Advert(51, 150, 100, (VIP,)), PEER, GROUP, "rfc9568")
        await rig.receive(ip_packet(plain, PEER))
        assert rig.driver.adverts_received == 1
        await rig.driver.stop()

    run(go)


def test_stop_as_master_resigns_with_priority_zero_and_drops_the_vips() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.master()
        await rig.driver.stop()
        advert, _ = rig.transport.adverts()[-1]
        assert advert.priority == 0
        assert rig.vips.held() == set()
        assert rig.driver.state == "STOP"
        assert not rig.transport.closed  # an injected transport belongs to the caller
        assert rig.vips.calls[-1] == ("close", ())
        assert ("remove", (f"{VIP}/32",)) in rig.vips.calls
        await rig.driver.stop()  # idempotent

    run(go)


def test_stop_as_backup_sends_nothing_but_still_makes_sure_no_vip_is_left() -> None:
    async def go() -> None:
        rig = Rig()
        await rig.start()
        rig.vips.addresses.add(f"{VIP}/32")  # e.g. put there by hand
        await rig.driver.stop()
        assert rig.transport.sent == []
        assert rig.vips.held() == set()
        assert rig.driver.state == "STOP"

    run(go)


def test_tracking_lowers_the_advertised_priority_at_once_and_restores_it() -> None:
    async def go() -> None:
        rig = Rig(track=TrackConfig(weight=50))
        await rig.master()
        d = rig.driver
        d.set_check("pool:app", False)
        await d.settle()
        assert d.priority == 100
        assert rig.transport.adverts()[-1][0].priority == 100
        snap = d.snapshot()
        assert (snap["priority"], snap["base_priority"]) == (100, 150)
        assert snap["tracking"]["failing"] == ["pool:app"]
        # a peer at 140 now wins: its adverts make us step down
        await rig.receive(advert_from(PEER, 140))
        assert d.state == "BACKUP" and d.vips_held() == []
        d.set_check("pool:app", True)
        assert d.priority == 150
        # back at 150, the peer's 140 adverts are discarded; we preempt when the down timer fires
        await rig.receive(advert_from(PEER, 140))
        await rig.fire()
        assert d.state == "MASTER"
        await d.stop()

    run(go)


def test_tracking_before_start_is_applied_at_start() -> None:
    async def go() -> None:
        rig = Rig(track=TrackConfig(weight=200))
        rig.driver.set_check("listener:web", False)
        await rig.master()
        assert rig.transport.adverts()[0][0].priority == 1  # 150 - 200, clamped to 1
        await rig.driver.stop()

    run(go)


def test_weight_zero_means_fault_and_back() -> None:
    async def go() -> None:
        rig = Rig(track=TrackConfig(weight=0))
        await rig.master()
        d = rig.driver
        d.set_check("pool:app", False)
        await d.settle()
        assert d.state == "FAULT"
        assert rig.transport.adverts()[-1][0].priority == 0
        assert d.vips_held() == []
        await rig.receive(advert_from(PEER, 100))  # ignored while FAULT
        assert d.state == "FAULT"
        d.set_check("pool:app", True)
        await d.settle()
        assert d.state == "BACKUP"
        await d.stop()
        assert d.state == "STOP"

    run(go)


def test_a_link_down_means_fault_whatever_the_weight_and_back_as_backup() -> None:
    async def go() -> None:
        rig = Rig(track=TrackConfig(weight=50))
        await rig.master()
        d = rig.driver
        d.set_check("pool:app", False)  # a weighted check: priority 100, still MASTER
        await d.settle()
        assert d.state == "MASTER" and rig.transport.adverts()[-1][0].priority == 100
        d.set_check("interface:eth0", False, fault=True)
        await d.settle()
        assert d.state == "FAULT"
        assert rig.transport.adverts()[-1][0].priority == 0  # resigned: the peer takes over at once
        assert d.vips_held() == []
        assert d.snapshot()["tracking"]["failing"] == ["interface:eth0", "pool:app"]
        await rig.receive(advert_from(PEER, 100))  # ignored while FAULT
        assert d.state == "FAULT"
        d.set_check("interface:eth0", True, fault=True)  # back, but the pool still fails
        await d.settle()
        assert d.state == "BACKUP"
        machine = d.machine
        assert machine is not None and machine.priority == 100  # starts again with the weighted priority
        d.set_check("pool:app", True)
        await d.settle()
        assert machine.priority == 150
        await d.stop()

    run(go)


def test_tracking_fault_checks() -> None:
    t = Tracking(150, 50)
    assert t.set("pool:app", False) and not t.fault and t.effective_priority == 100
    assert t.set("interface:eth0", False, fault=True) and t.fault
    assert not t.set("interface:eth0", False, fault=True)  # nothing changed
    assert t.set("interface:eth0", True, fault=True) and not t.fault and t.effective_priority == 100
    zero = Tracking(150, 0)
    assert zero.set("pool:app", False) and zero.fault  # weight 0: any failing check is FAULT


def test_link_up_needs_up_and_carrier() -> None:
    assert link_up(IFF_UP | IFF_RUNNING | 0x1000) == (True, "up")
    assert link_up(0x1002) == (False, "link set down")
    assert link_up(IFF_UP | 0x1002) == (False, "no carrier")


class _LinkNetlink:
    """What read_link asks of pyroute2's AsyncIPRoute: link("get", ifname=...) and close()."""

    def __init__(self, flags: int | None = None, error: int | None = None) -> None:
        self.flags, self.error, self.closed = flags, error, False

    async def link(self, command: str, ifname: str) -> list[dict[str, int]]:
        if self.error is not None:
            exc = OSError(self.error, "netlink error")
            exc.code = self.error  # type: ignore[attr-defined]  (NetlinkError carries .code)
            raise exc
        return [] if self.flags is None else [{"flags": self.flags}]

    def close(self) -> None:
        self.closed = True


def test_read_link_reports_down_missing_and_unreadable_links() -> None:
    async def go() -> None:
        for fake, expected in [
            (_LinkNetlink(IFF_UP | IFF_RUNNING), (True, "up")),
            (_LinkNetlink(IFF_UP), (False, "no carrier")),
            (_LinkNetlink(error=19), (False, "no such interface")),  # ENODEV
            (_LinkNetlink(), (False, "no such interface")),
        ]:
            assert await read_link("eth0", lambda f=fake: f) == expected
            assert fake.closed
        up, why = await read_link("eth0", lambda: _LinkNetlink(error=105))  # ENOBUFS: unknown, not down
        assert up is None and "cannot read the link" in why

    run(go)


def test_link_watch_keeps_the_last_report_when_netlink_does_not_answer() -> None:
    watch = LinkWatch()
    assert watch.update(True, "up") == (None, True)  # a link that is up at start: nothing to say
    assert watch.update(True, "up") == (None, True)
    assert watch.update(None, "cannot read the link: ENOBUFS") == ("cannot read the link: ENOBUFS", None)
    assert watch.update(False, "no carrier") == ("no carrier", False)  # down: FAULT
    assert watch.update(False, "no carrier") == (None, False)  # (said once)
    assert watch.update(True, "up") == ("up", True)
    assert LinkWatch().update(False, "link set down") == ("link set down", False)  # down at start: said


def test_a_failing_vip_port_is_counted_and_the_instance_carries_on() -> None:
    async def go() -> None:
        rig = Rig()
        rig.vips.fail = {"add", "garp"}
        await rig.master()
        await asyncio.sleep(0.05)
        d = rig.driver
        assert d.vip_errors == 1 and "fake add failure" in (d.last_vip_error or "")
        assert d.garp_errors == 2
        assert d.state == "MASTER"
        await rig.fire()
        assert d.adverts_sent == 2
        await d.stop()

    run(go)


def test_garp_refresh_repeats_while_master_and_stops_with_it() -> None:
    async def go() -> None:
        rig = Rig(garp=GarpConfig(repeat=1, interval=0.0, refresh=0.02))
        await rig.master()
        await asyncio.sleep(0.11)
        rounds = rig.driver.garp_rounds
        assert 3 <= rounds <= 7
        await rig.receive(advert_from(PEER, 200))  # step down: the refresh stops
        await asyncio.sleep(0.06)
        assert rig.driver.garp_rounds == rounds
        await rig.driver.stop()

    run(go)


def test_send_failures_are_counted() -> None:
    class Broken(FakeTransport):
        def send(self, payload: bytes, dst: str) -> None:
            raise OSError(101, "Network is unreachable")

    async def go() -> None:
        rig = Rig()
        rig.driver._transport = Broken()
        await rig.master()
        assert (rig.driver.tx_errors, rig.driver.adverts_sent) == (1, 0)
        await rig.driver.stop()

    run(go)


def test_transition_listeners_see_every_change_and_cannot_break_the_driver() -> None:
    async def go() -> None:
        rig = Rig()
        seen: list[tuple[str, str, str]] = []
        rig.driver.add_listener(lambda t: seen.append((t.old, t.new, t.reason)))
        rig.driver.add_listener(lambda t: 1 / 0)  # type: ignore[func-returns-value]
        await rig.master()
        await rig.driver.stop()
        assert seen == [
            ("INIT", "BACKUP", "startup"),
            ("BACKUP", "MASTER", "master_down_timer"),
            ("MASTER", "STOP", "shutdown"),
        ]

    run(go)


# --------------------------------------------------------------------------------------------- notify
def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "notify.sh"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_notify_hook_gets_keepalived_arguments_for_every_transition(tmp_path: Path) -> None:
    out = tmp_path / "calls"
    script = _script(tmp_path, f'echo "$@" >> {out}')

    async def go() -> None:
        rig = Rig(notify=script)
        await rig.master()
        await rig.driver.stop()

    run(go)
    assert out.read_text().splitlines() == [
        "INSTANCE VI_51 BACKUP 150",
        "INSTANCE VI_51 MASTER 150",
        "INSTANCE VI_51 STOP 150",
    ]


def test_notify_failures_and_timeouts_are_counted_never_fatal(tmp_path: Path) -> None:
    async def go() -> None:
        runner = NotifyRunner(_script(tmp_path, "exit 3"), "VI_1", timeout=5)
        runner.submit("MASTER", 100)
        await runner.close(5)
        assert (runner.runs, runner.failures) == (1, 1)
        assert "exit status 3" in (runner.last_error or "")

        slow = NotifyRunner(_script(tmp_path, "sleep 30"), "VI_1", timeout=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        slow.submit("BACKUP", 100)
        await slow.close(5)
        assert loop.time() - started < 3
        assert slow.failures == 1 and "killed after 0.2s" in (slow.last_error or "")

        missing = NotifyRunner(str(tmp_path / "gone"), "VI_1")
        missing.submit("FAULT", 1)
        await missing.close(2)
        assert missing.failures == 1 and "cannot run" in (missing.last_error or "")

        none = NotifyRunner(None, "VI_1")
        none.submit("MASTER", 1)
        await none.close(1)
        assert none.runs == 0

    run(go)


# --------------------------------------------------------------------------------------------- tracking
def test_tracking_rules() -> None:
    t = Tracking(150, 50)
    assert t.ok and t.effective_priority == 150 and t.failing == []
    assert t.set("pool:app", True) is False
    assert t.set("pool:app", False) is True
    assert t.effective_priority == 100 and not t.fault
    assert t.set("listener:web", False) is False  # still "cannot serve": no change
    assert t.failing == ["listener:web", "pool:app"]
    assert t.set("pool:app", True) is False
    assert t.set("listener:web", True) is True
    assert t.effective_priority == 150
    assert Tracking(30, 50).set("x", False) and Tracking(30, 50).effective_priority == 30
    low = Tracking(30, 50)
    low.set("x", False)
    assert low.effective_priority == 1
    zero = Tracking(100, 0)
    zero.set("x", False)
    assert zero.fault and zero.effective_priority == 100
    with pytest.raises(ValueError):
        Tracking(0, 10)
    with pytest.raises(ValueError):
        Tracking(100, 255)


# --------------------------------------------------------------------------------------------- VIP port
def test_garp_frames_are_a_gratuitous_request_and_reply() -> None:
    mac = "02:00:00:00:00:01"
    request, reply = build_garp_frames(mac, f"{VIP}/32")
    mac_bytes = bytes.fromhex(mac.replace(":", ""))
    vip = bytes([10, 0, 0, 100])
    for frame, op, target_mac in ((request, 1, b"\0" * 6), (reply, 2, mac_bytes)):
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac_bytes and frame[12:14] == b"\x08\x06"
        arp = frame[14:42]
        assert struct.unpack("!HHBBH", arp[:8]) == (1, 0x0800, 6, 4, op)
        assert arp[8:14] == mac_bytes and arp[14:18] == vip  # sender
        assert arp[18:24] == target_mac and arp[24:28] == vip  # target: the VIP itself
    # Linux only lets a gratuitous *reply* override a fresh neighbour entry if target MAC == sender MAC


class _NetlinkError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code, "fake")
        self.code = code


class FakeIPRoute:
    """Just enough of pyroute2's AsyncIPRoute for the VIP port."""

    def __init__(self, addresses: list[tuple[str, int]], links: dict[str, int] | None = None) -> None:
        self.addresses = addresses
        self.links = links if links is not None else {"eth0": 2}
        self.fail_with: int | None = None
        self.commands: list[tuple[str, str, int]] = []
        self.closed = 0

    def __call__(self) -> FakeIPRoute:
        return self

    async def link_lookup(self, ifname: str) -> list[int]:
        return [self.links[ifname]] if ifname in self.links else []

    async def addr(self, command: str, **kw: Any) -> Any:
        if command == "dump":

            async def dump() -> Any:
                for address, length in list(self.addresses):
                    yield {"IFA_ADDRESS": address, "prefixlen": length, "index": kw["index"]}

            return dump()
        self.commands.append((command, kw["address"], kw["prefixlen"]))
        if self.fail_with is not None:
            raise _NetlinkError(self.fail_with)
        entry = (kw["address"], kw["prefixlen"])
        if command == "add":
            if entry in self.addresses:
                raise _NetlinkError(17)
            self.addresses.append(entry)
        elif command == "del":
            if entry not in self.addresses:
                raise _NetlinkError(99)
            self.addresses.remove(entry)
        return []

    def close(self) -> None:
        self.closed += 1


def test_netlink_port_is_idempotent_and_reports_other_errors() -> None:
    async def go() -> None:
        ipr = FakeIPRoute([("10.0.0.11", 24)])
        port = NetlinkVipPort("eth0", iproute=ipr)
        await port.add([f"{VIP}/32"])
        await port.add([f"{VIP}/32"])  # EEXIST is fine
        assert port.held() == {f"{VIP}/32"}
        assert ipr.addresses == [("10.0.0.11", 24), (VIP, 32)]
        await port.remove([f"{VIP}/32"])
        await port.remove([f"{VIP}/32"])  # EADDRNOTAVAIL is fine
        assert port.held() == set()
        ipr.fail_with = 1  # EPERM
        with pytest.raises(VipError, match="ip addr add"):
            await port.add([f"{VIP}/32"])
        assert ipr.closed == 5  # one short-lived netlink socket per call
        with pytest.raises(VipError, match="no interface named 'eth9'"):
            await NetlinkVipPort("eth9", iproute=ipr).add([f"{VIP}/32"])

    run(go)


def test_release_stale_removes_the_vips_whatever_their_prefix_length() -> None:
    async def go() -> None:
        ipr = FakeIPRoute([("10.0.0.11", 24), (VIP, 24), ("10.0.0.101", 32)])
        removed = await release_stale("eth0", [f"{VIP}/32", "10.0.0.101/32", "10.0.0.102/32"], iproute=ipr)
        assert removed == [f"{VIP}/24", "10.0.0.101/32"]
        assert ipr.addresses == [("10.0.0.11", 24)]
        assert await release_stale("eth0", [VIP], iproute=ipr) == []
        with pytest.raises(VipError):
            await release_stale("eth7", [VIP], iproute=ipr)

    run(go)


# --------------------------------------------------------------------------------------------- rendering
def _doc(instance: dict[str, Any]) -> dict[str, Any]:
    return {
        "node": {"name": "lb1", "version": "0", "state": "serving", "worker_restarts_total": 0},
        "listeners": [],
        "pools": [],
        "vrrp": {"instances": [instance]},
    }


def test_status_and_metrics_render_an_instance() -> None:
    async def go() -> dict[str, Any]:
        rig = Rig(track=TrackConfig(weight=50))
        await rig.master()
        await rig.receive(advert_from(PEER, 100))
        await rig.receive(advert_from(PEER, 100)[:30])
        rig.driver.set_check("pool:app", False)
        await rig.driver.settle()
        snap = rig.driver.snapshot()
        await rig.driver.stop()
        return snap

    snap = run(go)
    for key in (
        "name",
        "vrid",
        "state",
        "priority",
        "base_priority",
        "vips_held",
        "virtual_ips",
        "master_ip",
        "last_advert",
        "adverts_sent",
        "adverts_received",
        "rx_errors",
        "transitions",
    ):
        assert key in snap
    text = metrics.render(lambda: _doc(snap)).decode()
    labels = 'instance="VI_51",node="lb1",vrid="51"'
    assert f"halb_vrrp_master{{{labels}}} 1.0" in text
    assert 'halb_vrrp_state{instance="VI_51",node="lb1",state="MASTER",vrid="51"} 1.0' in text
    assert 'halb_vrrp_state{instance="VI_51",node="lb1",state="BACKUP",vrid="51"} 0.0' in text
    assert f"halb_vrrp_priority{{{labels}}} 100.0" in text
    assert f"halb_vrrp_base_priority{{{labels}}} 150.0" in text
    assert 'halb_vrrp_rx_errors_total{instance="VI_51",node="lb1",reason="truncated",vrid="51"} 1.0' in text
    assert f"halb_vrrp_adverts_received_total{{{labels}}} 1.0" in text
    assert f"halb_vrrp_transitions_total{{{labels}}} 2.0" in text
    console = Console(file=io.StringIO(), width=200)
    console.print(render_vrrp({"instances": [snap]}))
    rendered = console.file.getvalue()  # type: ignore[attr-defined]
    assert "MASTER" in rendered and "100 (of 150)" in rendered
    assert f"{PEER} prio 100" in rendered and "truncated 1" in rendered


def test_raw_netlink_address_attributes_are_decoded() -> None:
    from halb.vrrp.vip import _ipv4_text

    assert _ipv4_text("10.99.0.11") == "10.99.0.11"
    assert _ipv4_text(b"\x08\x00\x01\x00\nc\x00\x0b") == "10.99.0.11"  # as pyroute2 once returned it
    assert _ipv4_text(b"\nc\x00\x0b") == "10.99.0.11"
    assert _ipv4_text(b"junk!") is None and _ipv4_text(None) is None
