"""The pure parts of `halb.lab.observe`: netlink and frame parsing, the fence reading, timeline figures."""

from __future__ import annotations

import socket
import struct

from halb.lab.observe import (
    PROBE_MAC,
    NodeView,
    Request,
    Tick,
    arp_probe,
    classify,
    describe,
    fence_of,
    figures,
    first_ok,
    parse_addresses,
    percentile,
    runs,
)

VIP = socket.inet_aton("10.99.0.100")
LB1 = bytes.fromhex("020000000011")
CLIENT = bytes.fromhex("0200000000fa")


def newaddr(address: str) -> bytes:
    attr = struct.pack("=HH", 8, 2) + socket.inet_aton(address)
    body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 2) + attr
    return struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + body


def test_parse_addresses_reads_newaddr_messages_and_the_end_of_the_dump() -> None:
    data = newaddr("10.99.0.11") + newaddr("10.99.0.100")
    assert parse_addresses(data) == (["10.99.0.11", "10.99.0.100"], False)
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + bytes(4)
    assert parse_addresses(newaddr("10.99.0.11") + done) == (["10.99.0.11"], True)


def arp(op: int, src: bytes, dst: bytes, spa: bytes, tpa: bytes) -> bytes:
    return dst + src + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + src + spa + dst + tpa


def test_classify_garp_replies_probe_replies_and_synacks() -> None:
    broadcast = b"\xff" * 6
    assert classify(arp(1, LB1, broadcast, VIP, VIP), VIP) == ("garp", "02:00:00:00:00:11", None)
    assert classify(arp(2, LB1, broadcast, VIP, VIP), VIP)[0] == "garp"  # type: ignore[index]
    reply = arp(2, LB1, CLIENT, VIP, socket.inet_aton("10.99.0.250"))
    assert classify(reply, VIP) == ("arp-reply", "02:00:00:00:00:11", None)
    probe_reply = arp(2, LB1, PROBE_MAC, VIP, bytes(4))
    assert classify(probe_reply, VIP) == ("probe-reply", "02:00:00:00:00:11", None)
    assert classify(arp(1, CLIENT, broadcast, socket.inet_aton("10.99.0.250"), VIP), VIP) is None
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, VIP, socket.inet_aton("10.99.0.250"))
    tcp = struct.pack("!HHIIBBHHH", 80, 40000, 0, 0, 0x50, 0x12, 0, 0, 0)
    assert classify(CLIENT + LB1 + b"\x08\x00" + ip + tcp, VIP) == ("synack", "02:00:00:00:00:11", 40000)
    ack = struct.pack("!HHIIBBHHH", 80, 40000, 0, 0, 0x50, 0x10, 0, 0, 0)
    assert classify(CLIENT + LB1 + b"\x08\x00" + ip + ack, VIP) is None


def test_arp_probe_asks_for_the_vip_from_0000_and_the_made_up_mac() -> None:
    frame = arp_probe(LB1, VIP)
    assert len(frame) == 60
    assert frame[:6] == LB1 and frame[6:12] == PROBE_MAC and frame[12:14] == b"\x08\x06"
    assert frame[22:28] == PROBE_MAC and frame[28:32] == bytes(4) and frame[38:42] == VIP


def test_fence_of_finds_the_vip_in_a_set_with_timeouts() -> None:
    assert fence_of([{"metainfo": {}}], "10.99.0.100") == (False, ())
    empty = [
        {"table": {"family": "inet", "name": "halb_fence"}},
        {"set": {"table": "halb_fence", "name": "s"}},
    ]
    assert fence_of(empty, "10.99.0.100") == (True, ())
    elem = {"elem": {"val": "10.99.0.100", "timeout": 2, "expires": 1}}
    live = [*empty[:1], {"set": {"table": "halb_fence", "name": "lease_vips", "elem": [elem]}}]
    assert fence_of(live, "10.99.0.100") == (True, ("halb_fence/lease_vips",))
    plain = [*empty[:1], {"set": {"table": "t", "name": "s", "elem": ["10.99.0.100"]}}]
    assert fence_of(plain, "10.99.0.100") == (True, ("t/s",))
    assert fence_of(plain, "10.99.0.101") == (True, ())


def tick(n: int, holders: str, answering: str = "") -> Tick:
    nodes = {lb: NodeView(lb in holders.split(), lb in answering.split()) for lb in ("lb1", "lb2")}
    return Tick(n, n * 0.05, nodes)


def test_runs_and_figures_of_a_timeline() -> None:
    ticks = [tick(0, "lb1", "lb1"), tick(1, "lb1", "lb1"), tick(2, ""), tick(3, ""), tick(4, "lb2", "lb2")]
    found = runs(ticks, lambda t: t.holders)
    assert [(r.value, r.ticks) for r in found] == [(("lb1",), 2), ((), 2), (("lb2",), 1)]
    assert abs(found[1].duration - 0.1) < 1e-9
    fig = figures(ticks)
    assert (fig.max_holders, fig.two_holders, fig.first_two_holders) == (1, 0, None)
    assert [round(g, 3) for g in fig.gaps] == [0.1]
    split = [*ticks, tick(5, "lb1 lb2", "lb1 lb2")]
    fig = figures(split, origin=0.0)
    assert (fig.max_holders, fig.two_holders, fig.two_answering) == (2, 1, 1)
    assert fig.first_two_holders is not None and abs(fig.first_two_holders - 0.25) < 1e-9
    assert describe(ticks, 0.0) == "0.00..0.10 lb1 | 0.10..0.20 - | 0.20..0.25 lb2"


def test_frozen_holder_view_and_first_ok() -> None:
    frozen = NodeView(holds=True, answers=False, nft=True, fence_sets=())
    assert frozen.fence is False
    assert NodeView(True, True, True, ("halb_fence/lease_vips",)).fence is True
    assert NodeView(True, True).fence is None
    requests = [Request(0, 1.0, 1.3, False), Request(1, 1.1, 1.4, True), Request(2, 1.2, 1.25, True)]
    assert first_ok(requests, 1.05) is requests[2]
    assert first_ok(requests, 1.3) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 1.0) == 4.0
